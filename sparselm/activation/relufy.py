"""ReLU-fication (Mirzadeh et al. 2023, "ReLU Strikes Back"): swap the MLP activation for
ReLU, optionally add a ReLU after the pre-attention and pre-MLP norms (their stage 2), and
fine-tune briefly so the model recovers; the MLP's down-projection input (and with the
norm ReLUs, the q/k/v and gate/up inputs) then has exact zeros a sparse GEMV can skip.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparselm.errors import SparselmError

_ACT_ATTRS = ("act_fn", "act", "activation_fn")  # llama/mistral/qwen2, gpt2, opt
_NORM_ATTRS = ("input_layernorm", "post_attention_layernorm", "ln_1", "ln_2",
               "self_attn_layer_norm", "final_layer_norm")


@dataclass
class ReluficationResult:
    swapped: int            # MLP activations replaced
    norm_relus: int         # ReLUs added after norms
    losses: list[float]     # fine-tune losses (empty when steps == 0)


class ReluAfter(nn.Module):
    """Wraps a module and applies ReLU to its output (keeps the wrapped weights' names under `.inner`)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return torch.relu(self.inner(*args, **kwargs))


def relufy(model: nn.Module, after_norms: bool = False) -> tuple[int, int]:
    """Replace every MLP activation of the decoder blocks by ReLU (in place); with
    `after_norms`, also put a ReLU after each block's norms. Returns (swapped, norm_relus).

    Raises SparselmError if no MLP activation is found (unsupported MLP layout).
    """
    from sparselm.adapters import get_adapter

    adapter = get_adapter(model)
    swapped = added = 0
    for block in adapter.blocks(model):
        holders = [block] + [m for m in block.modules() if m is not block]
        for holder in holders:
            for attr in _ACT_ATTRS:
                act = getattr(holder, attr, None)
                if act is not None and callable(act) and not isinstance(act, (nn.Linear, nn.ModuleList)):
                    setattr(holder, attr, nn.ReLU())
                    swapped += 1
                    break
        if after_norms:
            for attr in _NORM_ATTRS:
                norm = getattr(block, attr, None)
                if isinstance(norm, nn.Module) and not isinstance(norm, ReluAfter):
                    setattr(block, attr, ReluAfter(norm))
                    added += 1
    if swapped == 0:
        raise SparselmError(
            f"found no MLP activation to replace in {type(model).__name__}; ReLU-fication supports "
            "the llama, mistral, qwen2, gpt2 and opt MLP layouts")
    config = getattr(model, "config", None)
    for key in ("hidden_act", "activation_function"):
        if config is not None and hasattr(config, key):
            setattr(config, key, "relu")
    return swapped, added


def relufy_and_finetune(model: nn.Module, train_ids: torch.Tensor, val_ids: torch.Tensor, *, steps: int,
                        batch_size: int = 8, seq_len: int = 128, lr: float = 1e-3, after_norms: bool = False,
                        seed: int = 0, progress: bool = True) -> ReluficationResult:
    """relufy() then fine-tune for a budget of `steps` optimizer steps (0 = no fine-tune)."""
    if steps < 0:
        raise SparselmError(f"the fine-tune step budget must be >= 0, got {steps}")
    swapped, added = relufy(model, after_norms)
    losses: list[float] = []
    if steps:
        from sparselm.training.sparse_training_loop import train_sparse
        losses = train_sparse(model, train_ids, val_ids, None, steps=steps, batch_size=batch_size, seq_len=seq_len,
                              lr=lr, seed=seed, eval_every=steps, progress=progress, desc="relufy fine-tune").losses
    return ReluficationResult(swapped, added, losses)
