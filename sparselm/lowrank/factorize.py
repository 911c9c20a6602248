"""Low-rank factorizations of one weight matrix: plain SVD, ASVD and whitened SVD (SVD-LLM).

Legend: O = out features, I = in features, K = min(O, I), R = kept rank, N = tokens.

Every method returns a `Decomposition` W ~= U diag(S) Vt in which U is [O, K], S is [K] sorted
descending and Vt is [K, I] with any input scaling already undone, so truncating to rank R is
just slicing, and the rank-K product reproduces W up to float rounding. The order of S is what
each method considers important:

- plain SVD (Eckart-Young): minimises ||W - W_R||_F.
- ASVD (Yuan et al. 2023, "ASVD: Activation-aware Singular Value Decomposition", eq. 3-5):
  scale column j of W by s_j = mean|x_j|^alpha (alpha = 0.5), take the SVD, undo the scale in Vt.
- whitened SVD (Wang et al. 2024, "SVD-LLM", sec. 3.1): with the Cholesky factor L of the input
  second moment X^T X, the truncation loss ||(W - W_R) X||_F^2 equals the sum of the discarded
  squared singular values of W L, so truncating the SVD of W L is optimal for the layer's output.
  Vt is V^T L^-1. Computed in float64; when X^T X is not positive definite it is shifted by
  (-lambda_min + 1e-6) I first (the SVD-LLM fix).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from sparselm.errors import SparselmError
from sparselm.lowrank.linear import check_rank

METHODS = ("svd", "asvd", "whiten")


@dataclass
class Decomposition:
    """W ~= U diag(S) Vt, in float64; `factors(R)` gives the thin matrices of rank R."""

    u: torch.Tensor  # [O, K]
    s: torch.Tensor  # [K], descending
    vt: torch.Tensor  # [K, I], input scaling undone

    @property
    def shape(self) -> tuple[int, int]:
        return self.u.shape[0], self.vt.shape[1]

    def factors(self, rank: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """A [R, I] and B [O, R] with B @ A the rank-R truncation; sqrt(S) is split into both
        so neither factor carries all of the scale (as SVD-LLM does)."""
        out_features, in_features = self.shape
        check_rank(rank, out_features, in_features)
        root = self.s[:rank].sqrt()  # [R]
        a = root[:, None] * self.vt[:rank]  # [R, I]
        b = self.u[:, :rank] * root[None, :]  # [O, R]
        return a.to(dtype), b.to(dtype)


def svd_decomposition(weight: torch.Tensor) -> Decomposition:
    """Plain SVD of an [O, I] weight."""
    u, s, vt = torch.linalg.svd(weight.detach().double(), full_matrices=False)  # [O,K] [K] [K,I]
    return Decomposition(u, s, vt)


def asvd_decomposition(weight: torch.Tensor, mean_abs_input: torch.Tensor, alpha: float = 0.5) -> Decomposition:
    """ASVD: SVD of W diag(s), s_j = mean|x_j|^alpha, then Vt diag(1/s).

    `mean_abs_input` is [I], the mean absolute value of each input feature on calibration data.
    Features that never fire get a tiny floor so the scaling stays invertible.
    """
    w = weight.detach().double()  # [O, I]
    if mean_abs_input.shape != (w.shape[1],):
        raise SparselmError(f"ASVD statistics have shape {tuple(mean_abs_input.shape)}, expected ({w.shape[1]},); "
                            "collect them on the inputs of this layer")
    scale = mean_abs_input.double().clamp_min(0).pow(alpha)  # [I]
    scale = scale.clamp_min(max(scale.max().item(), 1e-12) * 1e-6)
    u, s, vt = torch.linalg.svd(w * scale[None, :], full_matrices=False)
    return Decomposition(u, s, vt / scale[None, :])


def whitening_factor(gram: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor L of the [I, I] input second moment, L L^T = X^T X / N (float64).

    If the matrix is not positive definite (dead or collinear inputs, too few tokens) it is
    shifted by (-lambda_min + 1e-6) I, as SVD-LLM does, and the shift is grown if rounding
    still defeats the factorization.
    """
    c = gram.detach().double()
    c = (c + c.T) / 2  # accumulated sums can be asymmetric by rounding
    factor, info = torch.linalg.cholesky_ex(c)
    if info.item() == 0:
        return factor
    shift = -torch.linalg.eigvalsh(c).min().item() + 1e-6
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    for _ in range(8):
        factor, info = torch.linalg.cholesky_ex(c + shift * eye)
        if info.item() == 0:
            return factor
        shift = max(shift * 10, 1e-6)
    raise SparselmError("the input second moment could not be made positive definite; "
                        "check the calibration data for NaN or infinite activations")


def whitened_decomposition(weight: torch.Tensor, gram: torch.Tensor) -> Decomposition:
    """SVD-LLM: SVD of W L with L the Cholesky factor of `gram` ([I, I], X^T X / N); Vt = V^T L^-1."""
    w = weight.detach().double()  # [O, I]
    if gram.shape != (w.shape[1], w.shape[1]):
        raise SparselmError(f"whitening statistics have shape {tuple(gram.shape)}, expected "
                            f"({w.shape[1]}, {w.shape[1]}); collect them on the inputs of this layer")
    lower = whitening_factor(gram)  # [I, I]
    u, s, vt = torch.linalg.svd(w @ lower, full_matrices=False)
    # Vt L^-1 without forming an inverse: solve Y L = Vt for Y.
    unwhitened = torch.linalg.solve_triangular(lower, vt, upper=False, left=False)  # [K, I]
    if not torch.isfinite(unwhitened).all():
        warnings.warn("whitened SVD produced non-finite factors; falling back to plain SVD for this layer")
        return svd_decomposition(weight)
    return Decomposition(u, s, unwhitened)


def decompose(weight: torch.Tensor, method: str, *, gram: torch.Tensor | None = None,
              mean_abs_input: torch.Tensor | None = None, alpha: float = 0.5) -> Decomposition:
    """Dispatch on `method` in {"svd", "asvd", "whiten"}; raises if its statistics are missing."""
    if method == "svd":
        return svd_decomposition(weight)
    if method == "asvd":
        if mean_abs_input is None:
            raise SparselmError("method 'asvd' needs activation statistics; pass calibration data")
        return asvd_decomposition(weight, mean_abs_input, alpha)
    if method == "whiten":
        if gram is None:
            raise SparselmError("method 'whiten' needs activation statistics; pass calibration data")
        return whitened_decomposition(weight, gram)
    raise SparselmError(f"unknown low-rank method {method!r}; choose one of {', '.join(METHODS)}")
