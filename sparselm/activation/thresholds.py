"""TEAL-style training-free activation sparsity: one magnitude threshold per projection input.

TEAL (Liu et al. 2024, "Training-Free Activation Sparsity in Large Language Models"):
for a target sparsity s_p of projection p, the threshold t_p is the s_p-quantile of |x|
over calibration activations (the inverse CDF), and at inference x_i is zeroed when
|x_i| <= t_p. q/k/v (and gate/up) get separate thresholds although they share an input.
A model-wide target is the parameter-weighted mean of the s_p, allocated either uniformly
(s_p = s) or greedily: starting at 0, repeatedly raise by one step the projection whose
next step adds the least relative output error ||(x - x_s) W^T||^2 / ||x W^T||^2 per
weight, until the weighted mean reaches the target (TEAL Sec. 4.2 does the same greedy
search with the block output; we score each projection's own output, its share of it).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from sparselm.activation.projections import projection_modules, weight_numel, weight_out_in
from sparselm.errors import SparselmError

ALLOCATIONS = ("uniform", "greedy")


@torch.no_grad()
def collect_projection_inputs(model: nn.Module, calib_ids: torch.Tensor, max_rows: int = 4096,
                              batch_size: int = 4, progress: bool = False) -> dict[str, torch.Tensor]:
    """Input rows of every projection on calibration windows: {name: [R, in] float32}, at
    most `max_rows` rows each (an evenly spaced subset, deterministic)."""
    modules = projection_modules(model)
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    hooks = []
    for name, module in modules.items():
        def hook(mod, args, name=name):
            rows[name].append(args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu())  # [B*S, in]
        hooks.append(module.register_forward_pre_hook(hook))
    try:
        for i in tqdm(range(0, calib_ids.shape[0], batch_size), desc="activations", disable=not progress):
            model(input_ids=calib_ids[i:i + batch_size].to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, parts in rows.items():
        x = torch.cat(parts)  # [R, in]
        if x.shape[0] > max_rows:
            x = x[torch.linspace(0, x.shape[0] - 1, max_rows).long()]
        out[name] = x
    return out


def magnitude_threshold(x: torch.Tensor, sparsity: float) -> float:
    """The `sparsity`-quantile of |x|: zeroing |x| <= t leaves ~`sparsity` zeros (0 -> -1, none)."""
    if not 0.0 <= sparsity < 1.0:
        raise SparselmError(f"activation sparsity must be in [0, 1), got {sparsity}")
    if sparsity == 0.0:
        return -1.0
    flat = x.abs().reshape(-1).float()
    k = max(1, int(round(sparsity * flat.numel())))
    return float(torch.kthvalue(flat, k).values)


def relative_output_error(x: torch.Tensor, weight: torch.Tensor, threshold: float) -> float:
    """||(x - x_s) W^T||^2 / ||x W^T||^2 for x_s = x with |x| <= threshold zeroed. x: [R, in]."""
    removed = x * (x.abs() <= threshold)  # [R, in]
    w = weight.float()
    return float((removed @ w.t()).pow(2).sum() / (x @ w.t()).pow(2).sum().clamp_min(1e-30))


def allocate_sparsity(inputs: dict[str, torch.Tensor], modules: dict[str, nn.Module], target: float,
                      allocation: str = "uniform", step: float = 0.05, max_level: float = 0.95) -> dict[str, float]:
    """Per-projection sparsities whose parameter-weighted mean is >= `target` (uniform: equal)."""
    if not 0.0 <= target < 1.0:
        raise SparselmError(f"activation sparsity target must be in [0, 1), got {target}; e.g. 0.4")
    if allocation == "uniform":
        return {name: target for name in inputs}
    if allocation != "greedy":
        raise SparselmError(f"unknown allocation {allocation!r}; use one of {', '.join(ALLOCATIONS)}")
    params = {name: weight_numel(modules[name]) for name in inputs}
    total = sum(params.values())
    n_levels = int(round(max_level / step))
    rows = {name: x[:512] for name, x in inputs.items()}  # the error curve needs few rows
    errors = {name: [relative_output_error(rows[name], weight_out_in(modules[name]).detach(),
                                           magnitude_threshold(rows[name], lvl * step))
                     for lvl in range(n_levels + 1)] for name in inputs}
    level = {name: 0 for name in inputs}
    while sum(params[n] * level[n] * step for n in inputs) / total < target - 1e-9:
        candidates = [n for n in inputs if level[n] < n_levels]
        if not candidates:
            break
        best = min(candidates, key=lambda n: (errors[n][level[n] + 1] - errors[n][level[n]]) / params[n])
        level[best] += 1
    return {name: level[name] * step for name in inputs}


def calibrate_thresholds(model: nn.Module, calib_ids: torch.Tensor, target: float, allocation: str = "uniform",
                         inputs: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """{projection name: threshold} reaching model-wide activation sparsity `target` on the
    calibration data (pass `inputs` from collect_projection_inputs to reuse them)."""
    modules = projection_modules(model)
    inputs = inputs if inputs is not None else collect_projection_inputs(model, calib_ids)
    levels = allocate_sparsity(inputs, modules, target, allocation)
    return {name: magnitude_threshold(inputs[name], levels[name]) for name in inputs}


def weighted_sparsity(fractions: dict[str, float], modules: dict[str, nn.Module],
                      names: Iterable[str] | None = None) -> float:
    """Parameter-weighted mean of per-projection zero fractions (TEAL's model-wide sparsity)."""
    names = list(names if names is not None else fractions)
    total = sum(weight_numel(modules[n]) for n in names)
    return sum(fractions[n] * weight_numel(modules[n]) for n in names) / max(total, 1)
