"""The built-in models: `tiny` (seconds to train; for tests) and `small` (minutes; demo, benchmarks).

Both are `LlamaForCausalLM` with grouped-query attention, trained on the default corpus
(or any corpus given) and cached by a key of corpus fingerprint + spec + seed, so the
first call trains and every later call loads from disk.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sparselm.cache import cache_dir
from sparselm.data.corpus import Corpus, load_corpus
from sparselm.errors import SparselmError

RECIPE_VERSION = 1  # bump when training changes, so caches are rebuilt


@dataclass(frozen=True)
class BuiltinSpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    context: int
    steps: int
    batch_size: int
    lr: float
    seed: int = 0

    def config(self, tokenizer) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, max_position_embeddings=self.context,
            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, rope_theta=10000.0,
        )


BUILTIN_SPECS: dict[str, BuiltinSpec] = {
    # ~0.4M non-embedding parameters; trains in about two minutes on 2 cores.
    "tiny": BuiltinSpec(vocab_size=1024, hidden_size=128, intermediate_size=352, num_layers=2, num_heads=4,
                        num_kv_heads=2, context=128, steps=400, batch_size=16, lr=3e-3),
    # ~3.4M non-embedding parameters; about 8 minutes on 2 idle cores.
    "small": BuiltinSpec(vocab_size=4096, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4,
                         num_kv_heads=2, context=256, steps=500, batch_size=16, lr=2e-3),
}


def _key(name: str, spec: BuiltinSpec, corpus: Corpus) -> str:
    blob = json.dumps({"spec": asdict(spec), "corpus": corpus.fingerprint, "v": RECIPE_VERSION}, sort_keys=True)
    return f"{name}-{corpus.name}-{hashlib.sha1(blob.encode()).hexdigest()[:12]}"


def builtin_path(name: str, corpus: Corpus | str | None = None) -> Path:
    """Cache folder of a built-in model (it may not exist yet)."""
    if name not in BUILTIN_SPECS:
        raise SparselmError(f"unknown built-in model {name!r}; choose one of {', '.join(BUILTIN_SPECS)}")
    corpus = load_corpus(corpus)
    return cache_dir("zoo") / _key(name, BUILTIN_SPECS[name], corpus)


def load_builtin(name: str, corpus: Corpus | str | None = None, progress: bool = True):
    """(model, tokenizer) of a built-in model; trains and caches it on first use."""
    from transformers import AutoTokenizer

    corpus = load_corpus(corpus)
    path = builtin_path(name, corpus)
    if not (path / "config.json").exists():
        # One trainer at a time: concurrent callers (parallel tests, several CLI runs) wait
        # for the first one and then load what it cached.
        with open(path.parent / f".{path.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (path / "config.json").exists():
                _train_builtin(name, corpus, path, progress)
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


def _train_builtin(name: str, corpus: Corpus, path: Path, progress: bool) -> None:
    from sparselm.data.tokens import corpus_token_ids
    from sparselm.evaluate import perplexity
    from sparselm.zoo.tokenizer import train_tokenizer
    from sparselm.zoo.train import train_causal_lm

    spec = BUILTIN_SPECS[name]
    t0 = time.time()
    if progress:
        print(f"training built-in model {name!r} on corpus {corpus.name!r} (first use only; cached in {path})")
    tokenizer = train_tokenizer(corpus.text("train"), spec.vocab_size)
    train_ids = corpus_token_ids(tokenizer, corpus, "train")
    if train_ids.numel() < 20 * spec.context:
        raise SparselmError(f"corpus {corpus.name!r} is too small to train a model ({train_ids.numel()} tokens)")
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(spec.config(tokenizer))
    losses = train_causal_lm(model, train_ids, steps=spec.steps, batch_size=spec.batch_size, seq_len=spec.context,
                             lr=spec.lr, seed=spec.seed, progress=progress, desc=f"train {name}")
    val_ids = corpus_token_ids(tokenizer, corpus, "validation")
    val_ppl = perplexity(model, val_ids, spec.context, max_windows=64)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "sparselm_builtin.json").write_text(json.dumps({
            "name": name, "spec": asdict(spec), "corpus": corpus.name, "corpus_fingerprint": corpus.fingerprint,
            "final_train_loss": sum(losses[-20:]) / len(losses[-20:]), "validation_perplexity": val_ppl,
            "train_seconds": time.time() - t0}, indent=2))
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    if progress:
        print(f"built-in model {name!r}: validation perplexity {val_ppl:.2f}, trained in {time.time() - t0:.0f}s")
