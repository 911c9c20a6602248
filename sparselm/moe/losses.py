"""Router losses: the Switch/GShard load-balancing loss and the ST-MoE router z-loss.

Both return the *unweighted* loss; the MoE layer multiplies each by its coefficient
(`balance_loss_coef`, ~1e-2, and `z_loss_coef`, ~1e-3) before adding it to the LM loss.
"""
from __future__ import annotations

import torch


def load_balancing_loss(probs_TE: torch.Tensor, selected_counts_E: torch.Tensor) -> torch.Tensor:
    """L_balance = E * sum_i f_i * P_i (Switch Transformer, Fedus et al. 2021, eq. 4-6).

    f_i: fraction of the routed (token, slot) pairs that chose expert i (counted before
    capacity dropping; constant w.r.t. the parameters), P_i: mean router probability of i
    over tokens (carries the gradient). With f normalised over all T*K pairs the loss is 1
    at perfect balance for any K, and E when every token goes to the same expert.
    """
    num_experts = probs_TE.shape[-1]
    f_E = selected_counts_E.to(probs_TE.dtype) / selected_counts_E.sum().clamp_min(1)  # [E]
    p_E = probs_TE.mean(dim=0)  # [E]
    return num_experts * torch.sum(f_E * p_E)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """L_z = mean_t (logsumexp_i logits[t, i])^2 (ST-MoE, Zoph et al. 2022, eq. 5).

    Keeps router logits small so the softmax stays numerically stable in low precision.
    """
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()
