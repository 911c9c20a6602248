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
- `dispatch_inference`: no autograd, for forwards without gradients (`MoELayer` takes
  it under `torch.no_grad()` / `torch.inference_mode()`). Same sum: the experts run on
  their gathered rows (expert by expert in a reused workspace, or `torch._grouped_mm`
  for few rows), then each token's K rows are summed with their gates by one
  `embedding_bag` (dropless top-k) or scatter-added with `index_add_`.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from sparselm.moe.buffers import reusable, workspace
from sparselm.moe.experts import (SwiGLUExperts, grouped_mm_available, matmul_rows, pads_expert_rows,
                                  padded_layout)
from sparselm.moe.fused import fused_kernels, rows_sum, swiglu
from sparselm.moe.routing import ExpertGroups, Routing, dense_gate_matrix, sort_by_expert

DISPATCH_METHODS = ("auto", "sorted", "grouped_mm", "naive")


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
    over a dense [K, T, D] view. Where the fused kernels run and the matmuls are bf16 on CPU,
    each expert's group is padded with zero rows to `matmul_rows` (experts.py) right in the
    gather, so the experts receive counts that need no further padding."""
    num_tokens, slots = x_TD.shape[0], routing.slots
    # Off the CPU the group sizes stay a device tensor: grouped_mm takes them as they are, so
    # nothing in this forward (or its backward) waits for the GPU; the per-expert slices read them.
    order, counts = sort_by_expert(routing.expert_index, experts.num_experts,
                                   as_list=x_TD.device.type == "cpu")  # [K*T]
    inverse = torch.empty_like(order)  # inverse[k*T + t]: the grouped row of assignment (k, t)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    fused = fused_kernels(x_TD) is not None
    src_A, pad_rows = order % num_tokens, None  # src_A: the token of each grouped row
    if fused and pads_expert_rows(x_TD):
        src_A, inverse, pad_rows, counts = _padded_groups(src_A, inverse, counts)
    x_AD = _GatherSlots.apply(x_TD, src_A, pad_rows, inverse, slots)  # [A, D] grouped by expert
    y_AD = experts.forward_grouped(x_AD, counts, use_grouped_mm=use_grouped_mm)  # [A, D]
    if fused:
        # One pass: out[t] = sum_k gate[k, t] * y_AD[inverse[k*T + t]], and one back.
        rows_TK = inverse.view(slots, num_tokens).t()
        return rows_sum(y_AD, rows_TK, routing.gates.to(y_AD.dtype).view(slots, num_tokens).t())
    y_KTD = _PermuteRows.apply(y_AD, inverse, order).view(slots, num_tokens, -1)  # back to slot-major
    gates_KT1 = routing.gates.to(y_KTD.dtype).view(slots, num_tokens, 1)
    return (y_KTD * gates_KT1).sum(dim=0)  # [T, D]


def _padded_groups(src_A: torch.Tensor, inverse: torch.Tensor, counts: list[int]):
    """The grouped layout with each expert's group padded to `matmul_rows` rows.

    Returns (src_P: the token of each padded row (token 0 for pad rows, which are zeroed),
    inverse mapped to padded rows, the pad rows (None if none), the padded counts)."""
    padded = [matmul_rows(n) for n in counts]
    if padded == counts:
        return src_A, inverse, None, counts
    src_P, moved_A, pad_rows = padded_layout(counts, padded, src_A)
    return src_P, moved_A[inverse], pad_rows, padded


class _GatherSlots(torch.autograd.Function):
    """x_AD[i] = x_TD[src[i]], zero on `pad_rows`; backward: sum each token's K rows, found
    through `inverse` ([K*T], the row of assignment (k, t)); pad rows get no gradient."""

    @staticmethod
    def forward(ctx, x_TD, src, pad_rows, inverse, slots):
        ctx.save_for_backward(inverse)
        ctx.slots = slots
        x_AD = torch.index_select(x_TD, 0, src, out=reusable("gather_slots.x", (src.numel(), x_TD.shape[1]), x_TD))
        if pad_rows is not None:
            x_AD.index_fill_(0, pad_rows, 0)
        return x_AD

    @staticmethod
    def backward(ctx, grad_AD):
        (inverse,) = ctx.saved_tensors
        ext = fused_kernels(grad_AD)
        if ext is not None:  # one pass: grad_x[t] = sum_k grad_AD[inverse[k*T + t]]
            return ext.rows_sum(grad_AD, inverse.view(ctx.slots, -1).t().contiguous(), None), None, None, None, None
        grad_KTD = grad_AD.index_select(0, inverse).view(ctx.slots, -1, grad_AD.shape[-1])
        return grad_KTD.sum(dim=0), None, None, None, None


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


def dispatch_inference(x_TD: torch.Tensor, groups: ExpertGroups, experts: SwiGLUExperts) -> torch.Tensor:
    """No-grad dispatch: [T, D] -> [T, D], each expert on its group of `groups`' rows.

    Why not `dispatch_sorted` without gradients: the matmuls are the same, but there
    every other op runs over all A = T*K rows (gather, silu on a strided [A, F] half,
    gate multiply, permute back, weighted sum over [K, T, D]), each a pass through
    memory into a freshly allocated buffer, plus the autograd wrappers. Here the expert
    outputs land in one [A, D] block (`_expert_rows_loop`, or `_expert_rows_grouped_mm`
    for few rows) and the combine is one `embedding_bag` (the sum of each token's K
    rows, times the gates, in one pass) when every token has exactly K rows, else a
    gate multiply and `index_add_`.
    """
    num_tokens, dim = x_TD.shape
    if len(groups.token_index) == 0:
        return x_TD.new_zeros(num_tokens, dim)
    if (len(groups.token_index) <= _GROUPED_MM_MAX_ROWS and _c_loop(x_TD, experts) is None
            and _grouped_mm_works(x_TD.device.type, x_TD.dtype) and experts.grouped_mm_aligned(x_TD.dtype)):
        y_AD = _expert_rows_grouped_mm(x_TD, groups, experts)
    else:
        y_AD = _expert_rows_loop(x_TD, groups, experts)
    if groups.slot_rows is not None:
        weights_TK = None if groups.slot_gates is None else groups.slot_gates.to(x_TD.dtype)
        return F.embedding_bag(groups.slot_rows, y_AD, mode="sum", per_sample_weights=weights_TK)  # [T, D]
    if groups.gates is not None:
        y_AD.mul_(groups.gates.to(x_TD.dtype)[:, None])  # rounded to x's dtype, as in dispatch_sorted
    return x_TD.new_zeros(num_tokens, dim).index_add_(0, groups.token_index, y_AD)


# Where the C++ loop runs (CPU, fp32/bf16) it is used at any size: in a one-off measurement with
# new routing every call (the small Llama's experts, 2 threads, 1-1024 tokens) as fast as
# torch._grouped_mm in fp32 and 1.05-2.4x faster in bf16, whose grouped_mm pays oneDNN's set-up for every new group size. Elsewhere at
# most this many rows go through torch._grouped_mm: measured on 2 CPU threads (the small
# Llama's experts, D 256, F 88) ~2.5x faster than the Python per-expert loop at 16 rows (two
# calls instead of ~50 small ops: decoding), ~1.1x at 2048; from 4096 rows on no faster, and up
# to 2x slower when its fresh [A, 2F] and [A, D] outputs page-fault.
_GROUPED_MM_MAX_ROWS = 2048


def _c_loop(x_TD: torch.Tensor, experts: SwiGLUExperts):
    """The extension when `moe_expert_rows` can run these experts on x_TD, else None."""
    ext = fused_kernels(x_TD)
    if ext is not None and x_TD.dtype == experts.gate_up_E2FD.dtype == experts.down_EDF.dtype:
        return ext
    return None


def _expert_rows_grouped_mm(x_TD: torch.Tensor, groups: ExpertGroups, experts: SwiGLUExperts) -> torch.Tensor:
    """Expert outputs [A, D] with one `torch._grouped_mm` per projection."""
    offsets = torch.tensor(groups.counts, device=x_TD.device).cumsum(0).to(torch.int32)  # [E] end offsets
    x_AD = x_TD.index_select(0, groups.token_index)
    h_A2F = torch._grouped_mm(x_AD, experts.gate_up_E2FD.transpose(-2, -1), offs=offsets)
    act_AF = swiglu(h_A2F)  # [A, F], contiguous
    return torch._grouped_mm(act_AF, experts.down_EDF.transpose(-2, -1), offs=offsets)


def _expert_rows_loop(x_TD: torch.Tensor, groups: ExpertGroups, experts: SwiGLUExperts) -> torch.Tensor:
    """Expert outputs [A, D], expert by expert: gather its rows, h^T = W_gate_up x^T (so
    the gate and up halves are contiguous [F, n] blocks for the in-place silu and *),
    the down matmul reading act^T transposed, straight into its slice of the output.
    All buffers, the output included, come from the reused `workspace` (buffers.py)."""
    dim, hidden = x_TD.shape[1], experts.expert_hidden
    total, rows = len(groups.token_index), max(groups.counts)
    ext = _c_loop(x_TD, experts)
    if ext is not None:
        # The loop below in C++ (moe_kernels.cpp) with the SwiGLU fused, no per-op Python
        # cost, and on several threads whole experts per thread (one gather and hidden
        # buffer slice each). bf16 groups run padded to `matmul_rows`.
        run_rows = [matmul_rows(n) for n in groups.counts] if pads_expert_rows(x_TD) else list(groups.counts)
        rows = max(run_rows)
        threads = ext.moe_parallel_experts(groups.counts, dim, hidden)
        buf = workspace(total * dim + threads * rows * (dim + 2 * hidden), x_TD.dtype, x_TD.device)
        y_AD, x_buf, h_buf = buf.split([total * dim, threads * rows * dim, threads * rows * 2 * hidden])
        y_AD = y_AD.view(total, dim)
        ext.moe_expert_rows(x_TD, groups.token_index, groups.counts, run_rows, experts.gate_up_E2FD.detach(),
                            experts.down_EDF.detach(), y_AD, x_buf, h_buf, threads)
        return y_AD
    buf = workspace(total * dim + rows * (dim + 2 * hidden), x_TD.dtype, x_TD.device)
    y_AD, x_buf, h_buf = buf.split([total * dim, rows * dim, rows * 2 * hidden])
    y_AD, x_buf = y_AD.view(total, dim), x_buf.view(rows, dim)
    # Per-expert views made in one call each: the loop body is what costs (~10 ops).
    tokens = groups.token_index.split(groups.counts)
    outputs = y_AD.split(groups.counts)
    gate_up = experts.gate_up_E2FD.unbind(0)  # [2F, D] each
    down_T = experts.down_EDF.transpose(1, 2).unbind(0)  # [F, D] each
    for e, n in enumerate(groups.counts):
        if n:
            x_nD = torch.index_select(x_TD, 0, tokens[e], out=x_buf[:n])
            h_2Fn = torch.mm(gate_up[e], x_nD.t(), out=h_buf.as_strided((2 * hidden, n), (n, 1)))
            gate_Fn, up_Fn = h_2Fn.chunk(2)
            act_Fn = F.silu(gate_Fn, inplace=True).mul_(up_Fn)
            torch.mm(act_Fn.t(), down_T[e], out=outputs[e])
    return y_AD


def dispatch_naive(x_TD: torch.Tensor, routing: Routing, experts: SwiGLUExperts) -> torch.Tensor:
    """Reference dispatch: every expert on every token, weighted by the dense gates."""
    gates_TE = dense_gate_matrix(routing, x_TD.shape[0], experts.num_experts).to(x_TD.dtype)  # [T, E]
    y_ETD = experts.forward_every_expert(x_TD)  # [E, T, D]
    return torch.einsum("te,etd->td", gates_TE, y_ETD)  # [T, D]


def dispatch(x_TD: torch.Tensor, routing: Routing, experts: SwiGLUExperts, method: str = "auto") -> torch.Tensor:
    """Dispatch by name: "sorted" (per-expert slices), "grouped_mm", "naive", or "auto":
    the per-expert slices on CPU, `torch._grouped_mm` elsewhere where it runs for the device and
    dtype. On CPU (benchmarks/bench_moe_dispatch.py, forward + backward, new routing every step)
    the slices reuse their large buffers (buffers.py) where grouped_mm allocates its outputs
    afresh: on the AMD AVX-512 VM 0.89x vs 0.95x the dense MLP's time in fp32, 0.92x vs 1.00x
    in bf16. Before that reuse, grouped_mm was as fast in fp32 on two machines and faster on
    that one."""
    if method == "auto":
        method = ("grouped_mm" if x_TD.device.type != "cpu" and _grouped_mm_works(x_TD.device.type, x_TD.dtype)
                  else "sorted")
    if method == "sorted":
        return dispatch_sorted(x_TD, routing, experts)
    if method == "grouped_mm":
        if not _grouped_mm_works(x_TD.device.type, x_TD.dtype):
            from sparselm.errors import SparselmError
            raise SparselmError(f"torch._grouped_mm does not run on {x_TD.device.type} in {x_TD.dtype} with this "
                                f"PyTorch ({torch.__version__}); use dispatch method 'auto' or 'sorted'")
        return dispatch_sorted(x_TD, routing, experts, use_grouped_mm=True)
    if method == "naive":
        return dispatch_naive(x_TD, routing, experts)
    from sparselm.errors import SparselmError
    raise SparselmError(f"unknown dispatch method {method!r}; use one of {', '.join(DISPATCH_METHODS)}")


@lru_cache(maxsize=None)
def _grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    return grouped_mm_available(device_type, dtype)
