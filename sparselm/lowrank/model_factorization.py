"""`lowrank`: replace a model's decoder-block linear layers by `LowRankLinear` factors.

Steps: check the arguments against the model (before any work); collect the input statistics
the method needs from calibration data on the dense model (one pass); decompose every
candidate layer once (float64); choose ranks (uniform, or from measured sensitivity, see
`allocate`); swap in the truncated factors. Layers whose rank would not save parameters stay
dense. Embeddings and the LM head are never factorized.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from sparselm.adapters import get_adapter
from sparselm.errors import SparselmError
from sparselm.lowrank.allocate import check_keep, kept_parameters, rank_for_ratio, sensitivity_ranks, uniform_ranks
from sparselm.lowrank.factorize import METHODS, decompose
from sparselm.lowrank.input_statistics import check_calibration, collect_input_statistics, model_device
from sparselm.lowrank.linear import LowRankLinear, check_rank, rank_saves_parameters
from sparselm.structured.module_slicing import replace_module

ALLOCATIONS = ("uniform", "sensitivity")
SENSITIVITY_GRID = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class LowRankReport:
    """Ranks chosen per layer (None = left dense) and the parameter budget reached."""

    method: str
    allocation: str
    ranks: dict[str, int | None]
    linear_params_before: int
    linear_params_after: int

    @property
    def kept_fraction(self) -> float:
        return self.linear_params_after / self.linear_params_before

    def to_dict(self) -> dict:
        return {**self.__dict__, "kept_fraction": self.kept_fraction}


def candidate_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Full names -> nn.Linear for every linear layer inside the decoder blocks."""
    adapter = get_adapter(model)
    names = {id(m): n for n, m in model.named_modules()}
    found = {}
    for block in adapter.blocks(model):
        for layer in adapter.linear_layers(block).values():
            if isinstance(layer, nn.Linear):
                found[names[id(layer)]] = layer
    if not found:
        raise SparselmError(f"found no nn.Linear layers in the decoder blocks of {type(model).__name__}; "
                            "low-rank factorization needs nn.Linear projections (llama, mistral, qwen2, opt)")
    return found


@torch.no_grad()
def calibration_loss(model: nn.Module, calib_ids: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy over `calib_ids`."""
    device = model_device(model)
    total, count = 0.0, 0
    for start in range(0, calib_ids.shape[0], batch_size):
        batch = calib_ids[start:start + batch_size].to(device)  # [B, S]
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1]  # [B, S-1, V]
        total += F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    return total / count


@torch.no_grad()
def measure_sensitivity(model: nn.Module, layers: dict[str, nn.Linear], decompositions: dict, calib_ids: torch.Tensor,
                        grid=SENSITIVITY_GRID, batch_size: int = 8, progress: bool = True) -> dict[str, dict[float, float]]:
    """Loss increase on `calib_ids` when one layer alone is truncated to each parameter ratio in
    `grid` (the rest dense); the model is restored after each measurement."""
    was_training = model.training
    model.eval()
    base = calibration_loss(model, calib_ids, batch_size)
    result = {}
    try:
        for name in tqdm(layers, desc="sensitivity", disable=not progress, leave=False):
            layer = layers[name]
            result[name] = {}
            for ratio in grid:
                rank = rank_for_ratio(ratio, *layer.weight.shape)
                if rank is None:
                    continue
                a, b = decompositions[name].factors(rank, layer.weight.dtype)
                replace_module(model, name, LowRankLinear.from_factors(a, b, layer.bias))
                result[name][ratio] = calibration_loss(model, calib_ids, batch_size) - base
                replace_module(model, name, layer)
    finally:
        model.train(was_training)
    return result


def lowrank(model: nn.Module, calib_ids: torch.Tensor | None = None, *, keep: float = 0.8, method: str = "whiten",
            allocation: str = "uniform", ranks: dict[str, int] | None = None, alpha: float = 0.5,
            sensitivity_rows: int = 8, batch_size: int = 8, progress: bool = True) -> LowRankReport:
    """Factorize the decoder-block linears of `model` in place so they keep `keep` of their
    weight parameters. `method` in {"svd", "asvd", "whiten"}; "asvd"/"whiten" and the
    "sensitivity" allocation need `calib_ids` [n, seq_len]. Explicit `ranks` {layer name: rank}
    override the allocation for the layers they name. Returns the ranks chosen.
    """
    check_keep(keep)
    if method not in METHODS:
        raise SparselmError(f"unknown low-rank method {method!r}; choose one of {', '.join(METHODS)}")
    if allocation not in ALLOCATIONS:
        raise SparselmError(f"unknown rank allocation {allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
    layers = candidate_layers(model)
    shapes = {n: tuple(l.weight.shape) for n, l in layers.items()}
    for name, rank in (ranks or {}).items():
        if name not in layers:
            raise SparselmError(f"ranks names {name!r}, which is not a decoder-block linear layer; "
                                f"layers look like {next(iter(layers))!r}")
        check_rank(rank, *shapes[name], name=name)
    needs_data = method != "svd" or allocation == "sensitivity"
    if needs_data:
        if calib_ids is None:
            raise SparselmError(f"method {method!r} with allocation {allocation!r} needs calibration data; "
                                "pass calib_ids (sparselm.data.calibration(tokenizer, ...)) or use method 'svd'")
        check_calibration(calib_ids)
    if allocation == "uniform":
        chosen = uniform_ranks(shapes, keep)  # raises before any work if keep leaves rank 0

    kinds = {"svd": (), "asvd": ("mean_abs",), "whiten": ("gram",)}[method]
    stats = collect_input_statistics(model, calib_ids, layers, kinds, batch_size, progress) if kinds else {}
    decompositions = {}
    for name in tqdm(layers, desc=f"{method} factorization", disable=not progress, leave=False):
        s = stats.get(name, {})
        decompositions[name] = decompose(layers[name].weight, method, gram=s.get("gram"),
                                         mean_abs_input=s.get("mean_abs"), alpha=alpha)
    if allocation == "sensitivity":
        rows = calib_ids[:sensitivity_rows]
        sensitivity = measure_sensitivity(model, layers, decompositions, rows, batch_size=batch_size,
                                          progress=progress)
        chosen = sensitivity_ranks(shapes, sensitivity, keep)
    chosen.update(ranks or {})
    for name, rank in chosen.items():
        if rank is None or not rank_saves_parameters(rank, *shapes[name]):
            chosen[name] = None  # a rank that saves nothing: the dense layer is better
            continue
        layer = layers[name]
        a, b = decompositions[name].factors(rank, layer.weight.dtype)
        replace_module(model, name, LowRankLinear.from_factors(a, b, layer.bias))
    before = sum(o * i for o, i in shapes.values())
    return LowRankReport(method, allocation, chosen, before, kept_parameters(chosen, shapes))
