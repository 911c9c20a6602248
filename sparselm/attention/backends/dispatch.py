"""One entry point, `sparse_attention`, and the rule that picks its backend.

Backends: "blocked" (plain PyTorch, forward and backward everywhere), "flex"
(FlexAttention, compiled), "flex-eager" (FlexAttention uncompiled; tests only) and
"reference" (dense mask; tests only). "auto" picks:

- CUDA with FlexAttention available: "flex" (fused kernel, forward and backward).
- otherwise "blocked". On CPU, compiled flex has no backward, pays seconds of compile
  and block-mask build per new length (every decode step is a new length), and at 16k
  tokens is no faster than the blocked backend (benchmarks/bench_attention.py: both
  about 0.1x the time of dense causal SDPA), so blocked is the better default there.
"""
from __future__ import annotations

import warnings

import torch

from sparselm.attention.backends.blocked import blocked_attention
from sparselm.attention.backends.flex import flex_available, flex_sparse_attention, flex_supports
from sparselm.attention.backends.reference import reference_attention
from sparselm.attention.pattern import Pattern
from sparselm.errors import SparselmError

BACKENDS = ("auto", "blocked", "flex", "flex-eager", "reference")
_WARNED: set[str] = set()


def choose_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto",
                   key_valid: torch.Tensor | None = None) -> str:
    """The backend `sparse_attention` will run for these inputs.

    An explicit flex backend that cannot run (no backward on CPU, padding masks) falls back
    to "blocked" with a warning; the returned name is always the backend that runs.
    """
    if backend not in BACKENDS:
        raise SparselmError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if q.device.type == "cuda" and flex_available() and flex_supports(q, k, v, key_valid) is None:
            return "flex"
        return "blocked"
    if backend.startswith("flex"):
        reason = flex_supports(q, k, v, key_valid)
        if reason:  # e.g. training on CPU: fall back rather than fail mid-training, and say so once
            if reason not in _WARNED:
                _WARNED.add(reason)
                warnings.warn(f"backend {backend!r} cannot run here ({reason}); using 'blocked' instead", stacklevel=3)
            return "blocked"
    return backend


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, *,
                     backend: str = "auto", scale: float | None = None, q_offset: int | None = None,
                     key_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
    """Attention of q [B, H, Tq, D] over k, v [B, G, Tk, D] restricted to `pattern`.

    Queries sit at absolute positions q_offset + i (default Tk - Tq). Returns the output
    [B, H, Tq, D] and the name of the backend that ran. Every backend gives the same
    result as "reference" up to float rounding; queries without any allowed key give zeros.
    """
    chosen = choose_backend(q, k, v, backend, key_valid)
    if chosen == "blocked":
        out = blocked_attention(q, k, v, pattern, scale=scale, q_offset=q_offset, key_valid=key_valid)
    elif chosen == "reference":
        out = reference_attention(q, k, v, pattern, scale=scale, q_offset=q_offset, key_valid=key_valid)
    else:
        out = flex_sparse_attention(q, k, v, pattern, scale=scale, q_offset=q_offset, compiled=chosen == "flex")
    return out, chosen
