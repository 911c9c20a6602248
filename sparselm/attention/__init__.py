"""Sparse attention: patterns, backends, Hugging Face integration and a bounded streaming cache.

    import sparselm as sl
    patch = sl.attention.apply(model, sl.SlidingWindow(256) | sl.Sinks(4))   # or "window:256+sinks:4"
    print(patch.summary())                                                   # which backend ran
    cache = sl.attention.SinkWindowCache.for_model(model, sinks=4, window=252)  # memory flat in length
"""
from sparselm.attention.backends.blocked import blocked_attention
from sparselm.attention.backends.dispatch import BACKENDS, choose_backend, sparse_attention
from sparselm.attention.backends.flex import flex_sparse_attention
from sparselm.attention.backends.reference import reference_attention
from sparselm.attention.block_patterns import BlockSparse, RandomBlocks
from sparselm.attention.combine import Intersection, Union
from sparselm.attention.hf_patch import AttentionPatch, apply
from sparselm.attention.local_patterns import (
    Causal, DilatedWindow, Fixed, GlobalTokens, Sinks, SlidingWindow, Strided,
)
from sparselm.attention.parse import parse_pattern
from sparselm.attention.pattern import Pattern
from sparselm.attention.streaming import StreamReport, greedy_generate, stream_perplexity
from sparselm.attention.streaming_cache import SinkWindowCache

__all__ = [
    "Pattern", "Causal", "SlidingWindow", "Sinks", "GlobalTokens", "DilatedWindow", "Strided", "Fixed",
    "RandomBlocks", "BlockSparse", "Union", "Intersection", "parse_pattern",
    "sparse_attention", "choose_backend", "BACKENDS", "blocked_attention", "flex_sparse_attention",
    "reference_attention", "apply", "AttentionPatch", "SinkWindowCache", "stream_perplexity",
    "greedy_generate", "StreamReport",
]
