"""Expert pruning: drop the experts an MoE model uses least, judged on calibration data.

Two scores per expert (Lu et al. 2024, "Not All Experts are Equal", use the same idea):
- "usage": how many (token, slot) assignments the router sends to it;
- "contribution": the sum over its assignments of gate * ||expert output||, i.e. how
  much it adds to the residual stream.
Pruning keeps the top-scoring experts of every layer (the same count in all layers, so
the model stays one `SparseMoeConfig`) and slices the stacked expert weights, the router
rows and the balancing bias. An expert that is never routed to can be removed without
changing any output when the top-k gates are renormalised.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from sparselm.errors import SparselmError
from sparselm.moe.layer import MoELayer, moe_layers

CRITERIA = ("usage", "contribution")


@torch.no_grad()
def expert_scores(model: nn.Module, calib_ids: torch.Tensor, criterion: str = "usage", batch_size: int = 8,
                  progress: bool = True) -> dict[str, torch.Tensor]:
    """Per MoE layer (by module name), a float64 score per expert [E] on `calib_ids`."""
    if criterion not in CRITERIA:
        raise SparselmError(f"unknown expert-pruning criterion {criterion!r}; use one of {', '.join(CRITERIA)}")
    layers = moe_layers(model)
    if not layers:
        raise SparselmError("the model has no MoE layers; expert pruning needs an MoE model (see sparselm moefy)")
    scores = {name: torch.zeros(layer.config.num_experts, dtype=torch.float64) for name, layer in layers}

    def hook(name):
        def record(layer: MoELayer, args):
            x_TD = args[0].reshape(-1, args[0].shape[-1])
            routing = layer.router(x_TD)
            if criterion == "usage":
                weight = torch.ones_like(routing.gates, dtype=torch.float64)
            else:
                order = torch.argsort(routing.expert_index, stable=True)
                counts = torch.bincount(routing.expert_index, minlength=layer.config.num_experts).tolist()
                y_AD = layer.experts.forward_grouped(x_TD[routing.token_index[order]], counts)  # [A, D]
                weight = torch.empty_like(routing.gates, dtype=torch.float64)
                weight[order] = (routing.gates[order].double() * y_AD.double().norm(dim=1))
            scores[name].index_add_(0, routing.expert_index.cpu(), weight.cpu())
        return record

    hooks = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, calib_ids.shape[0], batch_size), desc=f"expert {criterion}",
                          disable=not progress, dynamic_ncols=True):
            model(input_ids=calib_ids[start:start + batch_size].to(device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return scores


@torch.no_grad()
def keep_experts(layer: MoELayer, keep: torch.Tensor) -> None:
    """Keep only experts `keep` (indices, in that order) of `layer`, in place."""
    from sparselm.moe.layer import MoEConfig

    keep = torch.as_tensor(keep, dtype=torch.long)
    cfg = layer.config
    if keep.numel() < cfg.top_k:
        raise SparselmError(f"cannot keep {keep.numel()} experts with top-k {cfg.top_k}; keep at least top-k experts")
    fields = cfg.to_dict()
    fields["num_experts"] = keep.numel()
    layer.config = MoEConfig(**fields)  # expert-choice capacity follows the new count at each call
    experts = layer.experts
    experts.gate_up_E2FD = nn.Parameter(experts.gate_up_E2FD[keep].clone())
    experts.down_EDF = nn.Parameter(experts.down_EDF[keep].clone())
    experts.num_experts = keep.numel()
    router = layer.router
    router.weight = nn.Parameter(router.weight[keep].clone())
    router.num_experts = keep.numel()
    if hasattr(router, "selection_bias"):
        router.selection_bias = router.selection_bias[keep].clone()
    layer.stats = type(layer.stats)(keep.numel())
    layer._load_since_bias_update = torch.zeros(keep.numel(), dtype=torch.float64, device="cpu")


def prune_experts(model: nn.Module, calib_ids: torch.Tensor, keep: int, criterion: str = "usage",
                  progress: bool = True) -> dict:
    """Keep the `keep` highest-scoring experts in every MoE layer, in place.

    Updates `model.config.num_experts` when the model is a SparseMoeForCausalLM.
    Returns {layer name: {"kept": [...], "scores": [...]}}.
    """
    scores = expert_scores(model, calib_ids, criterion, progress=progress)
    report = {}
    for name, layer in moe_layers(model):
        if keep > layer.config.num_experts:
            raise SparselmError(f"cannot keep {keep} experts: layer {name} has {layer.config.num_experts}")
        kept = torch.sort(torch.topk(scores[name], keep).indices).values  # keep the original expert order
        keep_experts(layer, kept)
        report[name] = {"kept": kept.tolist(), "scores": scores[name].tolist()}
    if hasattr(model, "config") and hasattr(model.config, "num_experts"):
        model.config.num_experts = keep
    return report
