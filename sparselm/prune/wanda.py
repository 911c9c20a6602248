"""Wanda: pruning by weights and activations (Sun et al. 2023, "A Simple and Effective Pruning
Approach for Large Language Models").

score_ij = |W_ij| * ||X_j||_2; weights are compared within each output row (per-output
comparison group) and no remaining weight is updated.
"""
from __future__ import annotations

import torch

from sparselm.prune.masks import Pattern, select_mask


def wanda_scores(weight: torch.Tensor, input_sq_mean: torch.Tensor) -> torch.Tensor:
    """|W| * ||X_j||: weight [R, C], input_sq_mean [C] (mean of x_j^2 over tokens) -> [R, C]."""
    return weight.float().abs() * input_sq_mean.float().sqrt().unsqueeze(0)


def wanda_prune(weight: torch.Tensor, input_sq_mean: torch.Tensor, sparsity: float,
                pattern: Pattern = Pattern()) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned weight, keep mask). Unstructured: exactly floor(sparsity * C) removed per row."""
    keep = select_mask(wanda_scores(weight, input_sq_mean), sparsity, pattern, per_row=True)
    return weight * keep, keep
