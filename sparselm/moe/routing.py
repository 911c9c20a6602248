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


def rank_within_expert(expert_flat: torch.Tensor, num_experts: int) -> torch.Tensor:
    """For each assignment, how many earlier assignments (in the given order) chose the
    same expert: its position in that expert's queue. LongTensor like `expert_flat`."""
    order = torch.argsort(expert_flat, stable=True)  # [N] grouped by expert, original order kept
    counts = torch.bincount(expert_flat, minlength=num_experts)  # [E]
    starts = torch.cumsum(counts, 0) - counts  # [E] first sorted position of each expert
    rank_sorted = torch.arange(expert_flat.numel(), device=expert_flat.device) - starts[expert_flat[order]]
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    return rank


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
    choice_TK = torch.topk(scores_TE, top_k, dim=-1).indices  # [T, K]
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
    selected = torch.bincount(expert_flat, minlength=num_experts)  # [E]
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
