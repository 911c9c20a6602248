"""Byte-level BPE tokenizer trained on a corpus with the `tokenizers` library.

Byte-level means every string is encodable (no unknown token), like GPT-2's tokenizer.
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"


def train_tokenizer(text: str, vocab_size: int, max_chars: int = 4_000_000) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on (the first `max_chars` characters of) `text`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    sample = text[:max_chars]
    lines = sample.split("\n")
    batch = 2000  # lines per training item: keeps the iterator cheap
    tok.train_from_iterator(("\n".join(lines[i:i + batch]) for i in range(0, len(lines), batch)), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS, unk_token=EOS,
                                   model_max_length=1 << 20)
