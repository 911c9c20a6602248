"""The mixture-of-experts feed-forward layer: router + stacked SwiGLU experts (+ shared).

A drop-in replacement for a decoder block's MLP: `MoELayer(x)` maps [..., D] to
[..., D] and returns a plain tensor, so a Hugging Face decoder layer calls it unchanged.
The router losses of the last forward are left in `layer.aux_loss` (a scalar with
gradient, already multiplied by the coefficients) for the training loop to add, and the
routing counts are accumulated in `layer.stats` for the per-layer metrics.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from sparselm.errors import SparselmError
from sparselm.moe.dispatch import DISPATCH_METHODS, dispatch, dispatch_inference
from sparselm.moe.experts import SharedSwiGLU, SwiGLUExperts
from sparselm.moe.losses import load_balancing_loss, router_z_loss
from sparselm.moe.metrics import RoutingStats
from sparselm.moe.router import ExpertChoiceRouter, TopKRouter
from sparselm.moe.routing import ExpertGroups

ROUTERS = ("top_k", "expert_choice")


@dataclass(frozen=True)
class MoEConfig:
    """Everything that defines one MoE layer.

    router: "top_k" (token choice) or "expert_choice" (non-causal).
    capacity_factor: None = dropless; else each expert takes at most
        ceil(capacity_factor * T * top_k / E) assignments and the rest are dropped.
    unit_gates: gates are 1 for the chosen experts (experts that partition one MLP).
    shared_experts: always-active experts (DeepSeekMoE), fused into one dense SwiGLU.
    balance_loss_coef, z_loss_coef: weights of the Switch balance loss and router z-loss.
    bias_update_rate: > 0 turns on aux-loss-free bias balancing (DeepSeek-V3), e.g. 1e-3.
    gate_scale: multiplies the routed gates (DeepSeek-V3's routed scaling factor). With
        renormalised top-k gates, gate_scale = top_k makes the gates sum to k, so the
        routed output has the scale of a dense MLP with k x F neurons (trains faster
        from scratch); 1.0 keeps upcycled models equal to their dense source.
    dispatch: "auto" (per-expert slices on CPU, grouped_mm elsewhere where it runs;
        see `dispatch`), "sorted" (per-expert slices), "grouped_mm" or "naive" (reference).
    """

    hidden_size: int
    expert_hidden: int
    num_experts: int = 8
    top_k: int = 2
    router: str = "top_k"
    renormalize: bool = True
    unit_gates: bool = False
    capacity_factor: float | None = None
    shared_experts: int = 0
    balance_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    bias_update_rate: float = 0.0
    gate_scale: float = 1.0
    dispatch: str = "auto"

    def __post_init__(self):
        if self.num_experts < 1 or self.expert_hidden < 1 or self.hidden_size < 1:
            raise SparselmError("num_experts, expert_hidden and hidden_size must all be >= 1")
        if not 1 <= self.top_k <= self.num_experts:
            raise SparselmError(f"top-k ({self.top_k}) must be between 1 and the number of experts "
                                f"({self.num_experts}); lower top-k or use more experts")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise SparselmError(f"capacity factor must be > 0, got {self.capacity_factor}; "
                                "use e.g. 1.25, or None for dropless routing")
        if self.router not in ROUTERS:
            raise SparselmError(f"unknown router {self.router!r}; use one of {', '.join(ROUTERS)}")
        if self.dispatch not in DISPATCH_METHODS:
            raise SparselmError(f"unknown dispatch {self.dispatch!r}; use one of {', '.join(DISPATCH_METHODS)}")
        if self.shared_experts < 0:
            raise SparselmError(f"shared_experts must be >= 0, got {self.shared_experts}")

    def to_dict(self) -> dict:
        return asdict(self)

    def active_mlp_params(self) -> int:
        """Expert + shared weights one token uses (router excluded)."""
        per_expert = 3 * self.hidden_size * self.expert_hidden
        return per_expert * (self.top_k + self.shared_experts)


class MoELayer(nn.Module):
    """Router -> dispatch to SwiGLU experts -> gate-weighted sum (+ shared expert).

    Without grad mode the forward takes an equivalent path without autograd
    (`_forward_inference`); set `inference_fast_path = False` on a layer to always use
    the configured dispatch.
    """

    inference_fast_path = True

    def __init__(self, config: MoEConfig, dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        if config.router == "top_k":
            self.router = TopKRouter(config.hidden_size, config.num_experts, config.top_k, config.renormalize,
                                     config.capacity_factor, config.unit_gates, config.bias_update_rate, dtype=dtype)
        else:
            self.router = ExpertChoiceRouter(config.hidden_size, config.num_experts, config.top_k,
                                             config.capacity_factor or 1.0, dtype=dtype)
        self.experts = SwiGLUExperts(config.num_experts, config.hidden_size, config.expert_hidden, dtype=dtype)
        self.shared = (SharedSwiGLU(config.hidden_size, config.shared_experts * config.expert_hidden, dtype=dtype)
                       if config.shared_experts else None)
        self.dispatch_method = config.dispatch
        self.aux_loss: torch.Tensor | None = None
        self.stats = RoutingStats(config.num_experts)
        self.track_stats = True
        self._load_since_bias_update = torch.zeros(config.num_experts, dtype=torch.float64, device="cpu")

    @property
    def causal(self) -> bool:
        return self.router.causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])  # [T, D]
        if self._takes_inference_path(x_TD):
            out_TD, routing = self._forward_inference(x_TD)
            self.aux_loss = None
        else:
            routing = self.router(x_TD)
            if self.config.gate_scale != 1.0:
                routing.gates = routing.gates * self.config.gate_scale
            out_TD = self._dispatch(x_TD, routing)  # [T, D]
            if self.shared is not None:
                out_TD = out_TD + self.shared(x_TD)
            self.aux_loss = self._router_loss(routing) if torch.is_grad_enabled() else None
        if self.track_stats:
            self.stats.update(routing, x_TD.shape[0])
        if self.training:  # kept on the routing's device: no wait for the GPU every step
            load = routing.selected_counts.detach()
            if self._load_since_bias_update.device != load.device:
                self._load_since_bias_update = self._load_since_bias_update.to(load.device)
            self._load_since_bias_update += load
        return out_TD.reshape(shape)

    def _dispatch(self, x_TD: torch.Tensor, routing) -> torch.Tensor:
        return dispatch(x_TD, routing, self.experts, self.dispatch_method)

    def _takes_inference_path(self, x_TD: torch.Tensor) -> bool:
        """The no-autograd path runs when nothing can need a gradient (grad mode off:
        `torch.no_grad()`, `torch.inference_mode()`), so the router losses are not
        computed either (they are None without grad mode on both paths). Not for the
        "naive" reference dispatch, subclasses with their own `_dispatch` (expert
        parallelism), `inference_fast_path = False`, under autocast (its `out=` matmuls
        do not autocast) or while torch.compile traces."""
        return (self.inference_fast_path and not torch.is_grad_enabled() and self.dispatch_method != "naive"
                and type(self)._dispatch is MoELayer._dispatch
                and not _autocast_on(x_TD.device.type) and not torch.compiler.is_compiling())

    def _forward_inference(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, ExpertGroups]:
        """Same output as the autograd path, with fewer ops (see `top_k_groups` and
        `dispatch_inference`). Returns the output and the grouped routing, which carries
        the counts and probs that the statistics and the bias bookkeeping read."""
        groups = self.router.route_grouped(x_TD, need_probs=self.track_stats)
        if self.config.gate_scale != 1.0:
            groups.scale_gates(self.config.gate_scale)
        out_TD = dispatch_inference(x_TD, groups, self.experts)  # [T, D]
        if self.shared is not None:
            out_TD.add_(self.shared(x_TD))
        return out_TD, groups

    def _router_loss(self, routing) -> torch.Tensor:
        cfg = self.config
        loss = routing.logits.new_zeros(())
        if cfg.balance_loss_coef and cfg.router == "top_k":  # expert choice is balanced by construction
            loss = loss + cfg.balance_loss_coef * load_balancing_loss(routing.probs, routing.selected_counts)
        if cfg.z_loss_coef:
            loss = loss + cfg.z_loss_coef * router_z_loss(routing.logits)
        return loss

    def update_balance_bias(self) -> None:
        """Apply one aux-loss-free bias step with the load seen since the last call."""
        self.router.update_bias(self._load_since_bias_update)
        self._load_since_bias_update.zero_()

    def metrics(self) -> dict:
        """Tokens per expert, fraction dropped, load CV, MaxVio, router entropy (since reset)."""
        return self.stats.metrics()


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (e.g. meta): treat as on
        return True


def moe_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    """All MoE layers of a model with their qualified names, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]


def total_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the router losses of the last forward over all MoE layers (None if none)."""
    losses = [m.aux_loss for _, m in moe_layers(model) if m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None


def update_balance_biases(model: nn.Module) -> None:
    """Call after each optimizer step when training with aux-loss-free balancing."""
    for _, layer in moe_layers(model):
        layer.update_balance_bias()


def reset_routing_stats(model: nn.Module) -> None:
    for _, layer in moe_layers(model):
        layer.stats.reset()


def model_routing_metrics(model: nn.Module) -> dict[str, dict]:
    """Per-layer metrics keyed by module name."""
    return {name: layer.metrics() for name, layer in moe_layers(model)}


def refuse_noncausal_generation(model: nn.Module) -> None:
    """Raise if any MoE layer routes non-causally (expert choice): decoding one token at a
    time would see a different routing than training, and a real expert-choice decision
    needs future tokens."""
    for name, layer in moe_layers(model):
        if not layer.causal:
            raise SparselmError(f"MoE layer {name} uses expert-choice routing, which is not causal and cannot "
                                "generate autoregressively; convert or train with router='top_k'")
