"""Sparse upcycling (Komatsuzaki et al. 2023, "Sparse Upcycling: Training Mixture-of-Experts
from Dense Checkpoints"): every MLP becomes E identical copies plus a new router.

With renormalised top-k gates the upcycled model computes exactly the dense model at
step 0 (the k gates sum to 1 and all experts are equal), whatever the router says; the
experts then diverge during a short continued training (`sparselm.moe.training.train_lm`)
that the balancing loss / bias keeps spread over all experts.
"""
from __future__ import annotations

import torch
from torch import nn

from sparselm.moe.convert import dense_mlp_weights, moe_skeleton


@torch.no_grad()
def upcycle(dense: nn.Module, num_experts: int = 8, top_k: int = 2, router_std: float = 0.02,
            expert_noise: float = 0.0, seed: int = 0, **moe_fields):
    """A new SparseMoeForCausalLM whose experts are copies of each dense MLP.

    router_std: std of the new routers' normal init. expert_noise: optional relative
    Gaussian noise on the copies (0 keeps the model exactly equal to the dense one).
    Extra `moe_fields` (e.g. bias_update_rate, router_aux_loss_coef) go to the config.
    The dense model is not modified.
    """
    mlps = dense_mlp_weights(dense)
    expert_hidden = mlps[0]["gate"].shape[0]
    fields = dict(num_experts=num_experts, num_experts_per_tok=top_k, moe_intermediate_size=expert_hidden,
                  norm_topk_prob=True)
    fields.update(moe_fields)
    moe = moe_skeleton(dense, **fields)
    gen = torch.Generator().manual_seed(seed)
    for block, w in zip(moe.model.layers, mlps):
        layer = block.mlp
        gate_up_2FD = torch.cat([w["gate"], w["up"]], dim=0)  # [2F, D]
        layer.experts.gate_up_E2FD.copy_(gate_up_2FD.expand_as(layer.experts.gate_up_E2FD))
        layer.experts.down_EDF.copy_(w["down"].expand_as(layer.experts.down_EDF))
        if expert_noise:
            for p in (layer.experts.gate_up_E2FD, layer.experts.down_EDF):
                p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * expert_noise * p.std())
        layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=gen) * router_std)
    return moe
