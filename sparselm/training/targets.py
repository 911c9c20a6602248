"""Which weights sparse training makes sparse.

Every `nn.Linear` weight (and transformers' `Conv1D`, GPT-2's transposed linear) is a
target; the input embedding and the output head are left dense unless asked for, as in
RigL. A parameter shared by several modules (tied embeddings) appears once and is
sparsified only if every module that holds it allows it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class SparseTarget:
    """One weight to keep sparse. `transposed` is True when the tensor is [in, out] (Conv1D),
    so N:M groups run along dim 0 there; the mask math always sees an [out, in] view."""
    name: str
    param: nn.Parameter
    transposed: bool = False

    @property
    def out_in_shape(self) -> tuple[int, int]:
        rows, cols = self.param.shape
        return (cols, rows) if self.transposed else (rows, cols)

    def as_out_in(self, tensor: torch.Tensor) -> torch.Tensor:
        """View a tensor in this weight's layout as [out, in]."""
        return tensor.t() if self.transposed else tensor

    def from_out_in(self, tensor: torch.Tensor) -> torch.Tensor:
        """Back from an [out, in] tensor to this weight's layout (contiguous)."""
        return tensor.t().contiguous() if self.transposed else tensor


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def sparse_targets(model: nn.Module, sparsify_embeddings: bool = False,
                   sparsify_lm_head: bool = False) -> list[SparseTarget]:
    """The 2-D weights to sparsify, in module order, each parameter once."""
    embedding_weights: set[int] = set()
    head_weights: set[int] = set()
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    embedding = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    if embedding is not None and getattr(embedding, "weight", None) is not None:
        embedding_weights.add(id(embedding.weight))
    if head is not None and getattr(head, "weight", None) is not None:
        head_weights.add(id(head.weight))

    targets: list[SparseTarget] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.dim() != 2 or id(weight) in seen:
            continue
        is_linear = isinstance(module, nn.Linear) or _is_conv1d(module)
        is_embedding = isinstance(module, nn.Embedding)
        if not (is_linear or is_embedding):
            continue
        if id(weight) in embedding_weights and not sparsify_embeddings:
            seen.add(id(weight))
            continue
        if id(weight) in head_weights and not sparsify_lm_head:
            seen.add(id(weight))
            continue
        if is_embedding and not sparsify_embeddings:
            continue
        seen.add(id(weight))
        targets.append(SparseTarget(f"{name}.weight" if name else "weight", weight, _is_conv1d(module)))
    return targets
