"""Tensor math of sparse training: initial masks, magnitude masks and drop-and-grow.

Pure functions on tensors (no modules, no optimizer). Masks are bool tensors shaped like
the weight ([out_features, in_features]); True = the weight is active. N:M groups are M
consecutive weights along the input dimension (the last one), as in NVIDIA's 2:4 format.

- SET (Mocanu et al. 2018): drop the active weights of smallest magnitude, regrow the
  same number at random positions.
- RigL (Evci et al. 2020, Sec. 3): drop the same way, regrow where |dense gradient| is
  largest among connections that were neither active nor just dropped.
"""
from __future__ import annotations

import torch

from sparselm.errors import SparselmError


def active_count(numel: int, density: float) -> int:
    """Number of active weights a layer of `numel` weights keeps at `density`."""
    return int(round(density * numel))


def check_nm(n: int, m: int, in_features: int) -> None:
    """Raise SparselmError unless 0 < n < m and m divides `in_features`."""
    if not (0 < n < m):
        raise SparselmError(f"an N:M pattern needs 0 < N < M, got {n}:{m}; e.g. use 2:4")
    if in_features % m:
        raise SparselmError(
            f"N:M pattern {n}:{m} needs the input dimension ({in_features}) to be a multiple "
            f"of M={m}; pick an M that divides it or leave that layer out")


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask with exactly `k` True entries at the largest `scores` (ties: lowest index)."""
    flat = scores.reshape(-1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        mask[torch.topk(flat, k, sorted=False).indices] = True
    return mask.view_as(scores)


def nm_topk_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the `n` largest scores in every group of `m` along the last dim. [O, I] -> [O, I]."""
    out_features, in_features = scores.shape
    check_nm(n, m, in_features)
    groups = scores.reshape(-1, m)  # [O*I/m, m]
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, torch.topk(groups, n, dim=1).indices, True)
    return keep.view(out_features, in_features)


def random_mask(shape: tuple[int, int], density: float, generator: torch.Generator,
                nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Uniformly random mask with exactly round(density * numel) active weights, or, with
    `nm`, exactly N active in every group of M (density is then N/M and ignored)."""
    scores = torch.rand(shape, generator=generator)  # [O, I]
    if nm is not None:
        return nm_topk_mask(scores, *nm)
    return topk_mask(scores, active_count(scores.numel(), density))


def magnitude_mask(weight: torch.Tensor, density: float,
                   nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Keep the round(density * numel) weights of largest |w| (or the N largest of every M)."""
    scores = weight.detach().abs().float()  # [O, I]
    if nm is not None:
        return nm_topk_mask(scores, *nm)
    return topk_mask(scores, active_count(scores.numel(), density))


def prune_by_magnitude(mask: torch.Tensor, weight: torch.Tensor, keep: int) -> torch.Tensor:
    """Gradual pruning step: keep the `keep` largest-|w| weights among those active in `mask`.

    Pruned weights never come back (the result is a subset of `mask`).
    """
    scores = weight.detach().abs().float().masked_fill(~mask, -1.0)  # inactive rank last
    return topk_mask(scores, min(keep, int(mask.sum())))


def drop_and_grow(mask: torch.Tensor, weight: torch.Tensor, grow_scores: torch.Tensor,
                  drop_fraction: float, generator: torch.Generator,
                  nm: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One SET/RigL mask update. Returns (new_mask, grown, dropped), all bool like `mask`.

    Drops round(drop_fraction * active) active weights of smallest |w| (a tiny random noise
    breaks ties), then grows exactly as many among the inactive connections with the largest
    `grow_scores` (|dense grad| for RigL, uniform noise for SET). Connections just dropped are
    only regrown when there are not enough other candidates (that keeps the count exact).
    With `nm`, each group of M regrows as many as it lost, so every group keeps exactly N.

    Guarantees: new_mask.sum() == mask.sum(); grown & mask is empty; dropped is a subset of
    mask; with `nm`, new_mask is a valid N:M mask if `mask` was.
    """
    if not 0.0 <= drop_fraction < 1.0:
        raise SparselmError(f"drop fraction must be in [0, 1), got {drop_fraction}; RigL uses 0.3")
    n_active = int(mask.sum())
    n_drop = int(round(drop_fraction * n_active))
    n_drop = min(n_drop, mask.numel() - n_active, n_active)
    empty = torch.zeros_like(mask)
    if n_drop == 0:
        return mask.clone(), empty, empty
    magnitude = weight.detach().abs().float()  # [O, I]
    noise = torch.rand(mask.shape, generator=generator) * (1e-9 * (float(magnitude.max()) + 1e-30))
    # Drop: smallest magnitude among active weights (inactive ones score +inf and stay out).
    drop_scores = (magnitude + noise).masked_fill(~mask, float("inf"))
    dropped = topk_mask(-drop_scores, n_drop)
    kept = mask & ~dropped
    # Grow: inactive-before connections first, just-dropped ones only as a last resort,
    # currently kept ones never. Finite sentinels keep the ordering total.
    grow = grow_scores.detach().float().abs().clone()
    grow = grow - grow.min()  # >= 0, so the sentinel -1 ranks below every real candidate
    grow[dropped] = -1.0
    grow[kept] = -2.0
    if nm is None:
        grown = topk_mask(grow, n_drop)
    else:
        n, m = nm
        per_group_lost = dropped.reshape(-1, m).sum(dim=1)  # [G]
        order = torch.argsort(grow.reshape(-1, m), dim=1, descending=True)  # [G, m]
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(m).expand_as(order).contiguous())
        grown = (rank < per_group_lost[:, None]).view_as(mask)
    new_mask = kept | grown
    return new_mask, grown & ~mask, dropped & ~grown
