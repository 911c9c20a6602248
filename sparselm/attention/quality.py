"""What a pattern costs in quality: held-out perplexity against full attention.

Three measurements, as the sparse-attention literature reports them:
1. a full-attention model patched after training (no retraining): `patched_perplexities`;
2. a model trained with the pattern from scratch, against one trained with full
   attention on the same data, steps and seed: `train_with_pattern`;
3. text longer than the training context (`long_text_perplexities`): full attention over
   the whole text (rotary positions past anything seen in training), against the
   StreamingLLM sinks + window cache (positions stay inside the trained range).
"""
from __future__ import annotations

import copy

import torch

from sparselm.attention.hf_patch import apply
from sparselm.attention.parse import parse_pattern
from sparselm.attention.pattern import Pattern
from sparselm.errors import SparselmError


def patched_perplexities(model, token_ids: torch.Tensor, seq_len: int, patterns: list[Pattern | str],
                         max_windows: int | None = None, backend: str = "auto") -> dict[str, float]:
    """{"full": ppl, spec: ppl, ...}: perplexity with each pattern patched in, the model otherwise unchanged.

    The model's attention implementation is restored afterwards.
    """
    from sparselm.evaluate import perplexity

    results = {"full": perplexity(model, token_ids, seq_len, max_windows=max_windows)}
    for pattern in patterns:
        pattern = parse_pattern(pattern)
        patch = apply(model, pattern, backend=backend)
        try:
            results[pattern.spec()] = perplexity(model, token_ids, seq_len, max_windows=max_windows)
        finally:
            patch.remove()
    return results


def train_with_pattern(config, train_ids: torch.Tensor, pattern: Pattern | str | None, *, steps: int,
                       batch_size: int, seq_len: int, lr: float, seed: int = 0, progress: bool = True):
    """A fresh model of `config` trained with `pattern` (None = full attention); returns (model, losses).

    Same seed, data order and schedule for every pattern, so runs differ only in attention.
    The returned model keeps the pattern patched in.
    """
    from transformers import AutoModelForCausalLM

    from sparselm.zoo import train_causal_lm

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    if pattern is not None:
        apply(model, pattern)
    elif model.config._attn_implementation == "sparselm":  # config copied from a patched model
        model.set_attn_implementation("sdpa")
    desc = f"train {parse_pattern(pattern).spec() if pattern is not None else 'full'}"
    losses = train_causal_lm(model, train_ids, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr,
                             seed=seed, progress=progress, desc=desc)
    return model, losses


def long_text_perplexities(model, token_ids: torch.Tensor, context: int, sinks: int, window: int,
                           factor: int = 4, progress: bool = False) -> dict:
    """Perplexity over one text of `factor` x `context` tokens, three ways.

    - "in_context": full attention over windows of `context` tokens (the trained regime);
    - "full": full attention over the whole text in one pass (positions up to factor x context);
    - "sinks+window": the bounded cache, one token at a time (memory flat; reported too).
    """
    from transformers import DynamicCache

    from sparselm.attention.streaming import stream_perplexity
    from sparselm.attention.streaming_cache import SinkWindowCache
    from sparselm.evaluate import perplexity

    length = factor * context
    if token_ids.numel() < length:
        raise SparselmError(f"need {length} tokens for {factor}x the context of {context}, got {token_ids.numel()}")
    text = token_ids[:length]
    if getattr(model.config, "_attn_implementation", None) == "sparselm":
        raise SparselmError("long_text_perplexities needs an unpatched model; call patch.remove() first")
    results = {"tokens": length, "context": context,
               "in_context": perplexity(model, text, context),
               "full": perplexity(model, text, length, max_windows=1)}
    full_cache = DynamicCache(config=model.config)
    full_stream = stream_perplexity(model, text, full_cache, chunk=context, progress=progress)
    cache = SinkWindowCache.for_model(model, sinks, window)
    try:
        stream = stream_perplexity(model, text, cache, chunk=1, progress=progress)
    finally:
        cache.patch.remove()
    results["sinks+window"] = stream.perplexity
    results["sinks+window_cache_bytes"] = {"first": stream.cache_bytes[0], "peak": stream.peak_cache_bytes,
                                           "final": stream.cache_bytes[-1]}
    results["full_cache_bytes_final"] = full_stream.cache_bytes[-1]
    return results

