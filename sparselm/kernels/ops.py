"""Sparse x dense products: the public kernel entry points.

Each function takes x of shape [B, in_features] (fp32 or bf16; bf16 is widened to fp32 once,
which costs little next to the weights), runs the C++ kernel when the extension is built and
the pure-PyTorch reference otherwise, and returns [B, out_features] in x's dtype with the
same value as `x @ W.T` for the dense weight W the packed tensors encode, accumulated in fp32.
Other dtypes (fp16, fp64) always take the reference path.
"""
from __future__ import annotations

import torch

from sparselm.errors import SparselmError
from sparselm.kernels import reference
from sparselm.kernels.extension import load_extension

_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _kernel_for(x: torch.Tensor, values: torch.Tensor):
    """The extension if it can run this call (CPU, fp32/bf16), else None."""
    if x.device.type != "cpu" or values.device.type != "cpu":
        return None
    if x.dtype not in _KERNEL_DTYPES or values.dtype not in _KERNEL_DTYPES:
        return None
    return load_extension()


def _check_x(x: torch.Tensor, in_features: int, what: str) -> None:
    if x.dim() != 2 or x.shape[1] != in_features:
        raise SparselmError(
            f"{what}: expected input of shape [batch, {in_features}], got {list(x.shape)}; "
            "flatten leading dimensions first (SparseLinear does this for you)")


def _finish(y32: torch.Tensor, bias, dtype) -> torch.Tensor:
    # Add the bias before rounding to x's dtype, as dense F.linear does.
    if bias is not None:
        y32 = y32 + bias.float()
    return y32.to(dtype)


def csr_matmul(x, crow_indices, col_indices, values, in_features: int, out_features: int, bias=None) -> torch.Tensor:
    """x [B, K] @ W.T (+ bias) for a CSR-packed W [N, K] (int16 or int32 column indices)."""
    _check_x(x, in_features, "csr_matmul")
    ext = _kernel_for(x, values)
    if ext is None:
        dense = reference.dense_from_csr(crow_indices, col_indices, values, in_features, out_features)
        return _finish(reference.dense_linear_fp32(x, dense), bias, x.dtype)
    return ext.csr_linear(x, crow_indices, col_indices, values, bias, in_features, out_features)


def bitmask_matmul(x, mask, row_offsets, values, in_features: int, out_features: int, bias=None) -> torch.Tensor:
    """x [B, K] @ W.T (+ bias) for a bitmask + packed-values W [N, K]."""
    _check_x(x, in_features, "bitmask_matmul")
    ext = _kernel_for(x, values)
    if ext is None:
        dense = reference.dense_from_bitmask(mask, row_offsets, values, in_features, out_features)
        return _finish(reference.dense_linear_fp32(x, dense), bias, x.dtype)
    return ext.bitmask_linear(x, mask, row_offsets, values, bias, in_features, out_features)


def nm_matmul(x, indices, values, n: int, m: int, in_features: int, bias=None) -> torch.Tensor:
    """x [B, K] @ W.T (+ bias) for an N:M-compressed W [N, K] (values + in-group indices)."""
    _check_x(x, in_features, "nm_matmul")
    ext = _kernel_for(x, values)
    if ext is None:
        dense = reference.dense_from_nm(indices, values, n, m, in_features)
        return _finish(reference.dense_linear_fp32(x, dense), bias, x.dtype)
    return ext.nm_linear(x, indices, values, bias, n, m, in_features)


def act_sparse_gemv(x: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """x @ w_t for a decode step, reading only the rows of w_t whose x entry is non-zero.

    x: [in_features] or [1, in_features]; w_t: W transposed and contiguous,
    [in_features, out_features] (so the rows selected by the non-zero inputs are contiguous).
    Returns [out_features] (or [1, out_features] for 2-D x) in x's dtype, fp32 accumulation.
    Cost is proportional to the number of non-zero inputs (issue 7, TEAL-style decoding).
    """
    squeeze = x.dim() == 1
    if x.dim() == 2 and x.shape[0] == 1:
        x1 = x[0]
    elif x.dim() == 1:
        x1 = x
    else:
        raise SparselmError(
            f"act_sparse_gemv: x must be [in_features] or [1, in_features], got {list(x.shape)}; "
            "it is a batch-1 decode kernel, use x @ w_t for larger batches")
    if w_t.dim() != 2 or w_t.shape[0] != x1.shape[0]:
        raise SparselmError(
            f"act_sparse_gemv: w_t must be [in_features={x1.shape[0]}, out_features], got "
            f"{list(w_t.shape)}; pass the weight transposed (weight.t().contiguous())")
    ext = _kernel_for(x1, w_t)
    if ext is None or not w_t.is_contiguous():
        y = reference.act_sparse_gemv_reference(x1, w_t)
    else:
        y = ext.act_sparse_gemv(x1, w_t)
    y = y.to(x.dtype)  # [N]
    return y if squeeze else y.unsqueeze(0)


def dense_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Dense x [1, K] @ W.T with the extension's threads: the same-thread-count baseline.

    Falls back to `x @ W.T` without the extension.
    """
    _check_x(x, weight.shape[1], "dense_gemv")
    ext = _kernel_for(x, weight)
    if ext is None or x.shape[0] != 1 or not weight.is_contiguous():
        return (x.float() @ weight.float().t()).to(x.dtype)
    return ext.dense_gemv(x, weight)
