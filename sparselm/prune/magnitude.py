"""Magnitude pruning: remove the weights of smallest |W| (Han et al. 2015; Zhu & Gupta 2017).

Per layer (each linear layer loses the same fraction, compared across the whole matrix) or
global (one threshold across all prunable layers of the model).
"""
from __future__ import annotations

import torch

from sparselm.prune.masks import Pattern, select_mask


def magnitude_prune(weight: torch.Tensor, sparsity: float, pattern: Pattern = Pattern()) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned weight, keep mask); unstructured selection over the whole matrix."""
    keep = select_mask(weight.float().abs(), sparsity, pattern, per_row=False)
    return weight * keep, keep


def global_magnitude_threshold(weights: list[torch.Tensor], sparsity: float) -> float:
    """The |w| below which `sparsity` of all weights (of all layers together) lie."""
    flat = torch.cat([w.detach().abs().flatten().float() for w in weights])
    k = int(sparsity * flat.numel())
    if k == 0:
        return float("-inf")
    return torch.kthvalue(flat, k).values.item()
