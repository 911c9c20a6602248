"""A linear layer that skips the weight rows of zero inputs at decode (TEAL-style execution).

The weight is stored transposed and contiguous, w_t = W^T with shape [in, out], so the
rows belonging to the non-zero inputs are contiguous runs of memory: at batch 1 the
product reads only those rows (`sparselm.kernels.act_sparse_gemv`, C++/OpenMP, or the
pure-PyTorch gather below), which is what turns activation sparsity into decode speed.
Inputs with |x| <= threshold are zeroed first; several tokens go through a dense matmul.
"""
from __future__ import annotations

import torch
from torch import nn

from sparselm.errors import SparselmError


def gather_gemv(x: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """x @ w_t reading only the rows of w_t where x != 0. x: [in], w_t: [in, out] -> [out]."""
    nonzero = x.nonzero().squeeze(1)  # [K]
    return (x[nonzero].float() @ w_t[nonzero].float()).to(x.dtype)  # [out]


def _decode_gemv():
    try:
        from sparselm.kernels import act_sparse_gemv
        return act_sparse_gemv
    except ImportError:  # kernels package absent: the pure-PyTorch gather is exact too
        return gather_gemv


class ActivationSparseLinear(nn.Module):
    """y = sparsify(x) @ w_t + b, with sparsify(x) = x * (|x| > threshold).

    decode_only: leave multi-token inputs (prefill) dense, sparsify single tokens only.
    Guarantee: equals the dense linear applied to the thresholded input (fp32 accumulation).
    """

    def __init__(self, w_t: torch.Tensor, bias: torch.Tensor | None, threshold: float, decode_only: bool = False):
        super().__init__()
        if w_t.dim() != 2:
            raise SparselmError(f"ActivationSparseLinear needs a 2-D weight, got shape {list(w_t.shape)}")
        self.register_buffer("w_t", w_t.detach().contiguous())  # [in, out]
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.threshold = float(threshold)
        self.decode_only = decode_only
        self._gemv = _decode_gemv()

    @classmethod
    def from_linear(cls, module: nn.Module, threshold: float, decode_only: bool = False) -> "ActivationSparseLinear":
        """From an nn.Linear ([out, in] weight) or a transformers Conv1D (already [in, out])."""
        w_t = module.weight.t() if isinstance(module, nn.Linear) else module.weight
        return cls(w_t, module.bias, threshold, decode_only)

    @property
    def in_features(self) -> int:
        return self.w_t.shape[0]

    @property
    def out_features(self) -> int:
        return self.w_t.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // x.shape[-1]
        if not (self.decode_only and tokens > 1):
            x = x * (x.abs() > self.threshold)  # [..., in]
        if tokens == 1:
            y = self._gemv(x.reshape(-1), self.w_t).reshape(*x.shape[:-1], self.out_features)  # [..., out]
        else:
            y = x @ self.w_t  # [..., out]
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"threshold={self.threshold:.4g}, decode_only={self.decode_only}")
