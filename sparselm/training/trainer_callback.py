"""Sparse training inside a Hugging Face `Trainer`, as a `TrainerCallback`.

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[SparseTrainingCallback(SparseTrainingConfig(sparsity=0.9))])

The callback attaches a MaskManager when training begins (with the Trainer's optimizer),
calls `step()` right after every optimizer step (`on_optimizer_step`, before the gradients
are cleared, so RigL's captured dense gradients belong to that step), and finalizes at
the end. If `config.total_steps` disagrees with the Trainer's `max_steps`, the Trainer wins.
"""
from __future__ import annotations

import dataclasses

from transformers import TrainerCallback

from sparselm.training.config import SparseTrainingConfig
from sparselm.training.mask_manager import MaskManager


class SparseTrainingCallback(TrainerCallback):
    """Keeps the Trainer's model sparse; `self.manager` and `self.report` are set as it runs."""

    def __init__(self, config: SparseTrainingConfig):
        self.config = config
        self.manager: MaskManager | None = None
        self.report: dict | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        config = self.config
        if state.max_steps and state.max_steps > 0 and state.max_steps != config.total_steps:
            config = dataclasses.replace(config, total_steps=int(state.max_steps))
        self.manager = MaskManager(config).attach(model, optimizer)
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.manager.step()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.manager is not None and not self.manager.finalized:
            self.report = self.manager.finalize()
        return control
