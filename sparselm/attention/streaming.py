"""Streaming through a key/value cache: teacher-forced perplexity of long text, and greedy decoding.

Both feed tokens a chunk at a time through whatever cache they are given (the full
`DynamicCache`, or the bounded `SinkWindowCache`) and record, after every chunk, the bytes
the cache holds, so "memory is flat in the generated length" is a measured series, not a
claim. Perplexity = exp(mean next-token NLL) over every token but the first.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from sparselm.errors import SparselmError


def cache_nbytes(cache) -> int:
    """Bytes of keys and values held by a transformers cache (any layer type)."""
    if hasattr(cache, "nbytes") and callable(cache.nbytes):
        return cache.nbytes()
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@dataclass
class StreamReport:
    """Result of one streaming run."""

    tokens: int
    seconds: float
    perplexity: float | None = None
    cache_bytes: list[int] = field(default_factory=list)  # after each chunk

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")

    @property
    def peak_cache_bytes(self) -> int:
        return max(self.cache_bytes, default=0)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("cache_bytes")
        out.update(tokens_per_s=self.tokens_per_s, peak_cache_bytes=self.peak_cache_bytes,
                   final_cache_bytes=self.cache_bytes[-1] if self.cache_bytes else 0)
        return out


@torch.no_grad()
def stream_perplexity(model, token_ids: torch.Tensor, cache, chunk: int = 1, progress: bool = False) -> StreamReport:
    """Teacher-forced perplexity of a 1-D token stream fed `chunk` tokens at a time through `cache`.

    With the full cache this equals one forward pass over the whole text; with the
    sinks + window cache it is StreamingLLM's evaluation (Xiao et al. 2023, section 4.1).
    """
    if token_ids.ndim != 1 or token_ids.numel() < 2:
        raise SparselmError("stream_perplexity needs a 1-D token stream of at least 2 tokens")
    if chunk <= 0:
        raise SparselmError(f"chunk must be positive, got {chunk}")
    device = next(model.parameters()).device
    ids = token_ids.to(device)[None]  # [1, T]
    model.eval()
    nll, count, sizes = 0.0, 0, []
    start_time = time.perf_counter()
    for start in tqdm(range(0, ids.shape[1], chunk), desc="stream", disable=not progress, dynamic_ncols=True):
        piece = ids[:, start:start + chunk]  # [1, C]
        logits = model(input_ids=piece, cache=cache, use_cache=True).logits.float()  # [1, C, V]
        targets = ids[:, start + 1:start + 1 + piece.shape[1]]  # [1, <= C]
        n = targets.shape[1]
        if n:
            nll += torch.nn.functional.cross_entropy(logits[0, :n], targets[0], reduction="sum").item()
            count += n
        sizes.append(cache_nbytes(cache))
    seconds = time.perf_counter() - start_time
    return StreamReport(tokens=ids.shape[1], seconds=seconds, perplexity=math.exp(nll / count), cache_bytes=sizes)


@torch.no_grad()
def greedy_generate(model, prompt_ids: torch.Tensor, max_new_tokens: int, cache,
                    progress: bool = False) -> tuple[torch.Tensor, StreamReport]:
    """Greedy decoding of `max_new_tokens` after a 1-D prompt; returns (new tokens [N], report).

    The report's time covers the decode steps only (not the prompt), so tokens_per_s is
    the decode rate.
    """
    if prompt_ids.ndim != 1 or prompt_ids.numel() == 0:
        raise SparselmError("greedy_generate needs a non-empty 1-D prompt")
    device = next(model.parameters()).device
    model.eval()
    logits = model(input_ids=prompt_ids.to(device)[None], cache=cache, use_cache=True).logits  # [1, P, V]
    token = logits[:, -1:].argmax(-1)  # [1, 1]
    out, sizes = [token], [cache_nbytes(cache)]
    start_time = time.perf_counter()
    for _ in tqdm(range(max_new_tokens - 1), desc="decode", disable=not progress, dynamic_ncols=True):
        logits = model(input_ids=token, cache=cache, use_cache=True).logits  # [1, 1, V]
        token = logits[:, -1:].argmax(-1)
        out.append(token)
        sizes.append(cache_nbytes(cache))
    seconds = time.perf_counter() - start_time
    tokens = torch.cat(out, dim=1)[0]  # [N]
    return tokens, StreamReport(tokens=max(0, max_new_tokens - 1), seconds=seconds, cache_bytes=sizes)
