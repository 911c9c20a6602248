"""Refit the kept weights of a pruned layer to its dense output, given the mask.

Solves, for every row r independently, the masked least-squares problem

    min_w (w - w0)^T H (w - w0)   subject to  w_j = 0 where the mask removes j,

which is ||W X - W0 X||^2 up to a constant for H = (2/n) X X^T (the layer-wise objective of
SparseGPT and OBS; cf. Boza 2024, "Fast and Optimal Weight Update for Pruned Large Language
Models"). SparseGPT only updates columns to the right of each pruned weight; this solve
updates every kept weight, so the layer error can only go down. Batched conjugate gradients
over rows (one [R, C] x [C, C] product per iteration), warm-started from the given weights.
"""
from __future__ import annotations

import torch


def refine_kept_weights(weight: torch.Tensor, dense: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor,
                        iters: int = 50, percdamp: float = 0.01, tol: float = 1e-6) -> torch.Tensor:
    """Weights [R, C] with the same zeros as `keep`, minimising the masked layer error.

    weight: start point (already masked), dense: the original W0, hessian: H [C, C], keep: bool [R, C].
    A small dampening (`percdamp` x mean diag H) keeps the problem well conditioned, as in SparseGPT.
    """
    H = hessian.float().clone()
    H.diagonal().add_(percdamp * H.diagonal().mean())
    mask = keep.float()  # [R, C]
    W0 = dense.float()
    W = weight.float() * mask  # [R, C]
    r = -((W - W0) @ H) * mask  # residual = -gradient / 2, restricted to kept entries
    p = r.clone()
    rs = (r * r).sum(1)  # [R]
    rs0 = rs.clone()
    for _ in range(iters):
        Ap = (p @ H) * mask  # [R, C]
        denom = (p * Ap).sum(1)
        alpha = torch.where(denom > 0, rs / denom.clamp_min(1e-30), torch.zeros_like(rs))  # [R]
        W += alpha.unsqueeze(1) * p
        r -= alpha.unsqueeze(1) * Ap
        rs_new = (r * r).sum(1)
        if bool((rs_new <= tol * tol * rs0.clamp_min(1e-30)).all()):
            break
        beta = torch.where(rs > 0, rs_new / rs.clamp_min(1e-30), torch.zeros_like(rs))
        p = r + beta.unsqueeze(1) * p
        rs = rs_new
    return (W * mask).to(weight.dtype)


def layer_error(weight: torch.Tensor, dense: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - W0) H (W - W0)^T) = (2/n) ||W X - W0 X||_F^2 for H = (2/n) X X^T."""
    d = (weight.float() - dense.float())
    return float(((d @ hessian.float()) * d).sum())
