"""Layer removal by block influence (ShortGPT, Men et al. 2024, eq. 1-2).

Legend: N = calibration tokens, E = hidden size.

Block influence BI_i = 1 - mean over tokens of cos(x_in, x_out), with x_in / x_out the hidden
states entering and leaving decoder block i. A block that barely turns the residual stream
(BI near 0) can go with little harm; ShortGPT removes the n blocks of lowest BI, measured once
on the unpruned model.

Iterative selection (the default of `shrink`) removes one block at a time and measures BI
again on what is left: once a block is gone, the blocks around it see other inputs, and a
block that looked redundant next to its neighbour may not be redundant without it. On the
built-in small model, one-shot BI removes the last two blocks while iterative BI removes
blocks 1 and 2, with lower perplexity (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparselm.errors import SparselmError
from sparselm.lowrank.input_statistics import run_calibration


def block_influence(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of 1 - cos(x_in, x_out) for [..., E] tensors (divide by the token count
    for the mean). Returned as a float64 scalar so sums over batches stay exact enough."""
    cos = F.cosine_similarity(x_in.double().reshape(-1, x_in.shape[-1]),
                              x_out.double().reshape(-1, x_out.shape[-1]), dim=-1)  # [N]
    return (1 - cos).sum()


@torch.no_grad()
def measure_block_influence(model: nn.Module, blocks: nn.ModuleList, calib_ids: torch.Tensor,
                            batch_size: int = 8, progress: bool = True) -> torch.Tensor:
    """BI of every block on the calibration data, [L] float64; the model is not modified."""
    totals = torch.zeros(len(blocks), dtype=torch.float64)
    counts = torch.zeros(len(blocks), dtype=torch.float64)

    def make_hook(i):
        def hook(_module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, (tuple, list)) else output
            totals[i] += block_influence(x_in, x_out).cpu()
            counts[i] += x_in.shape[:-1].numel()
        return hook

    handles = [b.register_forward_hook(make_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        run_calibration(model, calib_ids, batch_size, progress, desc="block influence")
    finally:
        for handle in handles:
            handle.remove()
    return totals / counts.clamp_min(1)


def check_layers_to_remove(count: int, num_layers: int) -> None:
    if not isinstance(count, int) or count < 0:
        raise SparselmError(f"layers={count!r} must be a whole number of decoder layers to remove (>= 0)")
    if count >= num_layers:
        raise SparselmError(f"removing {count} of {num_layers} decoder layers leaves none; "
                            f"pass at most {num_layers - 1}")


def least_influential(influence: torch.Tensor, count: int) -> list[int]:
    """Indices of the `count` blocks of lowest influence, ascending (ties: the later block goes)."""
    order = sorted(range(influence.numel()), key=lambda i: (influence[i].item(), -i))
    return sorted(order[:count])


LAYER_SELECTIONS = ("iterative", "once")


def _skip_block(_module, args, kwargs, output):
    """Forward hook that makes a block the identity: its output is replaced by its input."""
    x_in = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, tuple):
        return (x_in,) + tuple(output[1:])
    return x_in


def select_layers_to_remove(model: nn.Module, blocks: nn.ModuleList, calib_ids: torch.Tensor, count: int,
                            selection: str = "iterative", batch_size: int = 8,
                            progress: bool = True) -> tuple[list[int], torch.Tensor]:
    """(blocks to remove, ascending; BI of every block on the unpruned model).

    "once": the `count` blocks of lowest BI (ShortGPT). "iterative": remove the block of lowest
    BI, measure BI again with it skipped (its output replaced by its input, which is what
    removing it does to the blocks after it), repeat. The model is left unchanged.
    """
    if selection not in LAYER_SELECTIONS:
        raise SparselmError(f"unknown layer selection {selection!r}; choose one of {', '.join(LAYER_SELECTIONS)}")
    influence = measure_block_influence(model, blocks, calib_ids, batch_size, progress)
    if selection == "once" or count <= 1:
        return least_influential(influence, count), influence
    dropped: list[int] = []
    handles = []
    current = influence
    try:
        while True:
            candidates = current.clone()
            candidates[dropped] = float("inf")
            dropped.append(least_influential(candidates, 1)[0])
            if len(dropped) == count:
                break
            handles.append(blocks[dropped[-1]].register_forward_hook(_skip_block, with_kwargs=True))
            current = measure_block_influence(model, blocks, calib_ids, batch_size, progress)
    finally:
        for handle in handles:
            handle.remove()
    return sorted(dropped), influence


def remove_layers(model: nn.Module, blocks: nn.ModuleList, drop: list[int]) -> None:
    """Delete blocks `drop` from `blocks` (in place) and make the model consistent again.

    Re-indexes every `layer_idx` attribute inside the kept blocks (the KV cache is addressed by
    it), sets `config.num_hidden_layers` (or `n_layer`) and filters `config.layer_types` when
    the config has it, so `save_pretrained` output loads in plain transformers.
    """
    num_layers = len(blocks)
    if len(set(drop)) != len(drop) or any(not 0 <= i < num_layers for i in drop):
        raise SparselmError(f"layers to drop {drop} must be distinct indices in [0, {num_layers})")
    check_layers_to_remove(len(drop), num_layers)
    for i in sorted(drop, reverse=True):
        del blocks[i]  # ModuleList re-keys its entries 0..n-1
    for new_index, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    config = model.config
    kept = [i for i in range(num_layers) if i not in set(drop)]
    for field in ("num_hidden_layers", "n_layer"):
        if isinstance(getattr(config, field, None), int):
            setattr(config, field, len(kept))
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) == num_layers:
        config.layer_types = [layer_types[i] for i in kept]
