"""Shared steps of dense -> MoE conversion: checks, the MoE model skeleton, MLP inputs.

Both conversions (sparse upcycling, upcycle.py; neuron partitioning, partition.py) keep
everything but the MLPs of a Llama-architecture model and build one MoE layer per MLP.
The input model is never modified: the MoE model is a new `SparseMoeForCausalLM` that
receives copies of the dense weights.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from sparselm.errors import SparselmError

SUPPORTED_MODEL_TYPES = ("llama",)


def dense_mlp_weights(model: nn.Module) -> list[dict[str, torch.Tensor]]:
    """Per decoder layer, the SwiGLU MLP weights {gate [F, D], up [F, D], down [D, F]}.

    Raises SparselmError for families without a gated (SwiGLU) MLP of bias-free linears.
    """
    from sparselm.adapters import get_adapter

    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise SparselmError(f"dense->MoE conversion supports Llama-architecture models (model_type "
                            f"{', '.join(SUPPORTED_MODEL_TYPES)}) with a gate/up/down SwiGLU MLP; got {model_type!r}. "
                            "Convert the checkpoint to the Llama layout first")
    if getattr(model.config, "hidden_act", "silu") != "silu":
        raise SparselmError(f"the MLP activation is {model.config.hidden_act!r}; MoE experts are SwiGLU (silu) only")
    adapter = get_adapter(model)
    weights = []
    for i, block in enumerate(adapter.blocks(model)):
        proj = adapter.mlp_projections(block)
        if set(proj) != {"gate", "up", "down"}:
            raise SparselmError(f"layer {i}: MLP has projections {sorted(proj)}, need gate/up/down (SwiGLU)")
        if any(getattr(p, "bias", None) is not None for p in proj.values()):
            raise SparselmError(f"layer {i}: MLP projections have biases, which MoE experts do not support")
        weights.append({k: p.weight.detach() for k, p in proj.items()})
    return weights


def moe_skeleton(dense: nn.Module, **moe_fields):
    """A SparseMoeForCausalLM with the dense model's architecture and all its non-MLP
    weights copied; the MoE layers are freshly initialised (the caller fills them)."""
    from sparselm.moe.modeling import SparseMoeForCausalLM, moe_config_from_dense

    dense_mlp_weights(dense)  # validates the family and the MLP layout
    config = moe_config_from_dense(dense.config, **moe_fields)
    dtype = next(dense.parameters()).dtype
    moe = SparseMoeForCausalLM(config).to(dtype)
    missing, unexpected = moe.load_state_dict(dense.state_dict(), strict=False)
    bad = [k for k in list(missing) + list(unexpected) if ".mlp." not in k]
    if bad:
        raise SparselmError(f"dense and MoE models differ outside the MLPs ({bad[:3]}...); the dense model is "
                            "not a plain Llama layout")
    moe.eval()
    return moe


@torch.no_grad()
def collect_mlp_inputs(model: nn.Module, calib_ids: torch.Tensor, max_tokens: int = 8192,
                       batch_size: int = 8, seed: int = 0, progress: bool = True) -> list[torch.Tensor]:
    """Inputs of every decoder layer's MLP on calibration windows, float32 [N, D] each,
    at most `max_tokens` rows per layer (a seeded random subset of all positions)."""
    from sparselm.adapters import get_adapter

    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    captured: list[list[torch.Tensor]] = [[] for _ in blocks]
    hooks = [adapter.mlp(block).register_forward_pre_hook(
        lambda mod, args, i=i: captured[i].append(args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu()))
        for i, block in enumerate(blocks)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, calib_ids.shape[0], batch_size), desc="calibration", disable=not progress,
                          dynamic_ncols=True):
            model(input_ids=calib_ids[start:start + batch_size].to(device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for rows in captured:
        x_ND = torch.cat(rows)  # [N, D]
        if x_ND.shape[0] > max_tokens:
            x_ND = x_ND[torch.randperm(x_ND.shape[0], generator=gen)[:max_tokens]]
        out.append(x_ND)
    return out
