"""Install activation thresholds on a model: forward pre-hooks (any module, reversible) or
module swaps to ActivationSparseLinear (faster decode, returns the original modules on undo)."""
from __future__ import annotations

from torch import nn

from sparselm.activation.projections import projection_modules
from sparselm.activation.sparse_linear import ActivationSparseLinear
from sparselm.errors import SparselmError


class InstalledThresholds:
    """Handle returned by install_thresholds; `remove()` restores the model exactly."""

    def __init__(self):
        self._undo: list = []

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


def _parent_and_attr(model: nn.Module, target: nn.Module) -> tuple[nn.Module, str]:
    for parent in model.modules():
        for attr, child in parent.named_children():
            if child is target:
                return parent, attr
    raise SparselmError("projection module not found in the model (was it swapped already?)")


def install_thresholds(model: nn.Module, thresholds: dict[str, float], decode_only: bool = False,
                       mode: str = "hooks") -> InstalledThresholds:
    """Zero each projection's inputs with |x| <= thresholds[name] (names from projection_modules).

    mode "hooks": a forward pre-hook per projection; "swap": replace it by ActivationSparseLinear.
    decode_only: only single-token forwards (decode steps) are sparsified; prefill stays dense.
    """
    if mode not in ("hooks", "swap"):
        raise SparselmError(f"unknown install mode {mode!r}; use 'hooks' or 'swap'")
    modules = projection_modules(model)
    unknown = set(thresholds) - set(modules)
    if unknown:
        raise SparselmError(f"no projection named {sorted(unknown)[:3]} in this model; "
                            f"names look like {list(modules)[:3]}")
    handle = InstalledThresholds()
    for name, threshold in thresholds.items():
        module = modules[name]
        if mode == "hooks":
            def hook(mod, args, t=float(threshold)):
                x = args[0]
                if decode_only and x.numel() // x.shape[-1] > 1:
                    return None
                return (x * (x.abs() > t),) + tuple(args[1:])
            handle._undo.append(module.register_forward_pre_hook(hook).remove)
        else:
            parent, attr = _parent_and_attr(model, module)
            setattr(parent, attr, ActivationSparseLinear.from_linear(module, threshold, decode_only))
            handle._undo.append(lambda p=parent, a=attr, m=module: setattr(p, a, m))
    return handle
