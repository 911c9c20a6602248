"""Router modules: own the router weights (and the balancing bias), call the routing math.

- `TopKRouter`: token-choice top-k softmax routing, optional renormalisation of the k
  gates, optional capacity limit with dropping, optional aux-loss-free bias balancing.
- `ExpertChoiceRouter`: each expert picks its tokens; `causal = False`, so models that
  use it refuse autoregressive generation.
"""
from __future__ import annotations

import torch
from torch import nn

from sparselm.errors import SparselmError
from sparselm.moe.routing import (ExpertGroups, Routing, expert_capacity, expert_choice_routing, group_by_expert,
                                  top_k_groups, top_k_routing)


class TopKRouter(nn.Module):
    """logits = x W_r^T; top-k of softmax(logits) (+ selection bias); see `top_k_routing`.

    Aux-loss-free balancing (Wang et al. 2024; DeepSeek-V3 sec. 2.1.2): `selection_bias`
    [E] is added to the scores only to choose experts, and after each optimizer step
    `update_bias(load)` moves it by `bias_update_rate * sign(mean load - load_i)`, so
    overloaded experts become less likely to be chosen. It is a persistent buffer (saved
    with the model), never trained by gradients.
    """

    causal = True

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, renormalize: bool = True,
                 capacity_factor: float | None = None, unit_gates: bool = False,
                 bias_update_rate: float = 0.0, dtype: torch.dtype | None = None):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise SparselmError(f"top-k ({top_k}) must be between 1 and the number of experts ({num_experts}); "
                                "lower --top-k or raise --experts")
        if capacity_factor is not None and capacity_factor <= 0:
            raise SparselmError(f"capacity factor must be > 0, got {capacity_factor}; "
                                "use e.g. 1.25, or None for dropless")
        self.num_experts, self.top_k = num_experts, top_k
        self.renormalize, self.unit_gates = renormalize, unit_gates
        self.capacity_factor = capacity_factor
        self.bias_update_rate = bias_update_rate
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=dtype))  # [E, D]
        nn.init.normal_(self.weight, std=hidden_size ** -0.5)
        self.register_buffer("selection_bias", torch.zeros(num_experts))  # [E], fp32

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = x_TD @ self.weight.t()  # [T, E]
        capacity = None if self.capacity_factor is None else expert_capacity(
            x_TD.shape[0], self.top_k, self.num_experts, self.capacity_factor)
        return top_k_routing(logits_TE, self.top_k, self.renormalize, self._active_bias(), capacity, self.unit_gates)

    def route_grouped(self, x_TD: torch.Tensor, need_probs: bool = True) -> ExpertGroups:
        """The same routing as `forward`, grouped by expert, for inference without
        gradients: dropless routing takes the cheaper `top_k_groups`; with a capacity,
        `forward`'s assignments are sorted by expert."""
        if self.capacity_factor is not None:
            return group_by_expert(self(x_TD), self.num_experts)
        logits_TE = x_TD @ self.weight.t()  # [T, E]
        return top_k_groups(logits_TE, self.top_k, self.renormalize, self._active_bias(), self.unit_gates, need_probs)

    def _active_bias(self) -> torch.Tensor | None:
        """The selection bias when balancing is on or the bias was trained, else None.
        Off the CPU always the bias: adding zeros picks the same experts, and testing for a
        trained bias would make the host wait for the GPU every forward."""
        if self.bias_update_rate > 0 or self.selection_bias.device.type != "cpu":
            return self.selection_bias
        return self.selection_bias if bool(self.selection_bias.any()) else None

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor) -> None:
        """b_i <- b_i + u * sign(mean load - load_i) (DeepSeek-V3, aux-loss-free balancing)."""
        if self.bias_update_rate <= 0:
            return
        load = load_E.to(self.selection_bias.device, torch.float32)
        self.selection_bias += self.bias_update_rate * torch.sign(load.mean() - load)


class ExpertChoiceRouter(nn.Module):
    """Expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens,
    C = capacity_factor * T * top_k / E. Balanced by construction, but not causal."""

    causal = False

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, capacity_factor: float = 1.0,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise SparselmError(f"top-k ({top_k}) must be between 1 and the number of experts ({num_experts})")
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor = 1.0 if capacity_factor is None else capacity_factor
        if self.capacity_factor <= 0:
            raise SparselmError(f"capacity factor must be > 0, got {capacity_factor}; use e.g. 1.0")
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=dtype))  # [E, D]
        nn.init.normal_(self.weight, std=hidden_size ** -0.5)

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = x_TD @ self.weight.t()  # [T, E]
        capacity = expert_capacity(x_TD.shape[0], self.top_k, self.num_experts, self.capacity_factor)
        return expert_choice_routing(logits_TE, capacity)

    def route_grouped(self, x_TD: torch.Tensor, need_probs: bool = True) -> ExpertGroups:
        """`forward`'s routing grouped by expert (inference without gradients)."""
        return group_by_expert(self(x_TD), self.num_experts)

    def update_bias(self, load_E: torch.Tensor) -> None:
        """Expert choice is balanced by construction: nothing to update."""
