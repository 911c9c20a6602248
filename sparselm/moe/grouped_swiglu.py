"""Grouped SwiGLU: E expert MLPs over contiguous row groups, with a hand-written backward.

Rows x_AD [A, D] are sorted by expert; expert e owns the rows counts[0..e-1] .. +counts[e].
    h_A2F = [x_e W_gate_up[e]^T for each group]      # [A, 2F]
    act_AF = silu(h_gate) * h_up                      # [A, F], one pass over all experts (fused.py)
    y_AD = [act_e W_down[e]^T for each group]         # [A, D]
Why a custom autograd function instead of a Python loop of `F.linear` calls: autograd
would, per expert, slice the inputs (slice backward allocates a full [A, D] zero tensor),
index the weights (select backward allocates a full [E, ...] zero tensor) and
concatenate the outputs and the gate/up halves (a copy each way). Here every matmul
writes straight into a preallocated buffer with `torch.mm(..., out=...)`, the
element-wise SwiGLU runs once over all experts, and the backward does the same, so the
cost is the matmuls plus a few passes over [A, F].

Backward (per group, with g = h_gate, u = h_up, s = sigmoid(g)):
    d act = dy W_down[e]            dW_down[e] = dy^T act
    d u   = d act * g * s           d g = d act * u * s * (1 + g (1 - s))
    dx    = dh W_gate_up[e]         dW_gate_up[e] = dh^T x
First derivatives only (no double backward).
"""
from __future__ import annotations

import torch

from sparselm.moe.buffers import reusable
from sparselm.moe.fused import fused_kernels, swiglu, swiglu_backward


def _products(like: torch.Tensor, counts: list[int], dim: int, hidden: int):
    """A function running a list of (a, b, out) products out = a @ b: where the C++ kernels run
    and several threads pay off, the products go to different threads, each single-threaded
    (`mm_many`); else one after the other, each on all threads."""
    ext = fused_kernels(like)
    threads = ext.moe_parallel_experts(counts, dim, hidden) if ext is not None else 1
    if threads > 1:
        def run(triples):
            if triples:
                a, b, out = zip(*triples)
                ext.mm_many(list(a), list(b), list(out), threads)
        return run

    def run_serial(triples):
        for a, b, out in triples:
            torch.mm(a, b, out=out)
    return run_serial


def _groups(counts: list[int]):
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, start + n
        start += n


class GroupedSwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_AD, gate_up_E2FD, down_EDF, counts):
        num_rows, dim = x_AD.shape
        hidden = down_EDF.shape[-1]
        x_AD = x_AD.contiguous()
        run = _products(x_AD, counts, dim, hidden)
        # Reused storage (buffers.py): a fresh CPU tensor of this size is paged in every step.
        h_A2F = reusable("grouped_swiglu.h", (num_rows, 2 * hidden), x_AD)
        run([(x_AD[a:b], gate_up_E2FD[e].t(), h_A2F[a:b]) for e, a, b in _groups(counts)])  # [n, 2F] each
        # [A, F], one fused pass where the C++ kernels run
        act_AF = swiglu(h_A2F, out=reusable("grouped_swiglu.act", (num_rows, hidden), x_AD))
        y_AD = reusable("grouped_swiglu.y", (num_rows, dim), x_AD)
        run([(act_AF[a:b], down_EDF[e].t(), y_AD[a:b]) for e, a, b in _groups(counts)])  # [n, D] each
        ctx.save_for_backward(x_AD, gate_up_E2FD, down_EDF, h_A2F, act_AF)
        ctx.counts = counts
        return y_AD

    @staticmethod
    def backward(ctx, grad_y_AD):
        x_AD, gate_up_E2FD, down_EDF, h_A2F, act_AF = ctx.saved_tensors
        counts = ctx.counts
        grad_y_AD = grad_y_AD.contiguous()
        want_x, want_gate_up, want_down = ctx.needs_input_grad[:3]

        run = _products(x_AD, counts, x_AD.shape[1], down_EDF.shape[-1])

        grad_act_AF = reusable("grouped_swiglu.grad_act", tuple(act_AF.shape), act_AF)
        grad_down = _zero_unused("grouped_swiglu.grad_down", down_EDF, counts) if want_down else None
        products = []
        for e, a, b in _groups(counts):
            products.append((grad_y_AD[a:b], down_EDF[e], grad_act_AF[a:b]))  # [n, F]
            if want_down:
                products.append((grad_y_AD[a:b].t(), act_AF[a:b], grad_down[e]))  # [D, F]
        run(products)

        grad_h_A2F = swiglu_backward(h_A2F, grad_act_AF,
                                     out=reusable("grouped_swiglu.grad_h", tuple(h_A2F.shape), h_A2F))  # [A, 2F]
        del grad_act_AF

        grad_x = reusable("grouped_swiglu.grad_x", tuple(x_AD.shape), x_AD) if want_x else None
        grad_gate_up = _zero_unused("grouped_swiglu.grad_gate_up", gate_up_E2FD, counts) if want_gate_up else None
        products = []
        for e, a, b in _groups(counts):
            if want_x:
                products.append((grad_h_A2F[a:b], gate_up_E2FD[e], grad_x[a:b]))  # [n, D]
            if want_gate_up:
                products.append((grad_h_A2F[a:b].t(), x_AD[a:b], grad_gate_up[e]))  # [2F, D]
        run(products)
        if want_x and sum(counts) < x_AD.shape[0]:
            grad_x[sum(counts):].zero_()
        return grad_x, grad_gate_up, grad_down, None


def _zero_unused(name: str, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Gradient buffer for stacked weights (reused storage where nothing holds it any more:
    not a parameter's .grad, not an optimizer's copy): experts without rows get exact zeros."""
    grad = reusable(name, tuple(weight.shape), weight)
    for e, n in enumerate(counts):
        if not n:
            grad[e].zero_()
    return grad


def grouped_swiglu(x_AD: torch.Tensor, gate_up_E2FD: torch.Tensor, down_EDF: torch.Tensor,
                   counts: list[int]) -> torch.Tensor:
    """Expert e's SwiGLU on its group of rows; rows sorted by expert -> [A, D]."""
    if sum(counts) != x_AD.shape[0]:
        raise ValueError(f"counts sum to {sum(counts)} but there are {x_AD.shape[0]} rows")
    return GroupedSwiGLUFunction.apply(x_AD, gate_up_E2FD, down_EDF, counts)
