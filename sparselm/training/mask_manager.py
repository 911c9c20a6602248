"""The mask manager: keeps a model sparse through training and evolves its masks.

Lifecycle, from a plain PyTorch loop:

    manager = MaskManager(SparseTrainingConfig(sparsity=0.9, method="rigl", total_steps=N))
    manager.attach(model, optimizer)       # draws masks, zeroes masked weights
    for batch in data:
        loss = model(**batch).loss; loss.backward()
        optimizer.step(); manager.step(); optimizer.zero_grad()
    report = manager.finalize()

Guarantees after `attach` and after every `step()`: every masked weight is exactly 0 and
so is every optimizer-state tensor entry shaped like it (Adam moments, SGD momentum).
Gradients of masked weights are zeroed by a hook before the optimizer sees them, so they
also stay out of gradient clipping; on RigL update steps the hook first keeps a copy of
the dense gradient (RigL grows where it is largest). SET and RigL keep the number of active
weights of every layer constant; under torch.distributed, RigL's dense gradients are
averaged over ranks, random draws use the same seed on all ranks, and each updated mask
is broadcast from rank 0, so masks are identical everywhere after every update.
"""
from __future__ import annotations

import torch
from torch import nn

from sparselm.errors import SparselmError
from sparselm.training import distributed
from sparselm.training.config import SparseTrainingConfig
from sparselm.training.densities import layer_densities
from sparselm.training.mask_updates import (
    active_count, check_nm, drop_and_grow, magnitude_mask, prune_by_magnitude, random_mask,
)
from sparselm.training.schedules import cosine_drop_fraction, gmp_sparsity, is_dst_update, is_gmp_update
from sparselm.training.targets import SparseTarget, sparse_targets


class MaskManager:
    """Owns one bool mask per sparsified weight (same layout as the weight)."""

    def __init__(self, config: SparseTrainingConfig):
        self.config = config
        self.targets: list[SparseTarget] = []
        self.masks: dict[str, torch.Tensor] = {}
        self.densities: dict[str, float] = {}
        self.step_count = 0
        self.history: list[dict] = []  # one entry per mask update
        self.optimizer: torch.optim.Optimizer | None = None
        self._dense_grads: dict[str, torch.Tensor] = {}
        self._hooks: list = []
        self._generator = torch.Generator().manual_seed(config.seed)
        self.finalized = False

    # ------------------------------------------------------------------ lifecycle
    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> "MaskManager":
        """Choose the targets, draw the initial masks and zero the masked weights.

        `model` may be wrapped in DistributedDataParallel. Static, SET and RigL start at
        their final density with a random mask (identical on all ranks); GMP starts dense
        (or at `initial_sparsity`, by magnitude).
        """
        if self.targets:
            raise SparselmError("this MaskManager is already attached; create a new one per model")
        cfg = self.config
        self.optimizer = optimizer
        self.targets = sparse_targets(distributed.unwrap(model), cfg.sparsify_embeddings, cfg.sparsify_lm_head)
        if not self.targets:
            raise SparselmError("found no linear layers to sparsify in this model; "
                                "sparse training needs nn.Linear (or Conv1D) weights")
        shapes = {t.name: t.out_in_shape for t in self.targets}
        if cfg.nm is not None:
            for t in self.targets:
                check_nm(*cfg.nm, t.out_in_shape[1])
        self.densities = layer_densities(shapes, cfg.sparsity, cfg.distribution)
        for t in self.targets:
            if cfg.method == "gmp":
                start_density = 1.0 - cfg.initial_sparsity * (1.0 - self.densities[t.name]) / max(cfg.sparsity, 1e-12)
                if start_density >= 1.0:
                    mask = torch.ones(t.out_in_shape, dtype=torch.bool)
                else:
                    mask = magnitude_mask(t.as_out_in(t.param.data).cpu(), start_density)
            else:
                mask = random_mask(t.out_in_shape, self.densities[t.name], self._generator, cfg.nm)
            mask = t.from_out_in(mask).to(t.param.device)
            self.masks[t.name] = distributed.broadcast_mask_(mask)
            self._hooks.append(t.param.register_hook(self._gradient_hook(t.name)))
        self.apply_masks()
        return self

    def step(self) -> None:
        """Call once after every optimizer step: update masks when due, then re-apply them."""
        if self.finalized or not self.targets:
            raise SparselmError("call MaskManager.attach(model, optimizer) before step(), and not after finalize()")
        self.step_count += 1
        cfg = self.config
        if cfg.method in ("set", "rigl") and is_dst_update(self.step_count, cfg.update_interval, cfg.end_step):
            self._drop_and_grow()
        elif cfg.method == "gmp" and is_gmp_update(self.step_count, cfg.gmp_start, cfg.gmp_end, cfg.gmp_frequency):
            self._gradual_prune()
        self._dense_grads.clear()
        self.apply_masks()

    def finalize(self) -> dict:
        """Stop evolving the masks: remove the gradient hooks, zero masked weights for good,
        and return the per-layer sparsity report."""
        self.apply_masks()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self.finalized = True
        return self.sparsity_report()

    # ------------------------------------------------------------------ masks
    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every masked weight and the matching optimizer-state entries."""
        for t in self.targets:
            mask = self.masks[t.name]
            t.param.mul_(mask)
            self._zero_optimizer_state(t.param, ~mask)

    def _zero_optimizer_state(self, param: nn.Parameter, where: torch.Tensor) -> None:
        if self.optimizer is None:
            return
        for value in self.optimizer.state.get(param, {}).values():
            if torch.is_tensor(value) and value.shape == param.shape:
                value.masked_fill_(where, 0)

    def _gradient_hook(self, name: str):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            if self._capturing_dense_gradient():
                if name in self._dense_grads:
                    self._dense_grads[name] += grad.detach().float()  # gradient accumulation
                else:
                    self._dense_grads[name] = grad.detach().float().clone()
            return grad * self.masks[name]
        return hook

    def _capturing_dense_gradient(self) -> bool:
        cfg = self.config
        return (cfg.method == "rigl" and not self.finalized
                and is_dst_update(self.step_count + 1, cfg.update_interval, cfg.end_step))

    @torch.no_grad()
    def _drop_and_grow(self) -> None:
        cfg = self.config
        fraction = cosine_drop_fraction(self.step_count, cfg.drop_fraction, cfg.end_step)
        changed = 0
        for t in self.targets:
            mask = t.as_out_in(self.masks[t.name]).cpu()
            weight = t.as_out_in(t.param.data).cpu()
            if cfg.method == "rigl":
                grad = self._dense_grads.get(t.name)
                if grad is None:
                    raise SparselmError(
                        f"RigL found no gradient for {t.name} at step {self.step_count}; call "
                        "loss.backward() and optimizer.step() before MaskManager.step()")
                grow_scores = t.as_out_in(distributed.all_reduce_mean_(grad)).cpu().abs()
            else:
                grow_scores = torch.rand(mask.shape, generator=self._generator)
            new_mask, grown, dropped = drop_and_grow(mask, weight, grow_scores, fraction, self._generator, cfg.nm)
            new_mask = distributed.broadcast_mask_(t.from_out_in(new_mask).to(t.param.device))
            grown = t.from_out_in(grown).to(t.param.device)
            dropped = t.from_out_in(dropped).to(t.param.device)
            t.param.masked_fill_(grown | dropped, 0.0)  # new connections start at zero
            self._zero_optimizer_state(t.param, grown | dropped)  # ... with fresh optimizer state
            self.masks[t.name] = new_mask
            changed += int(grown.sum())
        self.history.append({"step": self.step_count, "drop_fraction": fraction, "regrown": changed})

    @torch.no_grad()
    def _gradual_prune(self) -> None:
        cfg = self.config
        for t in self.targets:
            final = 1.0 - self.densities[t.name]
            initial = cfg.initial_sparsity * final / max(cfg.sparsity, 1e-12)
            target = gmp_sparsity(self.step_count, final, cfg.gmp_start, cfg.gmp_end, initial)
            keep = active_count(t.param.numel(), 1.0 - target)
            mask = prune_by_magnitude(self.masks[t.name].cpu(), t.param.data.cpu(), keep)
            self.masks[t.name] = distributed.broadcast_mask_(mask.to(t.param.device))
        self.history.append({"step": self.step_count, "sparsity": self.current_sparsity()})

    # ------------------------------------------------------------------ reporting / state
    def current_sparsity(self) -> float:
        """Fraction of masked weights over all targets."""
        total = sum(m.numel() for m in self.masks.values())
        return 1.0 - sum(int(m.sum()) for m in self.masks.values()) / max(total, 1)

    def sparsity_report(self) -> dict:
        """Measured zeros per target weight (from the weights, not the masks) and overall."""
        layers = {t.name: float((t.param == 0).float().mean()) for t in self.targets}
        total = sum(t.param.numel() for t in self.targets)
        zeros = sum(int((t.param == 0).sum()) for t in self.targets)
        return {"layers": layers, "sparsity": zeros / max(total, 1), "mask_sparsity": self.current_sparsity(),
                "method": self.config.method, "distribution": self.config.distribution, "steps": self.step_count}

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "masks": {k: v.cpu() for k, v in self.masks.items()},
                "generator": self._generator.get_state(), "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        """Restore masks, step and random state (call after attach, e.g. when resuming)."""
        missing = set(self.masks) - set(state["masks"])
        if missing:
            raise SparselmError(f"checkpoint has no masks for {sorted(missing)[:3]}; it was written "
                                "for another model or another sparsify_* setting")
        for name in self.masks:
            self.masks[name] = state["masks"][name].to(self.masks[name].device).bool()
        self.step_count = int(state["step_count"])
        self._generator.set_state(state["generator"])
        self.history = list(state.get("history", []))
        self.apply_masks()
