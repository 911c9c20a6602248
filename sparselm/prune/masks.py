"""Mask selection from importance scores: per row, per matrix, and N:M.

Conventions used everywhere in sparselm:
- masks are boolean *keep* masks (True = the weight survives);
- `sparsity` is the fraction of weights removed, in [0, 1);
- an N:M pattern keeps at most N non-zeros in every group of M consecutive input columns
  of a row (2:4 keeps two, so every group of four holds two zeros), as in NVIDIA's
  "2:4 structured sparsity" (Mishra et al. 2021). N < M is required.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from sparselm.errors import SparselmError


@dataclass(frozen=True)
class Pattern:
    """`unstructured`, or N:M with `n` kept out of every `m`."""

    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def sparsity(self) -> float:
        return 1 - self.n / self.m if self.is_nm else float("nan")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"


def parse_pattern(pattern: str | Pattern | None) -> Pattern:
    if isinstance(pattern, Pattern):
        return pattern
    if pattern is None or str(pattern).lower() in ("", "unstructured", "none"):
        return Pattern()
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not match:
        raise SparselmError(f"unknown sparsity pattern {pattern!r}; use 'unstructured' or N:M such as '2:4'")
    n, m = int(match.group(1)), int(match.group(2))
    if m <= 0 or n <= 0 or n >= m:
        raise SparselmError(f"N:M pattern {pattern!r} needs 0 < N < M (N weights kept of every M); e.g. '2:4'")
    return Pattern(n, m)


def check_sparsity(sparsity: float) -> float:
    if not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise SparselmError(f"sparsity must be in [0, 1) (the fraction of weights removed); got {sparsity!r}")
    return float(sparsity)


def check_nm_width(pattern: Pattern, in_features: int, name: str = "layer") -> None:
    if pattern.is_nm and in_features % pattern.m:
        raise SparselmError(f"{name}: input width {in_features} is not divisible by M={pattern.m} of the "
                            f"{pattern} pattern; choose an M that divides it or prune unstructured")


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep mask removing exactly floor(sparsity * cols) lowest-scoring weights of every row. [R, C] -> [R, C]."""
    rows, cols = scores.shape
    k = int(sparsity * cols)  # removed per row, rounded down
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        idx = torch.topk(scores, k, dim=1, largest=False).indices  # [R, k]
        keep.scatter_(1, idx, False)
    return keep


def matrix_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep mask removing exactly floor(sparsity * numel) lowest scores of the whole matrix."""
    k = int(sparsity * scores.numel())
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        keep[torch.topk(scores.flatten(), k, largest=False).indices] = False
    return keep.view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep mask with the `n` highest scores kept in every group of `m` consecutive columns of a row."""
    rows, cols = scores.shape
    if cols % m:
        raise SparselmError(f"N:M mask needs the column count ({cols}) divisible by M={m}")
    groups = scores.reshape(rows, cols // m, m)  # [R, G, M]
    idx = torch.topk(groups, n, dim=2).indices  # [R, G, n]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return keep.view(rows, cols)


def select_mask(scores: torch.Tensor, sparsity: float, pattern: Pattern, per_row: bool = True) -> torch.Tensor:
    """N:M mask when the pattern is N:M, else a per-row (or whole-matrix) unstructured mask."""
    if pattern.is_nm:
        return nm_mask(scores, pattern.n, pattern.m)
    return row_mask(scores, sparsity) if per_row else matrix_mask(scores, sparsity)


def is_valid_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of `m` consecutive columns of every row has at most `n` non-zeros."""
    rows, cols = weight.shape
    return bool(((weight.reshape(rows, cols // m, m) != 0).sum(-1) <= n).all())
