"""Token streams of a corpus split, cached on disk.

Documents are tokenized separately and joined with the tokenizer's end-of-sequence token,
so a window that crosses a document boundary sees the separator a model trained here saw.
"""
from __future__ import annotations

import hashlib
import os
import tempfile

import numpy as np
import torch

from sparselm.cache import cache_dir
from sparselm.data.corpus import Corpus, load_corpus


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def tokenize_text(tokenizer, text: str, chunk_chars: int = 1 << 16) -> torch.Tensor:
    """Token ids of a long text (chunked at line boundaries so the fast tokenizer stays quick)."""
    chunks, start = [], 0
    while start < len(text):
        end = min(len(text), start + chunk_chars)
        if end < len(text):
            nl = text.rfind("\n", start, end)
            end = nl + 1 if nl > start else end
        chunks.append(text[start:end])
        start = end
    ids: list[int] = []
    for enc in tokenizer(chunks, add_special_tokens=False)["input_ids"] if chunks else []:
        ids.extend(enc)
    return torch.tensor(ids, dtype=torch.long)


# Training and calibration never need more than a few million tokens; tokenizing all 30 MB of
# the standard library's train split would cost minutes on a first run for nothing.
TRAIN_MAX_CHARS = 16_000_000


def corpus_token_ids(tokenizer, corpus: Corpus | str | None, split: str, max_chars: int | None = -1) -> torch.Tensor:
    """1-D LongTensor of the tokens of `split`; cached by (corpus, tokenizer, split, max_chars).

    max_chars: tokenize only the first characters of the split (-1: TRAIN_MAX_CHARS for the
    train split, everything for validation and test; None: everything).
    """
    corpus = load_corpus(corpus)
    if max_chars == -1:
        max_chars = TRAIN_MAX_CHARS if split == "train" else None
    suffix = f"-{max_chars}" if max_chars else ""
    key = f"{corpus.name}-{corpus.fingerprint}-{tokenizer_fingerprint(tokenizer)}-{split}{suffix}.npy"
    path = cache_dir("tokens") / key
    if path.exists():
        return torch.from_numpy(np.load(path).astype(np.int64))
    text = corpus.text(split)
    ids = tokenize_text(tokenizer, text[:max_chars] if max_chars else text)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npy")
    os.close(fd)
    np.save(tmp, ids.numpy().astype(np.int32))
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache entry
    return ids
