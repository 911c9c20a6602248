"""Built-in models: small Llama-architecture LMs trained here, on a local corpus, and cached."""
from sparselm.zoo.builtin import BUILTIN_SPECS, builtin_path, load_builtin
from sparselm.zoo.tokenizer import train_tokenizer
from sparselm.zoo.train import train_causal_lm

__all__ = ["BUILTIN_SPECS", "builtin_path", "load_builtin", "train_tokenizer", "train_causal_lm"]
