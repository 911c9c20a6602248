"""Slicing rows or columns out of a linear layer: the one piece of surgery every structured
pruning step needs. Works for `nn.Linear` (weight [O, I]) and HF `Conv1D` (weight [I, O]).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from sparselm.errors import SparselmError


def slice_linear(layer: nn.Module, index: torch.Tensor, dim: str) -> nn.Module:
    """A new layer of the same type keeping only `index` of its outputs (dim="out") or inputs
    (dim="in"). The input layer is not modified; weights are copied (contiguous), so the
    result is a genuinely smaller dense layer. A bias follows the outputs it belongs to.
    """
    if dim not in ("out", "in"):
        raise SparselmError(f"dim must be 'out' or 'in', got {dim!r}")
    index = index.to(device=layer.weight.device, dtype=torch.long)
    bias = layer.bias.data if layer.bias is not None else None
    if isinstance(layer, nn.Linear):
        out_features, in_features = layer.weight.shape
        weight = layer.weight.data.index_select(0 if dim == "out" else 1, index)  # [O', I] or [O, I']
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                        device=weight.device, dtype=weight.dtype)
    elif isinstance(layer, Conv1D):
        weight = layer.weight.data.index_select(1 if dim == "out" else 0, index)  # [I, O'] or [I', O]
        new = Conv1D(weight.shape[1], weight.shape[0]).to(device=weight.device, dtype=weight.dtype)
    else:
        raise SparselmError(f"cannot slice a {type(layer).__name__}; structured pruning needs nn.Linear or "
                            "Conv1D projections")
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias.index_select(0, index) if dim == "out" else bias)
    new.train(layer.training)
    new.weight.requires_grad_(layer.weight.requires_grad)
    return new


def replace_child(parent: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Swap the direct child `old` of `parent` for `new` (found by identity, not by name)."""
    for name, child in parent.named_children():
        if child is old:
            setattr(parent, name, new)
            return
    raise SparselmError(f"{type(old).__name__} is not a direct child of {type(parent).__name__}")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Set the submodule at dotted path `name` to `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def top_indices(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` highest scores, in ascending index order (original order kept).
    Ties break toward the lower index, so the choice is deterministic."""
    order = torch.argsort(scores.double(), descending=True, stable=True)
    return order[:keep].sort().values
