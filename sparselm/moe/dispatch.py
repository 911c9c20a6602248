"""Dispatch: run the routed experts on their tokens and combine the results.

Two implementations of the same function
    out[t] = sum over assignments a with token a = t of gate[a] * expert_{e(a)}(x[t])
- `dispatch_sorted`: sort the assignments by expert, gather the token rows into one
  contiguous [A, D] block, run each expert on its contiguous slice (or one
  `torch._grouped_mm` per projection), weight by the gates and scatter-add back with
  `index_add`. Work is proportional to the assignments (T*K rows), not T*E. For
  dropless top-k (all T*K pairs kept) the scatter-add is replaced by a row permutation
  and a sum over a [K, T, D] view, so forward and backward use only gathers.
- `dispatch_naive`: the reference. Every expert runs on every token, the dense [T, E]
  gate matrix (zero for unrouted pairs) weights the results. Costs E dense MLPs; kept for
  tests and as the benchmark floor.
Both are differentiable with respect to x, the expert weights and the gates.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from sparselm.moe.experts import SwiGLUExperts, grouped_mm_available
from sparselm.moe.routing import Routing, dense_gate_matrix

DISPATCH_METHODS = ("auto", "sorted", "grouped_mm", "naive")


def sort_by_expert(expert_index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, list[int]]:
    """Permutation that groups assignments by expert (stable), and the group sizes."""
    order = torch.argsort(expert_index, stable=True)  # [A]
    counts = torch.bincount(expert_index, minlength=num_experts).tolist()  # E ints (host sync)
    return order, counts


def dispatch_sorted(x_TD: torch.Tensor, routing: Routing, experts: SwiGLUExperts,
                    use_grouped_mm: bool = False) -> torch.Tensor:
    """Sort-by-expert dispatch: [T, D] -> [T, D]. See the module docstring."""
    if routing.slots:
        return _dispatch_slot_major(x_TD, routing, experts, use_grouped_mm)
    order, counts = sort_by_expert(routing.expert_index, experts.num_experts)
    token_A = routing.token_index[order]  # [A] token of each sorted assignment
    x_AD = x_TD[token_A]  # [A, D] gathered rows, grouped by expert
    y_AD = experts.forward_grouped(x_AD, counts, use_grouped_mm=use_grouped_mm)  # [A, D]
    gates_A = routing.gates[order].to(y_AD.dtype)  # [A]
    # index_add (not a dense [T, K, D] buffer): a token's K outputs sum in place.
    return torch.zeros_like(x_TD).index_add(0, token_A, y_AD * gates_A[:, None])  # [T, D]


def _dispatch_slot_major(x_TD, routing: Routing, experts: SwiGLUExperts, use_grouped_mm: bool) -> torch.Tensor:
    """Dropless top-k: the assignments are all K*T (slot, token) pairs, so sorting is a
    permutation of a [K, T] grid. Gather and un-gather are then row permutations whose
    backward is another gather (no scatter-add), and the K outputs of a token are summed
    over a dense [K, T, D] view."""
    num_tokens, slots = x_TD.shape[0], routing.slots
    order, counts = sort_by_expert(routing.expert_index, experts.num_experts)  # [K*T]
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    x_AD = _GatherSlots.apply(x_TD, order, inverse, slots)  # [K*T, D] grouped by expert
    y_AD = experts.forward_grouped(x_AD, counts, use_grouped_mm=use_grouped_mm)  # [K*T, D]
    y_KTD = _PermuteRows.apply(y_AD, inverse, order).view(slots, num_tokens, -1)  # back to slot-major
    gates_KT1 = routing.gates.to(y_KTD.dtype).view(slots, num_tokens, 1)
    return (y_KTD * gates_KT1).sum(dim=0)  # [T, D]


class _GatherSlots(torch.autograd.Function):
    """x_AD[i] = x_TD[order[i] % T]; backward: un-permute with `inverse`, sum the K slots."""

    @staticmethod
    def forward(ctx, x_TD, order, inverse, slots):
        ctx.save_for_backward(inverse)
        ctx.slots = slots
        return x_TD.index_select(0, order % x_TD.shape[0])

    @staticmethod
    def backward(ctx, grad_AD):
        (inverse,) = ctx.saved_tensors
        grad_KTD = grad_AD.index_select(0, inverse).view(ctx.slots, -1, grad_AD.shape[-1])
        return grad_KTD.sum(dim=0), None, None, None


class _PermuteRows(torch.autograd.Function):
    """rows[perm]; backward: gather with the inverse permutation."""

    @staticmethod
    def forward(ctx, rows, perm, inverse):
        ctx.save_for_backward(inverse)
        return rows.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def dispatch_naive(x_TD: torch.Tensor, routing: Routing, experts: SwiGLUExperts) -> torch.Tensor:
    """Reference dispatch: every expert on every token, weighted by the dense gates."""
    gates_TE = dense_gate_matrix(routing, x_TD.shape[0], experts.num_experts).to(x_TD.dtype)  # [T, E]
    y_ETD = experts.forward_every_expert(x_TD)  # [E, T, D]
    return torch.einsum("te,etd->td", gates_TE, y_ETD)  # [T, D]


def dispatch(x_TD: torch.Tensor, routing: Routing, experts: SwiGLUExperts, method: str = "auto") -> torch.Tensor:
    """Dispatch by name: "sorted" (per-expert slices), "grouped_mm", "naive", or "auto":
    `torch._grouped_mm` where it runs for this device and dtype (measured faster on a
    2-core CPU, fp32 and bf16, see benchmarks/bench_moe_dispatch.py), slices otherwise."""
    if method == "auto":
        method = "grouped_mm" if _grouped_mm_works(x_TD.device.type, x_TD.dtype) else "sorted"
    if method == "sorted":
        return dispatch_sorted(x_TD, routing, experts)
    if method == "grouped_mm":
        return dispatch_sorted(x_TD, routing, experts, use_grouped_mm=True)
    if method == "naive":
        return dispatch_naive(x_TD, routing, experts)
    from sparselm.errors import SparselmError
    raise SparselmError(f"unknown dispatch method {method!r}; use one of {', '.join(DISPATCH_METHODS)}")


@lru_cache(maxsize=None)
def _grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    return grouped_mm_available(device_type, dtype)
