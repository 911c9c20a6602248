"""`LowRankLinear`: a linear layer stored as two thin matrices, y = B (A x) + b.

Legend: N = tokens, I = in features, O = out features, R = rank.
A rank-R factor of an [O, I] weight costs R * (I + O) parameters instead of O * I, so it only
saves memory and FLOPs when R < O * I / (O + I) (see `rank_saves_parameters`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparselm.errors import SparselmError


def break_even_rank(out_features: int, in_features: int) -> float:
    """The rank at which a factorization costs as much as the dense matrix: O*I / (O+I)."""
    return out_features * in_features / (out_features + in_features)


def rank_saves_parameters(rank: int, out_features: int, in_features: int) -> bool:
    """True when a rank-`rank` factor has strictly fewer parameters than the dense [O, I] matrix."""
    return rank * (out_features + in_features) < out_features * in_features


def check_rank(rank: int, out_features: int, in_features: int, name: str = "layer") -> None:
    """Raise SparselmError unless 1 <= rank <= min(O, I) (a larger rank cannot exist)."""
    if not isinstance(rank, int) or rank < 1:
        raise SparselmError(f"rank {rank!r} for {name} must be a positive integer; pass a rank >= 1")
    if rank > min(out_features, in_features):
        raise SparselmError(
            f"rank {rank} for {name} is larger than its [{out_features}, {in_features}] weight allows "
            f"(at most {min(out_features, in_features)}); pass a smaller rank")


class LowRankLinear(nn.Module):
    """y = x A^T B^T + bias with A: [R, I] and B: [O, R]; a drop-in for `nn.Linear(I, O)`.

    Parameters are named `weight_a`, `weight_b` and `bias` (bias is None when the replaced
    layer had none), so a saved state dict round-trips through `load_lowrank`.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        check_rank(rank, out_features, in_features)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        kw = {"device": device, "dtype": dtype}
        self.weight_a = nn.Parameter(torch.empty(rank, in_features, **kw))  # [R, I]
        self.weight_b = nn.Parameter(torch.empty(out_features, rank, **kw))  # [O, R]
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        # Fresh layers (built by the loader before weights arrive) get a sane init anyway.
        nn.init.normal_(self.weight_a, std=in_features ** -0.5)
        nn.init.normal_(self.weight_b, std=rank ** -0.5)

    @classmethod
    def from_factors(cls, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> "LowRankLinear":
        """Wrap factors A [R, I] and B [O, R] (copied) and an optional bias [O]."""
        rank, in_features = a.shape
        out_features, rank_b = b.shape
        if rank_b != rank:
            raise SparselmError(f"factor shapes do not match: A is {tuple(a.shape)}, B is {tuple(b.shape)}; "
                                "B must be [out, rank] for A [rank, in]")
        layer = cls(in_features, out_features, rank, bias=bias is not None, device=a.device, dtype=a.dtype)
        with torch.no_grad():
            layer.weight_a.copy_(a)
            layer.weight_b.copy_(b)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.weight_a), self.weight_b, self.bias)  # [N, R] -> [N, O]

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense weight B @ A, [O, I]."""
        return self.weight_b @ self.weight_a

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")
