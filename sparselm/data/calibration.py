"""Calibration samples: seeded random windows of a corpus split."""
from __future__ import annotations

import torch

from sparselm.data.corpus import Corpus, load_corpus
from sparselm.data.tokens import corpus_token_ids
from sparselm.errors import SparselmError


def calibration(tokenizer, source: str | Corpus | None = None, n: int = 128, seq_len: int = 512,
                seed: int = 0, split: str = "train") -> torch.Tensor:
    """`n` windows of `seq_len` tokens drawn uniformly (seeded) from `split` of the corpus.

    Returns a LongTensor [n, seq_len]. The same (corpus, tokenizer, n, seq_len, seed) always
    gives the same samples, so methods compared on them see identical data.
    """
    if n <= 0 or seq_len <= 0:
        raise SparselmError(f"calibration needs n > 0 and seq_len > 0 (got n={n}, seq_len={seq_len})")
    ids = corpus_token_ids(tokenizer, load_corpus(source), split)
    if ids.numel() < seq_len + 1:
        raise SparselmError(
            f"calibration text too short: the {split} split has {ids.numel()} tokens, fewer than one window of "
            f"seq_len={seq_len}; give a larger corpus or a smaller --seq-len")
    if ids.numel() < n * seq_len // 4:
        raise SparselmError(
            f"calibration text too short: {ids.numel()} tokens for {n} samples of {seq_len} tokens "
            f"(need at least {n * seq_len // 4}); give more text or fewer --samples / a smaller --seq-len")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n,), generator=gen)  # [n]
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])  # [n, seq_len]
