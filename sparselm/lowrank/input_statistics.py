"""Statistics of the inputs of chosen layers on calibration data, gathered with forward hooks.

Legend: B = batch, S = sequence, N = tokens (B*S), I = in features of the hooked layer.

All statistics are means over every calibration token (float64 accumulators, so many batches
do not lose precision), taken on the model as it is (the dense model, as SVD-LLM and ASVD do):
- "gram": X^T X / N, [I, I], the input second moment (whitened SVD, head scores).
- "mean_abs": mean |x_j|, [I] (ASVD's column scaling).
- "sq_mean": mean x_j^2, [I] (activation-weighted neuron scores; sqrt gives ||X_j||/sqrt(N)).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from sparselm.errors import SparselmError

KINDS = ("gram", "mean_abs", "sq_mean")


def check_calibration(calib_ids: torch.Tensor) -> None:
    if not isinstance(calib_ids, torch.Tensor) or calib_ids.dim() != 2 or calib_ids.dtype != torch.long:
        raise SparselmError("calibration data must be a LongTensor [n, seq_len] of token ids; "
                            "build it with sparselm.data.calibration(tokenizer, ...)")
    if calib_ids.numel() == 0:
        raise SparselmError("calibration data is empty; pass at least one sequence")


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def run_calibration(model: nn.Module, calib_ids: torch.Tensor, batch_size: int = 8,
                    progress: bool = True, desc: str = "calibration") -> None:
    """Forward every calibration row through `model` (no cache), for the hooks to observe."""
    check_calibration(calib_ids)
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, calib_ids.shape[0], batch_size), desc=desc, disable=not progress, leave=False):
            model(input_ids=calib_ids[start:start + batch_size].to(device), use_cache=False)
    finally:
        model.train(was_training)


@torch.no_grad()
def collect_input_statistics(model: nn.Module, calib_ids: torch.Tensor, modules: dict[str, nn.Module],
                             kinds: tuple[str, ...] = ("gram",), batch_size: int = 8,
                             progress: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """Run the calibration data and return {name: {kind: tensor}} for the inputs of `modules`.

    The model is not modified; hooks are removed even if the forward raises.
    """
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise SparselmError(f"unknown statistics {sorted(unknown)}; choose from {', '.join(KINDS)}")
    sums: dict[str, dict[str, torch.Tensor]] = {name: {} for name in modules}
    counts = dict.fromkeys(modules, 0)

    def make_hook(name):
        def hook(_module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            x = x.detach().reshape(-1, x.shape[-1]).double()  # [N, I]
            acc = sums[name]
            for kind in kinds:
                if kind == "gram":
                    value = x.T @ x  # [I, I]
                elif kind == "mean_abs":
                    value = x.abs().sum(0)  # [I]
                else:
                    value = x.square().sum(0)  # [I]
                acc[kind] = value if kind not in acc else acc[kind] + value
            counts[name] += x.shape[0]
        return hook

    handles = [m.register_forward_pre_hook(make_hook(n), with_kwargs=True) for n, m in modules.items()]
    try:
        run_calibration(model, calib_ids, batch_size, progress, desc="collecting activations")
    finally:
        for handle in handles:
            handle.remove()
    return {name: {kind: value / max(counts[name], 1) for kind, value in acc.items()}
            for name, acc in sums.items()}
