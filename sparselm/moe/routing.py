"""Routing math: which (token, expert) pairs run, with which gate weight.

Pure functions on tensors, no modules (see router.py for the modules that own weights).
Shapes: T tokens, E experts, K experts per token, A kept assignments, C capacity.

A routing decision is a flat list of assignments `(token_index[a], expert_index[a],
gates[a])`. Top-k routing gives at most T*K of them, expert-choice routing E*C; tokens
dropped by the capacity limit simply have fewer (or no) assignments, so their MoE output is
zero (the residual stream carries them), as in Switch Transformer / GShard.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparselm.errors import SparselmError
from sparselm.moe.fused import fused_kernels


@dataclass
class Routing:
    """The outcome of one routing call.

    token_index, expert_index: LongTensor [A]; gates: [A] (differentiable w.r.t. logits).
    logits, probs: [T, E] float32 router logits and softmax probabilities.
    selected_counts: [E] assignments each expert was chosen for before capacity dropping.
    kept_counts: [E] assignments each expert actually runs.
    dropped_fraction: share of chosen (token, slot) pairs dropped by capacity; for expert
    choice, the share of tokens that no expert picked.
    slots: K when the assignments are exactly all T*K pairs in slot-major order
    (assignment a = k*T + t: dropless top-k), which lets dispatch avoid scatter-adds;
    0 otherwise.
    """

    token_index: torch.Tensor
    expert_index: torch.Tensor
    gates: torch.Tensor
    logits: torch.Tensor
    probs: torch.Tensor
    selected_counts: torch.Tensor
    kept_counts: torch.Tensor
    dropped_fraction: float
    slots: int = 0


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """C = ceil(capacity_factor * T * K / E) (Switch Transformer, eq. 3), at least 1."""
    if capacity_factor <= 0:
        raise SparselmError(f"capacity factor must be > 0, got {capacity_factor}; "
                            "use e.g. 1.25, or None for dropless routing")
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def expert_counts(expert_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many entries of `expert_index` name each expert -> [E] int64 on its device.
    `torch.bincount` on CPU; elsewhere a scatter-add, because CUDA's bincount reads the
    largest index back to the host (the host would wait for the GPU every forward)."""
    if expert_index.device.type == "cpu":
        return torch.bincount(expert_index, minlength=num_experts)
    counts = torch.zeros(num_experts, dtype=torch.long, device=expert_index.device)
    return counts.scatter_add_(0, expert_index, torch.ones_like(expert_index, dtype=torch.long))


def rank_within_expert(expert_flat: torch.Tensor, num_experts: int) -> torch.Tensor:
    """For each assignment, how many earlier assignments (in the given order) chose the
    same expert: its position in that expert's queue. LongTensor like `expert_flat`."""
    order = torch.argsort(expert_flat, stable=True)  # [N] grouped by expert, original order kept
    counts = expert_counts(expert_flat, num_experts)  # [E]
    starts = torch.cumsum(counts, 0) - counts  # [E] first sorted position of each expert
    rank_sorted = torch.arange(expert_flat.numel(), device=expert_flat.device) - starts[expert_flat[order]]
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    return rank


def top_k_experts(scores_TE: torch.Tensor, top_k: int) -> torch.Tensor:
    """Indices [T, K] of each row's K highest scores, highest first; equal scores go to
    the lower expert index, NaN counts as highest.

    `torch.topk` leaves the order of equal values unspecified (on CPU it does not keep the
    lower index first), and bf16 router logits tie often, so every routing path picks
    experts with this one rule: the C++ kernel on CPU (fp32, one pass per token), a stable
    descending sort elsewhere. Both give the same indices."""
    ext = fused_kernels(scores_TE) if scores_TE.dtype == torch.float32 else None
    if ext is not None:
        return ext.route_top_k(scores_TE, top_k)[0]
    return torch.sort(scores_TE, dim=-1, descending=True, stable=True).indices[:, :top_k]


def top_k_routing(logits_TE: torch.Tensor, top_k: int, renormalize: bool = True,
                  selection_bias: torch.Tensor | None = None, capacity: int | None = None,
                  unit_gates: bool = False) -> Routing:
    """Token-choice top-k routing (Shazeer et al. 2017; Switch / GShard; Mixtral).

    probs = softmax(logits). Each token picks the K experts with the highest
    `probs + selection_bias` (the bias of aux-loss-free balancing, DeepSeek-V3 sec. 2.1.2,
    only steers the choice: gates use the unbiased probs). Gates are the chosen probs,
    divided by their sum when `renormalize`, or all 1 when `unit_gates` (for experts that
    partition one MLP, whose outputs must add up, MoEfication).
    With `capacity`, each expert keeps at most C assignments, first-choice slots of all
    tokens before second choices, earlier tokens first (GShard's priority); the rest drop.
    """
    num_tokens, num_experts = logits_TE.shape
    if not 1 <= top_k <= num_experts:
        raise SparselmError(f"top-k must be between 1 and the number of experts ({num_experts}), got {top_k}")
    logits_TE = logits_TE.float()  # routing in fp32: bf16 ties and rounding flip choices
    probs_TE = torch.softmax(logits_TE, dim=-1)  # [T, E]
    scores_TE = probs_TE.detach() if selection_bias is None else probs_TE.detach() + selection_bias.float()
    choice_TK = top_k_experts(scores_TE, top_k)  # [T, K]
    if unit_gates:
        gates_TK = torch.ones_like(choice_TK, dtype=probs_TE.dtype)
    else:
        gates_TK = probs_TE.gather(1, choice_TK)  # [T, K]
        if renormalize:
            gates_TK = gates_TK / gates_TK.sum(dim=-1, keepdim=True)
    # Slot-major order: all first choices, then all second choices (GShard's priority).
    expert_flat = choice_TK.t().reshape(-1)  # [K*T]
    token_flat = torch.arange(num_tokens, device=logits_TE.device).repeat(top_k)  # [K*T]
    gates_flat = gates_TK.t().reshape(-1)  # [K*T]
    selected = expert_counts(expert_flat, num_experts)  # [E]
    if capacity is None:
        keep = None
        kept = selected
        dropped = 0.0
    else:
        keep = rank_within_expert(expert_flat, num_experts) < capacity  # [K*T]
        kept = torch.clamp(selected, max=capacity)
        dropped = 1.0 - float(keep.sum()) / max(1, expert_flat.numel())
        expert_flat, token_flat, gates_flat = expert_flat[keep], token_flat[keep], gates_flat[keep]
    return Routing(token_flat, expert_flat, gates_flat, logits_TE, probs_TE, selected, kept, dropped,
                   slots=top_k if keep is None else 0)


def expert_choice_routing(logits_TE: torch.Tensor, capacity: int) -> Routing:
    """Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice
    Routing", eq. 1-2): probs = softmax over experts; each expert takes the C tokens with
    the highest probability for it, gate = that probability. Load is balanced by
    construction; a token may get 0..E experts. Not causal: an expert's choice of a token
    depends on later tokens, so it cannot be used for autoregressive decoding.
    """
    num_tokens, num_experts = logits_TE.shape
    logits_TE = logits_TE.float()
    probs_TE = torch.softmax(logits_TE, dim=-1)  # [T, E]
    capacity = min(capacity, num_tokens)
    gates_EC, token_EC = torch.topk(probs_TE.t(), capacity, dim=-1)  # [E, C] each
    expert_EC = torch.arange(num_experts, device=logits_TE.device)[:, None].expand(-1, capacity)
    counts = torch.full((num_experts,), capacity, device=logits_TE.device, dtype=torch.long)
    chosen_tokens = torch.zeros(num_tokens, dtype=torch.bool, device=logits_TE.device)
    chosen_tokens[token_EC.reshape(-1)] = True
    dropped = 1.0 - float(chosen_tokens.sum()) / max(1, num_tokens)
    return Routing(token_EC.reshape(-1), expert_EC.reshape(-1), gates_EC.reshape(-1),
                   logits_TE, probs_TE, counts, counts, dropped)


def dense_gate_matrix(routing: Routing, num_tokens: int, num_experts: int) -> torch.Tensor:
    """Gates as a dense [T, E] matrix (zero where a token does not use an expert);
    differentiable. Used by the naive reference dispatch."""
    gates_TE = routing.gates.new_zeros(num_tokens, num_experts)
    return gates_TE.index_put((routing.token_index, routing.expert_index), routing.gates, accumulate=True)


@dataclass
class ExpertGroups:
    """Assignments grouped by expert, for the no-grad inference dispatch.

    token_index: LongTensor [A] of rows: expert 0's tokens, then expert 1's, ...
    counts: E ints (host list), how many rows belong to each expert.
    How the A expert outputs are combined into the T token outputs, one of:
    - slot_rows [T, K] (dropless top-k, every token has exactly K rows): the rows of
      token t's K assignments, in slot order, with slot_gates [T, K] (None: all 1);
    - otherwise gates [A] in row order (None: all 1), scatter-added by token_index.
    The remaining fields are those of `Routing` that the statistics and the balancing
    bookkeeping read; probs may be None when nobody asked for it.
    """

    token_index: torch.Tensor
    counts: list[int]
    gates: torch.Tensor | None
    slot_rows: torch.Tensor | None
    slot_gates: torch.Tensor | None
    logits: torch.Tensor
    probs: torch.Tensor | None
    selected_counts: torch.Tensor
    kept_counts: torch.Tensor
    dropped_fraction: float

    def scale_gates(self, scale: float) -> None:
        """gates *= scale (MoEConfig.gate_scale), unit gates becoming explicit."""
        if self.slot_rows is not None:
            gates = self.slot_gates if self.slot_gates is not None else torch.ones(
                self.slot_rows.shape, device=self.slot_rows.device)
            self.slot_gates = gates * scale
        else:
            gates = self.gates if self.gates is not None else torch.ones(
                self.token_index.shape, device=self.token_index.device)
            self.gates = gates * scale


def softmax_over_experts(logits_TE: torch.Tensor) -> torch.Tensor:
    """softmax(logits, dim=-1) for a [T, E] matrix with few columns -> [T, E] (a transposed
    view). Computed on a transposed copy, where the reduction runs across E rows of T
    contiguous values: the last-dim kernel handles one short row at a time and is ~3.5x
    slower on CPU for E = 8 (measured for 4096 tokens, fp32, 1 thread: 0.41 ms vs 0.11 ms
    with the transposing copy included). Equal to the direct
    softmax up to the rounding of the sum (last-bit differences)."""
    return torch.softmax(logits_TE.t().contiguous(), dim=0).t()


def top_k_groups(logits_TE: torch.Tensor, top_k: int, renormalize: bool = True,
                 selection_bias: torch.Tensor | None = None, unit_gates: bool = False,
                 need_probs: bool = True) -> ExpertGroups:
    """Dropless `top_k_routing` for inference (no gradients), grouped by expert.

    Chooses the same experts as `top_k_routing`: without a selection bias the top-k runs
    on the logits, since softmax is monotonic and `top_k_experts` only compares values, so
    it picks the same indices as on the probs, ties included (bf16 logits tie often).
    The one difference: two logits whose probabilities round to the same float (e.g. both
    underflow to 0) tie on the probs but not on the logits. With a bias the choice needs
    probs + bias, computed exactly as there. The probs (for the gates and the
    statistics) come from `softmax_over_experts`, equal up to last-bit rounding; the
    gates are then computed as in `top_k_routing`.
    Grouping (a counting sort, cheaper than sorting the K*T assignments or `nonzero`): in
    C++ together with the choice where the kernels run (`route_top_k`, moe_kernels.cpp),
    else a [E, T] mask of the choices whose running sum along the tokens gives each
    (token, slot)'s row when rows are grouped by expert, tokens in order; scattering the
    token ids to those rows lists each expert's tokens (`_group_choices`).
    """
    num_tokens, num_experts = logits_TE.shape
    if not 1 <= top_k <= num_experts:
        raise SparselmError(f"top-k must be between 1 and the number of experts ({num_experts}), got {top_k}")
    logits_TE = logits_TE.float()  # as in top_k_routing: routing in fp32
    probs_TE = None
    if selection_bias is None:
        scores_TE = logits_TE
    else:
        probs_TE = torch.softmax(logits_TE, dim=-1)  # the same scores as top_k_routing
        scores_TE = probs_TE + selection_bias.float()
    if probs_TE is None and (need_probs or not unit_gates):
        probs_TE = softmax_over_experts(logits_TE)
    ext = fused_kernels(scores_TE)
    if ext is not None:  # choice and counting sort in one C++ pass
        choice_TK, rows_TK, token_A, counts_E = ext.route_top_k(scores_TE, top_k)
    else:
        choice_TK = top_k_experts(scores_TE, top_k)  # [T, K]
        rows_TK, token_A, counts_E = _group_choices(choice_TK, num_experts)
    gates_TK = None
    if not unit_gates:
        gates_TK = probs_TE.gather(1, choice_TK)  # [T, K]
        if renormalize:
            gates_TK = gates_TK / gates_TK.sum(dim=-1, keepdim=True)
    return ExpertGroups(token_A, counts_E.tolist(), None, rows_TK, gates_TK, logits_TE, probs_TE,
                        counts_E, counts_E, 0.0)


def _group_choices(choice_TK: torch.Tensor, num_experts: int):
    """Counting sort of top-k choices [T, K] by expert: (rows [T, K], tokens [T*K],
    counts [E]) as the C++ `route_top_k` returns them (see `top_k_groups`)."""
    num_tokens, top_k = choice_TK.shape
    device = choice_TK.device
    mask_ET = torch.zeros(num_experts, num_tokens, dtype=torch.bool, device=device)
    mask_ET.scatter_(0, choice_TK.t(), True)
    seen_ET = mask_ET.cumsum(dim=1)  # [E, T] tokens of expert e up to token t
    counts_E = seen_ET[:, -1] if num_tokens else seen_ET.new_zeros(num_experts)  # [E]
    # Row of (token t, expert e) when grouped by expert, tokens in order within a group.
    row_ET = seen_ET + (counts_E.cumsum(0) - counts_E - 1)[:, None]  # [E, T]
    rows_TK = row_ET.t().gather(1, choice_TK)  # [T, K], together a permutation of 0..T*K-1
    tokens_TK = torch.arange(num_tokens, device=device)[:, None].expand(num_tokens, top_k)
    token_A = torch.empty(num_tokens * top_k, dtype=torch.long, device=device)
    token_A.index_put_((rows_TK.reshape(-1),), tokens_TK.reshape(-1))  # [A], grouped by expert
    return rows_TK, token_A, counts_E


def sort_by_expert(expert_index: torch.Tensor, num_experts: int,
                   as_list: bool = True) -> tuple[torch.Tensor, list[int] | torch.Tensor]:
    """Permutation that groups assignments by expert (stable), and the group sizes: E ints
    (read back from the device: on a GPU the host waits for it), or with `as_list=False`
    an [E] tensor on the device."""
    order = torch.argsort(expert_index, stable=True)  # [A]
    counts = expert_counts(expert_index, num_experts)  # [E]
    return order, (counts.tolist() if as_list else counts)


def group_by_expert(routing: Routing, num_experts: int) -> ExpertGroups:
    """Any `Routing` (capacity-limited top-k, expert choice) grouped by expert: the stable
    sort of `dispatch_sorted`, so each expert sees its rows in the same order."""
    order, counts = sort_by_expert(routing.expert_index, num_experts)
    return ExpertGroups(routing.token_index[order], counts, routing.gates[order], None, None, routing.logits,
                        routing.probs, routing.selected_counts, routing.kept_counts, routing.dropped_fraction)
