"""Running input statistics of a linear layer, fed by forward hooks.

Both accumulate in float32 as running means over calibration tokens, so the result does not
depend on how the tokens were batched.
"""
from __future__ import annotations

import torch


def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).float()  # [T, C]


class InputNormAccumulator:
    """Mean over tokens of x_j^2 per input column j (Wanda's ||X_j||_2^2 / n_tokens)."""

    def __init__(self, columns: int, device=None):
        self.sq_mean = torch.zeros(columns, dtype=torch.float32, device=device)  # [C]
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = _tokens(x)
        t = x.shape[0]
        self.sq_mean.mul_(self.tokens / (self.tokens + t)).add_(x.pow(2).sum(0) / (self.tokens + t))
        self.tokens += t

    @property
    def norms(self) -> torch.Tensor:
        """||X_j||_2 up to the constant sqrt(n_tokens), which no per-row comparison depends on."""
        return self.sq_mean.sqrt()


class HessianAccumulator:
    """H = (2/n) X X^T over all n calibration tokens, as a running average (SparseGPT, eq. 1)."""

    def __init__(self, columns: int, device=None):
        self.hessian = torch.zeros(columns, columns, dtype=torch.float32, device=device)  # [C, C]
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = _tokens(x)  # [T, C]
        t = x.shape[0]
        self.hessian.mul_(self.tokens / (self.tokens + t))
        self.tokens += t
        x = x * (2.0 / self.tokens) ** 0.5
        self.hessian.addmm_(x.t(), x)  # += (2/n) x^T x

    @property
    def sq_mean(self) -> torch.Tensor:
        """Mean of x_j^2 per column, the diagonal of H / 2: Wanda's statistic comes for free."""
        return self.hessian.diagonal() / 2
