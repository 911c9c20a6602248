"""Dense-mask reference attention: the whole [Tq, Tk] score matrix, masked by the pattern.

O(Tq * Tk) memory; for tests, where every other backend must match it (outputs and
gradients). Softmax attention as in Vaswani et al. 2017, eq. 1: softmax(Q K^T * scale) V.

Shape legend: B = batch, H = query heads, G = key/value heads, Tq / Tk = query / key
positions, D = head dim. Queries sit at absolute positions q_offset + i (default Tk - Tq,
i.e. the queries are the last Tq positions, as with a key/value cache).
"""
from __future__ import annotations

import torch

from sparselm.attention.pattern import Pattern


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise on inconsistent [B, H, T, D] inputs (grouped-query heads must divide)."""
    from sparselm.errors import SparselmError

    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise SparselmError(f"attention inputs must be [batch, heads, tokens, head_dim]; got q {tuple(q.shape)}, "
                            f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise SparselmError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit together")
    if q.shape[1] % k.shape[1]:
        raise SparselmError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")


def repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, G, T, D] -> [B, G * groups, T, D], each key/value head shared by `groups` query heads."""
    if groups == 1:
        return x
    b, g, t, d = x.shape
    return x[:, :, None].expand(b, g, groups, t, d).reshape(b, g * groups, t, d)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern,
                        scale: float | None = None, q_offset: int | None = None,
                        key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Masked softmax attention, [B, H, Tq, D]. Queries with no allowed key output zeros.

    `key_valid` [B, Tk] (bool) removes keys (padding) for every query of that batch row.
    """
    check_shapes(q, k, v)
    tq, tk = q.shape[2], k.shape[2]
    q_offset = tk - tq if q_offset is None else q_offset
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    groups = q.shape[1] // k.shape[1]
    mask = pattern.mask(tq, tk, q_offset).to(q.device)[None, None]  # [1, 1, Tq, Tk]
    if key_valid is not None:
        mask = mask & key_valid.to(q.device, torch.bool)[:, None, None, :]  # [B, 1, Tq, Tk]
    compute = torch.promote_types(q.dtype, torch.float32)  # half inputs: softmax in float32
    scores = torch.matmul(q, repeat_heads(k, groups).transpose(-1, -2)).to(compute) * scale  # [B, H, Tq, Tk]
    # finfo.min instead of -inf keeps empty rows finite (uniform), then zeroed: no NaN in forward or backward
    probs = torch.softmax(scores.masked_fill(~mask, torch.finfo(scores.dtype).min), dim=-1)
    probs = probs.masked_fill(~mask, 0.0).to(v.dtype)  # [B, H, Tq, Tk]
    return torch.matmul(probs, repeat_heads(v, groups))  # [B, H, Tq, D]
