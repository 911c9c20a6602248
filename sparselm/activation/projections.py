"""The projection inputs activation sparsity works on, found through the model adapter.

Names are "<block>.<key>": "3.q", "3.k", "3.v", "3.o", "3.gate", "3.up", "3.down" for the
Llama family ("3.qkv" for GPT-2's fused projection). q/k/v (and gate/up) share one input
but get separate entries: TEAL calibrates a threshold for each of them.
"""
from __future__ import annotations

import torch
from torch import nn

from sparselm.errors import SparselmError


def projection_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Ordered {name: linear module} of every attention and MLP projection of every block.

    Raises SparselmError when the model's family has no supported attention/MLP layout.
    """
    from sparselm.adapters import get_adapter

    adapter = get_adapter(model)
    modules: dict[str, nn.Module] = {}
    for i, block in enumerate(adapter.blocks(model)):
        try:
            parts = {**adapter.attention_projections(block), **adapter.mlp_projections(block)}
        except (SparselmError, AttributeError) as err:
            raise SparselmError(
                f"activation sparsity needs the attention and MLP projections of each block, but {err}; "
                "use a supported family (llama, mistral, qwen2, gpt2, opt)") from None
        for key, module in parts.items():
            modules[f"{i}.{key}"] = module
    if not modules:
        raise SparselmError("found no projections in this model; activation sparsity needs decoder blocks")
    return modules


def in_features_of(module: nn.Module) -> int:
    """Input width of an nn.Linear or a transformers Conv1D ([in, out] weight)."""
    if isinstance(module, nn.Linear):
        return module.in_features
    return module.weight.shape[0]


def weight_numel(module: nn.Module) -> int:
    return module.weight.numel()


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in] whatever the module stores."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()
