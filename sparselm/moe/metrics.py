"""Per-layer routing metrics: how evenly an MoE layer spreads its tokens.

`RoutingStats` accumulates counts over many forward passes (a calibration run, a training
epoch); `routing_metrics` turns them into the numbers the reports print.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RoutingStats:
    """Running totals over forward passes of one layer (float64, never trained).

    The totals stay on the device the routing runs on and are read back only by `metrics()`:
    `update` runs every forward, and on a GPU each read-back would make the host wait for the
    whole step so far."""

    num_experts: int
    kept_counts: torch.Tensor = field(init=False)  # [E] assignments each expert ran
    selected_counts: torch.Tensor = field(init=False)  # [E] before capacity dropping
    sums: torch.Tensor = field(init=False)  # [3]: assignments chosen, assignments dropped, router entropy
    tokens: int = 0

    def __post_init__(self):
        self.reset()

    def reset(self) -> None:
        # device given explicitly: models built under a meta-device context still count on CPU;
        # the first update moves the totals to the routing's device
        self.kept_counts = torch.zeros(self.num_experts, dtype=torch.float64, device="cpu")
        self.selected_counts = torch.zeros(self.num_experts, dtype=torch.float64, device="cpu")
        self.sums = torch.zeros(3, dtype=torch.float64, device="cpu")
        self.tokens = 0

    @torch.no_grad()
    def update(self, routing, num_tokens: int) -> None:
        device = routing.selected_counts.device
        if self.sums.device != device:
            self.kept_counts, self.selected_counts, self.sums = (
                t.to(device) for t in (self.kept_counts, self.selected_counts, self.sums))
        self.kept_counts += routing.kept_counts.detach()
        self.selected_counts += routing.selected_counts.detach()
        self.tokens += num_tokens
        chosen = routing.selected_counts.detach().sum().double()
        entropy = router_entropy(routing.probs.detach()).double().sum()
        self.sums += torch.stack([chosen, routing.dropped_fraction * chosen, entropy])

    def metrics(self) -> dict:
        chosen, dropped, entropy = self.sums.tolist()
        return routing_metrics(self.kept_counts.cpu(), dropped / max(1.0, chosen), entropy / max(1, self.tokens))


def router_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each token's router distribution -> [T]; log(E) is uniform."""
    p = probs_TE.float()
    return -(p * torch.log(p.clamp_min(1e-20))).sum(dim=-1)


def load_cv(counts_E: torch.Tensor) -> float:
    """Coefficient of variation of expert load: std / mean (population std); 0 = balanced."""
    c = counts_E.double()
    mean = c.mean()
    return float(c.std(unbiased=False) / mean) if mean > 0 else 0.0


def max_violation(counts_E: torch.Tensor) -> float:
    """MaxVio = max load / mean load - 1 (Wang et al. 2024, aux-loss-free balancing)."""
    c = counts_E.double()
    mean = c.mean()
    return float(c.max() / mean - 1.0) if mean > 0 else 0.0


def routing_metrics(kept_counts_E: torch.Tensor, dropped_fraction: float, mean_entropy: float) -> dict:
    """The per-layer report: tokens per expert, fraction dropped, load CV, MaxVio, entropy."""
    return {
        "tokens_per_expert": [int(round(float(c))) for c in kept_counts_E],
        "dropped_fraction": float(dropped_fraction),
        "load_cv": load_cv(kept_counts_E),
        "max_violation": max_violation(kept_counts_E),
        "router_entropy": float(mean_entropy),
    }
