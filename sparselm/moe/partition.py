"""MoEfication by neuron partitioning (Zhang et al. 2022, "MoEfication: Transformer
Feed-forward Layers are Mixtures of Experts").

Each SwiGLU MLP  y = W_down (silu(W_gate x) * W_up x)  is a sum over its F neurons, so
splitting the neurons into E groups of F/E gives E experts whose outputs add up to the
MLP exactly. Running only the k groups that matter for a token keeps most of the output
at k/E of the cost.
1. Co-activation: on calibration tokens, a neuron is "active" for a token when |a_j| is
   in the token's top `active_fraction` of neurons; each neuron is described by its
   activity pattern over the tokens.
2. Balanced clustering (MoEfication sec. 3.1, co-activation graph split): balanced
   k-means with cosine similarity on those patterns, every cluster exactly ceil(F/E)
   neurons (clusters are padded with zero neurons when E does not divide F), so neurons
   that fire together land in the same expert.
3. Router (sec. 3.2, expert selection): a linear router trained (BCE) to predict, from
   the MLP input, the k experts whose output ||W_down[:, S_e] a_{S_e}|| is largest.
Inference: top-k of the router, gates all 1 (`unit_gates`), no renormalisation.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sparselm.moe.convert import collect_mlp_inputs, dense_mlp_weights, moe_skeleton


def swiglu_activations(x_ND: torch.Tensor, w: dict) -> torch.Tensor:
    """a = silu(x W_gate^T) * (x W_up^T) -> [N, F] (float32)."""
    return F.silu(x_ND @ w["gate"].float().t()) * (x_ND @ w["up"].float().t())


def coactivation_features(a_NF: torch.Tensor, active_fraction: float = 0.2) -> torch.Tensor:
    """Unit-norm activity pattern of each neuron over the tokens -> [F, N]."""
    k = max(1, int(round(active_fraction * a_NF.shape[1])))
    threshold_N1 = a_NF.abs().topk(k, dim=1).values[:, -1:]  # [N, 1] per-token cut
    active_NF = (a_NF.abs() >= threshold_N1).float()
    return F.normalize(active_NF.t() - active_NF.t().mean(dim=1, keepdim=True), dim=1)  # [F, N]


def balanced_kmeans(features_FN: torch.Tensor, num_clusters: int, iters: int = 15, seed: int = 0) -> torch.Tensor:
    """Cluster F unit vectors into clusters of exactly ceil(F / C) (the last ones smaller
    when C does not divide F) by cosine similarity -> LongTensor [F] of cluster ids.

    Each iteration assigns greedily: all (point, cluster) pairs by decreasing similarity,
    a pair is taken when the point is free and the cluster has room; then centroids are
    re-estimated as normalised means.
    """
    num_points = features_FN.shape[0]
    size = math.ceil(num_points / num_clusters)
    gen = torch.Generator().manual_seed(seed)
    centroids_CN = features_FN[torch.randperm(num_points, generator=gen)[:num_clusters]].clone()
    labels = torch.zeros(num_points, dtype=torch.long)
    for _ in range(iters):
        sim_FC = features_FN @ centroids_CN.t()  # [F, C]
        order = torch.argsort(sim_FC.reshape(-1), descending=True).tolist()
        new = [-1] * num_points
        room = [size] * num_clusters
        left = num_points
        for flat in order:
            point, cluster = divmod(flat, num_clusters)
            if new[point] < 0 and room[cluster] > 0:
                new[point] = cluster
                room[cluster] -= 1
                left -= 1
                if left == 0:
                    break
        new_labels = torch.tensor(new)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
        for c in range(num_clusters):
            members = features_FN[labels == c]
            if len(members):
                centroids_CN[c] = F.normalize(members.mean(dim=0), dim=0)
    return labels


def expert_contributions(a_NF: torch.Tensor, down_DF: torch.Tensor, groups: list[torch.Tensor]) -> torch.Tensor:
    """||W_down[:, S_e] a[:, S_e]|| per token and expert -> [N, E]."""
    return torch.stack([(a_NF[:, idx] @ down_DF[:, idx].float().t()).norm(dim=1) for idx in groups], dim=1)


def fit_router(x_ND: torch.Tensor, targets_NE: torch.Tensor, steps: int = 300, lr: float = 1e-2,
               seed: int = 0) -> torch.Tensor:
    """Linear router W [E, D] trained with BCE to predict the multi-hot `targets_NE`.
    Inputs are scaled by their RMS during fitting; the returned weight absorbs the scale."""
    torch.manual_seed(seed)
    scale = x_ND.pow(2).mean().sqrt().clamp_min(1e-6)
    xs = x_ND / scale
    weight = torch.zeros(targets_NE.shape[1], x_ND.shape[1], requires_grad=True)
    opt = torch.optim.Adam([weight], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.binary_cross_entropy_with_logits(xs @ weight.t(), targets_NE)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return weight.detach() / scale


def top_k_recall(logits_NE: torch.Tensor, targets_NE: torch.Tensor, k: int) -> float:
    """Share of the target experts that the router's top-k picks."""
    picked = torch.zeros_like(targets_NE).scatter_(1, logits_NE.topk(k, dim=1).indices, 1.0)
    return float((picked * targets_NE).sum() / targets_NE.sum().clamp_min(1))


@torch.no_grad()
def partition(dense: nn.Module, calib_ids: torch.Tensor, num_experts: int = 8, top_k: int = 2,
              max_tokens: int = 8192, active_fraction: float = 0.2, router_steps: int = 300, seed: int = 0,
              progress: bool = True, **moe_fields):
    """A new SparseMoeForCausalLM made by partitioning each dense MLP into experts.

    Returns (model, report) where report lists per layer the router's top-k recall on the
    calibration tokens. With top_k == num_experts the model equals the dense one exactly.
    The dense model is not modified.
    """
    mlps = dense_mlp_weights(dense)
    hidden = mlps[0]["gate"].shape[0]
    expert_hidden = math.ceil(hidden / num_experts)
    fields = dict(num_experts=num_experts, num_experts_per_tok=top_k, moe_intermediate_size=expert_hidden,
                  unit_gates=True, norm_topk_prob=False, router_aux_loss_coef=0.0, router_z_loss_coef=0.0)
    fields.update(moe_fields)
    moe = moe_skeleton(dense, **fields)
    inputs = collect_mlp_inputs(dense, calib_ids, max_tokens=max_tokens, seed=seed, progress=progress)
    report = []
    for i, (block, w, x_ND) in enumerate(tqdm(list(zip(moe.model.layers, mlps, inputs)), desc="partition",
                                               disable=not progress, dynamic_ncols=True)):
        a_NF = swiglu_activations(x_ND, w)  # [N, F]
        labels = balanced_kmeans(coactivation_features(a_NF, active_fraction), num_experts, seed=seed)
        groups = [torch.nonzero(labels == e).flatten() for e in range(num_experts)]
        _fill_experts(block.mlp.experts, w, groups)
        contrib_NE = expert_contributions(a_NF, w["down"], groups)  # [N, E]
        targets_NE = torch.zeros_like(contrib_NE).scatter_(1, contrib_NE.topk(top_k, dim=1).indices, 1.0)
        router_DE = fit_router(x_ND, targets_NE, steps=router_steps, seed=seed)
        block.mlp.router.weight.copy_(router_DE.to(block.mlp.router.weight.dtype))
        report.append({"layer": i, "router_top_k_recall": top_k_recall(x_ND @ router_DE.t(), targets_NE, top_k),
                       "expert_sizes": [len(g) for g in groups]})
    return moe, report


def _fill_experts(experts, w: dict, groups: list[torch.Tensor]) -> None:
    """Expert e gets neurons groups[e]; missing slots (E does not divide F) stay zero,
    which adds silu(0) * 0 = 0 to the output."""
    experts.gate_up_E2FD.zero_()
    experts.down_EDF.zero_()
    size = experts.expert_hidden
    for e, idx in enumerate(groups):
        n = len(idx)
        experts.gate_up_E2FD[e, :n] = w["gate"][idx]
        experts.gate_up_E2FD[e, size:size + n] = w["up"][idx]
        experts.down_EDF[e, :, :n] = w["down"][:, idx]
