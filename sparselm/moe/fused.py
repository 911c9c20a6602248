"""Fused element-wise steps of MoE dispatch, with a pure-PyTorch path of the same value.

- `swiglu(h_A2F)`: silu(gate) * up for h = [gate | up] rows, and its backward
  (`swiglu_backward`), each one pass (`swiglu` is differentiable as `SwiGLUFn`).
- `rows_sum(src_AD, rows_TK, weights_TK)`: out[t] = sum_k w[t, k] * src[rows[t, k]], the
  combine of each token's K expert outputs (and, unweighted, the backward of gathering a
  token's row into its K slots). Differentiable with respect to src and the weights, for
  rows that use each source row at most once (dropless top-k: the rows are a permutation).

The C++ kernels (sparselm/kernels/csrc/moe_kernels.cpp) run for fp32 / bf16 CPU tensors when
the extension is built with AVX-512 or AVX2; they compute in fp32 and round once. Elsewhere
(other dtypes, GPUs, no extension) the same values come from PyTorch ops, several passes each.
Measured on the issue's dispatch shapes (benchmarks/bench_moe_dispatch.py), the PyTorch
versions of these steps took 15-30% of a forward + backward step (fp32-bf16).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sparselm.kernels.extension import load_extension


def fused_kernels(t: torch.Tensor):
    """The extension when its MoE kernels can run on `t`, else None."""
    if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.bfloat16):
        return None
    ext = load_extension()
    # Vector builds only (16 or 8 lanes): portable builds compute exp one value at a time, which
    # is slower than PyTorch's own vectorised ops.
    if ext is None or ext.compiled_simd() not in ("avx512", "avx2"):
        return None
    return ext


def swiglu(h_A2F: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(h[:, :F]) * h[:, F:] -> [A, F] (no autograd; see `SwiGLUFn`), written into `out`
    (contiguous, [A, F]) when given."""
    ext = fused_kernels(h_A2F)
    if ext is not None:
        return ext.swiglu_forward(h_A2F, out)
    gate_AF, up_AF = h_A2F.chunk(2, dim=-1)
    if out is None:
        return F.silu(gate_AF) * up_AF
    return torch.mul(F.silu(gate_AF), up_AF, out=out)


def swiglu_backward(h_A2F: torch.Tensor, grad_act_AF: torch.Tensor,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """d loss / d h for act = swiglu(h), given d loss / d act -> [A, 2F] (written into `out`, a
    contiguous tensor like h, when given)."""
    ext = fused_kernels(h_A2F)
    if ext is not None:
        return ext.swiglu_backward(h_A2F, grad_act_AF, out)
    # Four passes (PyTorch's own silu backward for the gate half): on a GPU each is a kernel
    # over [A, F], and writing the derivative out term by term took nine.
    hidden = h_A2F.shape[-1] // 2
    gate_AF, up_AF = h_A2F[:, :hidden], h_A2F[:, hidden:]
    grad_h_A2F = torch.empty_like(h_A2F) if out is None else out
    torch.mul(grad_act_AF, F.silu(gate_AF), out=grad_h_A2F[:, hidden:])  # d up = d act * silu(g)
    # d gate = (d act * up) * silu'(g)
    torch.ops.aten.silu_backward.grad_input(grad_act_AF * up_AF, gate_AF, grad_input=grad_h_A2F[:, :hidden])
    return grad_h_A2F


class SwiGLUFn(torch.autograd.Function):
    """act = swiglu(h) with the one-pass backward."""

    @staticmethod
    def forward(ctx, h_A2F):
        h_A2F = h_A2F.contiguous()
        ctx.save_for_backward(h_A2F)
        return swiglu(h_A2F)

    @staticmethod
    def backward(ctx, grad_act_AF):
        (h_A2F,) = ctx.saved_tensors
        return swiglu_backward(h_A2F, grad_act_AF.contiguous())


class RowsSumFn(torch.autograd.Function):
    """out[t] = sum_k w[t, k] * src[rows[t, k]]; rows [T, K] must not repeat a source row."""

    @staticmethod
    def forward(ctx, src_AD, rows_TK, weights_TK):
        ctx.save_for_backward(src_AD, rows_TK, weights_TK)
        ext = fused_kernels(src_AD)
        if ext is not None:
            return ext.rows_sum(src_AD, rows_TK, weights_TK)
        picked_TKD = src_AD[rows_TK]
        if weights_TK is not None:
            picked_TKD = picked_TKD * weights_TK.to(src_AD.dtype)[..., None]
        return picked_TKD.sum(dim=1)

    @staticmethod
    def backward(ctx, grad_TD):
        src_AD, rows_TK, weights_TK = ctx.saved_tensors
        want_weights = weights_TK is not None and ctx.needs_input_grad[2]
        ext = fused_kernels(src_AD)
        if ext is not None:
            grad_src, grad_w = ext.rows_sum_backward(src_AD, rows_TK, weights_TK, grad_TD, want_weights)
        else:
            grad_TKD = grad_TD[:, None, :].expand(-1, rows_TK.shape[1], -1)
            if weights_TK is not None:
                grad_TKD = grad_TKD * weights_TK.to(grad_TD.dtype)[..., None]
            grad_src = torch.zeros_like(src_AD).index_put_((rows_TK.reshape(-1),),
                                                           grad_TKD.reshape(-1, src_AD.shape[1]))
            grad_w = (src_AD[rows_TK] * grad_TD[:, None, :]).sum(-1) if want_weights else None
        if grad_w is not None:
            grad_w = grad_w.to(weights_TK.dtype)
        return grad_src, None, grad_w


def rows_sum(src_AD: torch.Tensor, rows_TK: torch.Tensor, weights_TK: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k weights[t, k] * src[rows[t, k]] -> [T, D], differentiable (see `RowsSumFn`)."""
    return RowsSumFn.apply(src_AD, rows_TK, weights_TK)
