"""OWL: outlier-weighted layerwise sparsity (Yin et al. 2023, "Outlier Weighed Layerwise
Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs to High Sparsity").

Blocks with more outlier activations-times-weights get lower sparsity. Per decoder block,
the Wanda scores of all its linear layers are concatenated; the outlier ratio is the fraction
of scores above `threshold_m` times the block's mean score, measured on the dense model.
Ratios are min-max normalised to [0, 2*lambda], centred, and subtracted from the target
sparsity, so block sparsities lie in S +- lambda and average to S.
"""
from __future__ import annotations

import torch

from sparselm.errors import SparselmError


def outlier_ratio(block_scores: list[torch.Tensor], threshold_m: float = 5.0) -> float:
    """Fraction of all scores of one block above threshold_m x their mean."""
    flat = torch.cat([s.flatten().float() for s in block_scores])
    return (flat > threshold_m * flat.mean()).float().mean().item()


def owl_sparsities(ratios: list[float], target: float, lam: float = 0.08, weights: list[float] | None = None) -> list[float]:
    """Per-block sparsities from outlier ratios: S - (normalised ratio - its mean), in S +- lambda.

    With `weights` (parameters per block), the centring is weighted so the parameter-weighted
    mean sparsity equals the target exactly.
    """
    if not 0 <= lam < 0.5:
        raise SparselmError(f"OWL lambda must be in [0, 0.5); got {lam}")
    r = torch.tensor(ratios, dtype=torch.float64)
    span = r.max() - r.min()
    norm = (r - r.min()) / span * 2 * lam if span > 0 else torch.zeros_like(r)  # [0, 2*lambda]
    w = torch.ones_like(r) if weights is None else torch.tensor(weights, dtype=torch.float64)
    norm = norm - (norm * w).sum() / w.sum()
    sparsities = (target - norm).clamp(0.0, 0.99)
    return sparsities.tolist()
