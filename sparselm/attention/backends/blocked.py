"""Blocked sparse attention in plain PyTorch: forward and backward on any device.

Queries are processed in chunks of C positions. For each chunk the pattern names the
key ranges it may need (`Pattern.key_ranges`); only those keys are gathered (a view
when they form one range, an index_select otherwise), the exact pattern mask is built
on the small [C, K] grid, and fused `scaled_dot_product_attention` does the chunk.

Backward is a custom autograd Function that recomputes each chunk (as gradient
checkpointing does) and accumulates its key/value gradients into one buffer. Plain
autograd through per-chunk slices would be quadratic: every slice's backward
materialises a zero tensor the size of the whole key sequence.

Cost: for a sliding window w, each chunk touches C + w - 1 keys, so time and memory are
O(T * (C + w)) instead of O(T^2): the sliding-window attention of Longformer (Beltagy et
al. 2020) computed chunk by chunk, as in Child et al. 2019's block-sparse kernels.

Shape legend: B batch, H query heads, G key/value heads, C query chunk, K gathered keys,
D head dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparselm.attention.backends.reference import check_shapes, repeat_heads
from sparselm.attention.pattern import Pattern, Range

DEFAULT_CHUNK = 128  # measured on a 2-core CPU: 64..256 within 10% for window 256; 128 balances overhead and waste


@dataclass
class ChunkPlan:
    """The keys one query chunk reads and its exact mask (None when every pair is allowed)."""

    start: int
    stop: int
    ranges: list[Range]
    index: torch.Tensor | None  # [K] key positions when the ranges are not one slice
    mask: torch.Tensor | None  # [C, K] or [B, 1, C, K] bool
    has_key: torch.Tensor | None  # [..., C, 1] bool, None when every query has a key


def _gather(x: torch.Tensor, plan: ChunkPlan) -> torch.Tensor:
    """Keys/values the chunk reads, along dim 2: a view for one range."""
    if plan.index is None:
        start, end = plan.ranges[0]
        return x[:, :, start:end]  # [B, G, K, D]
    return x.index_select(2, plan.index)  # [B, G, K, D]


def plan_chunks(pattern: Pattern, tq: int, tk: int, q_offset: int, chunk: int, device,
                key_valid: torch.Tensor | None = None) -> list[ChunkPlan]:
    """The per-chunk key ranges and masks of a blocked attention call (shared by forward and backward)."""
    plans = []
    reuse = {} if pattern.translation_invariant and key_valid is None else None  # relative geometry -> masks
    for start in range(0, tq, chunk):
        stop = min(tq, start + chunk)
        first, last = start + q_offset, stop + q_offset  # absolute query positions [first, last)
        ranges = [(s, min(e, tk)) for s, e in pattern.key_ranges(first, last) if s < tk]
        ranges = [(s, e) for s, e in ranges if e > s]
        if not ranges:  # no query of the chunk has a key: its rows stay zero
            continue
        k_pos = torch.cat([torch.arange(s, e, device=device) for s, e in ranges])  # [K]
        geometry = (last - first, tuple((s - first, e - first) for s, e in ranges))
        if reuse is not None and geometry in reuse:
            mask, has_key = reuse[geometry]
        else:
            q_pos = torch.arange(first, last, device=device)  # [C]
            mask = pattern.allows(q_pos[:, None], k_pos[None, :])  # [C, K]
            if key_valid is not None:
                mask = mask[None, None] & key_valid[:, k_pos][:, None, None, :]  # [B, 1, C, K]
            has_key = mask.any(-1, keepdim=True)  # [..., C, 1]
            mask = None if bool(mask.all()) else mask
            has_key = None if bool(has_key.all()) else has_key
            if reuse is not None:
                reuse[geometry] = (mask, has_key)
        plans.append(ChunkPlan(start, stop, ranges, None if len(ranges) == 1 else k_pos, mask, has_key))
    return plans


def _chunk_attention(q_chunk, k_chunk, v_chunk, plan: ChunkPlan, scale, groups) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q_chunk, repeat_heads(k_chunk, groups), repeat_heads(v_chunk, groups),
                                         attn_mask=plan.mask, scale=scale)  # [B, H, C, D]
    if plan.has_key is not None:
        out = out.masked_fill(~plan.has_key, 0.0)  # fused kernels differ on empty rows; define them as zero
    return out


class _BlockedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plans, scale, groups):
        output = q.new_zeros(q.shape[:-1] + (v.shape[-1],))  # [B, H, Tq, D]
        for plan in plans:
            output[:, :, plan.start:plan.stop] = _chunk_attention(
                q[:, :, plan.start:plan.stop], _gather(k, plan), _gather(v, plan), plan, scale, groups)
        ctx.save_for_backward(q, k, v)
        ctx.plans, ctx.scale, ctx.groups = plans, scale, groups
        return output

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for plan in ctx.plans:
            q_chunk = q[:, :, plan.start:plan.stop].detach().requires_grad_()  # [B, H, C, D]
            k_chunk = _gather(k, plan).detach().requires_grad_()  # [B, G, K, D]
            v_chunk = _gather(v, plan).detach().requires_grad_()
            with torch.enable_grad():
                out = _chunk_attention(q_chunk, k_chunk, v_chunk, plan, ctx.scale, ctx.groups)
            gq, gk, gv = torch.autograd.grad(out, (q_chunk, k_chunk, v_chunk), grad_out[:, :, plan.start:plan.stop])
            dq[:, :, plan.start:plan.stop] += gq
            if plan.index is None:
                start, end = plan.ranges[0]
                dk[:, :, start:end] += gk
                dv[:, :, start:end] += gv
            else:
                dk.index_add_(2, plan.index, gk)
                dv.index_add_(2, plan.index, gv)
        return dq, dk, dv, None, None, None


def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern,
                      scale: float | None = None, q_offset: int | None = None,
                      key_valid: torch.Tensor | None = None, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Sparse attention [B, H, Tq, D] equal to `reference_attention` (queries without keys give zeros).

    Differentiable in q, k and v (backward recomputes each chunk; memory O(T * (C + w))).
    Inputs are not modified.
    """
    check_shapes(q, k, v)
    tq, tk = q.shape[2], k.shape[2]
    q_offset = tk - tq if q_offset is None else q_offset
    pattern.prepare(max(tk, tq + q_offset))
    if key_valid is not None:
        key_valid = key_valid.to(q.device, torch.bool)  # [B, Tk]
    plans = plan_chunks(pattern, tq, tk, q_offset, chunk, q.device, key_valid)
    groups = q.shape[1] // k.shape[1]
    if len(plans) == 1 and plans[0].start == 0 and plans[0].stop == tq and plans[0].index is None:
        # one chunk reading one key range (e.g. a decode step over a bounded cache): plain autograd is linear
        return _chunk_attention(q, _gather(k, plans[0]), _gather(v, plans[0]), plans[0], scale, groups)
    return _BlockedAttention.apply(q, k, v, plans, scale, groups)
