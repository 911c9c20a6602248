"""MLP neuron pruning: score intermediate neurons, remove the same ones from gate, up and down.

Legend: E = hidden size, I = intermediate size (neurons), N = calibration tokens.

A neuron j of a (gated) MLP is row j of gate and up and column j of down; its whole effect on
the block's output is h_j * W_down[:, j], with h_j = act(gate_j x) * up_j x. Two scores:

- "activation" (activation-weighted magnitude, the structured form of Wanda used by
  Wanda-sp / FLAP, An et al. 2024): s_j = sqrt(mean h_j^2) * ||W_down[:, j]||_2, which is the
  root-mean-square size of the neuron's contribution to the output (exact: E||h_j w_j||^2 =
  E[h_j^2] ||w_j||^2).
- "taylor" (first-order Taylor, LLM-Pruner, Ma et al. 2023, eq. 4, element-wise): s_j = sum over
  the neuron's weights of |w * dL/dw| from the language-model loss on calibration data, the
  first-order estimate of the loss change when the weights are zeroed.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from sparselm.adapters import linear_weight
from sparselm.errors import SparselmError
from sparselm.structured.module_slicing import replace_child, slice_linear, top_indices

SCORES = ("activation", "taylor")
# Config fields that hold the MLP width, by family naming.
WIDTH_FIELDS = ("intermediate_size", "ffn_dim", "n_inner")


def activation_neuron_scores(down_weight: torch.Tensor, sq_mean: torch.Tensor) -> torch.Tensor:
    """s_j = sqrt(mean h_j^2) * ||W_down[:, j]||_2 for down_weight [E, I] and sq_mean [I] -> [I]."""
    if down_weight.shape[1] != sq_mean.shape[0]:
        raise SparselmError(f"down projection has {down_weight.shape[1]} inputs but statistics cover "
                            f"{sq_mean.shape[0]} neurons")
    return sq_mean.double().clamp_min(0).sqrt() * down_weight.double().norm(dim=0)  # [I]


def taylor_neuron_scores(projections: dict[str, nn.Module]) -> torch.Tensor:
    """s_j = sum |w * grad| over row j of gate/up and column j of down -> [I].

    Needs `.grad` on every projection weight (accumulated over calibration data).
    """
    total = None
    for key, layer in projections.items():
        weight = linear_weight(layer)
        grad = layer.weight.grad
        if grad is None:
            raise SparselmError(f"taylor scores need gradients on the {key} projection; run a backward pass first")
        grad = grad.t() if grad.shape != weight.shape else grad  # Conv1D stores [I, O]
        saliency = (weight.double() * grad.double()).abs()  # [O, I]
        per_neuron = saliency.sum(0) if key == "down" else saliency.sum(1)  # [I]
        total = per_neuron if total is None else total + per_neuron
    return total


def neurons_to_keep(width: int, ratio: float) -> int:
    """How many of `width` neurons survive removing `ratio` of them (rounded to nearest)."""
    return width - int(round(ratio * width))


def check_neuron_ratio(ratio: float, width: int, where: str = "the MLP") -> None:
    if not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise SparselmError(f"neuron ratio {ratio!r} for {where} must be in [0, 1): it is the fraction removed")
    if neurons_to_keep(width, ratio) < 1:
        raise SparselmError(f"removing {ratio:.0%} of the {width} neurons of {where} leaves none; "
                            "pass a smaller ratio")


def prune_mlp_neurons(mlp: nn.Module, projections: dict[str, nn.Module], keep: torch.Tensor) -> None:
    """Keep only neurons `keep` (sorted indices into [0, I)) in `mlp`, in place.

    Rows of gate/up and columns of down are sliced into new, smaller layers that replace the
    old ones on `mlp`; the block's output for the kept neurons is unchanged bit for bit.
    """
    for key, layer in projections.items():
        replace_child(mlp, layer, slice_linear(layer, keep, "in" if key == "down" else "out"))
    if hasattr(mlp, "intermediate_size"):  # e.g. LlamaMLP keeps its width as an attribute
        mlp.intermediate_size = int(keep.numel())


def select_neurons(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Sorted indices of the neurons kept when `ratio` of them with the lowest scores go."""
    return top_indices(scores, neurons_to_keep(scores.numel(), ratio))


def width_field(config) -> str:
    for name in WIDTH_FIELDS:
        if getattr(config, name, None):
            return name
    if hasattr(config, "n_inner"):  # gpt2 leaves it None to mean 4 * n_embd
        return "n_inner"
    raise SparselmError(f"the config of model type {getattr(config, 'model_type', '?')} names no MLP width "
                        f"({', '.join(WIDTH_FIELDS)}); neuron pruning cannot record the new size")
