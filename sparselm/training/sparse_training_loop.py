"""The causal-LM training loop of `sparselm train` and the sparse-training benchmark.

AdamW with linear warm-up and cosine decay (the built-in zoo's schedule), gradient
clipping at 1.0, a MaskManager stepping right after every optimizer step (no manager =
the dense baseline), held-out loss every `eval_every` steps, and atomic checkpoints
(`checkpoint.pt`: model, optimizer, masks, data-sampler state) from which a run resumes
bit-for-bit. Under torch.distributed the model is wrapped in DistributedDataParallel and
every rank trains on its slice of the same global batch, so a 2-process run sees the same
tokens per step as a 1-process run with the same `batch_size`.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sparselm.zoo.train import adamw_with_decay_groups, cosine_lr, random_windows
import torch.nn.functional as F
from tqdm.auto import tqdm

from sparselm.errors import SparselmError
from sparselm.training import distributed
from sparselm.training.config import SparseTrainingConfig
from sparselm.training.mask_manager import MaskManager

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainingResult:
    losses: list[float] = field(default_factory=list)           # training loss per step
    eval_log: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out loss)
    report: dict | None = None                                   # the mask manager's final report
    masks: dict | None = None                                    # final masks (name -> bool tensor)


@torch.no_grad()
def held_out_loss(model, ids: torch.Tensor, seq_len: int, max_windows: int = 16) -> float:
    """Mean next-token loss over the first `max_windows` non-overlapping windows of `ids`."""
    n = min(max_windows, ids.numel() // (seq_len + 1))
    if n == 0:
        raise SparselmError(f"held-out text has {ids.numel()} tokens, fewer than one window of {seq_len + 1}")
    windows = ids[: n * (seq_len + 1)].view(n, seq_len + 1)  # [W, S+1]
    was_training = model.training
    model.eval()
    logits = model(input_ids=windows[:, :-1]).logits.float()  # [W, S, V]
    loss = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()
    model.train(was_training)
    return loss


def _atomic_torch_save(obj, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)  # a reader sees the old checkpoint or the new one, never half
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def train_sparse(model, train_ids: torch.Tensor, val_ids: torch.Tensor, config: SparseTrainingConfig | None, *,
                 steps: int, batch_size: int, seq_len: int, lr: float, seed: int = 0, warmup: int | None = None,
                 weight_decay: float = 0.1, eval_every: int = 50, eval_windows: int = 16,
                 out_dir: str | Path | None = None, checkpoint_every: int = 100, resume: bool = True,
                 progress: bool = True, desc: str = "train") -> TrainingResult:
    """Train `model` in place for `steps` optimizer steps; sparse when `config` is given.

    With `out_dir`, writes `log.jsonl` (one line per held-out evaluation) and `checkpoint.pt`
    every `checkpoint_every` steps and at the end (rank 0 only), and resumes from an existing
    checkpoint when `resume` is True.
    """
    if steps < 1 or batch_size < 1 or seq_len < 1:
        raise SparselmError(f"steps, batch size and sequence length must be >= 1, got {steps}, {batch_size}, {seq_len}")
    world, rank = distributed.world_size(), distributed.rank()
    if batch_size % world:
        raise SparselmError(f"global batch size {batch_size} must be divisible by the {world} processes")
    if config is not None and config.total_steps != steps:
        raise SparselmError(f"config.total_steps ({config.total_steps}) must equal steps ({steps})")
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)  # same on every rank: all draw the same global batch
    warmup = max(1, steps // 20) if warmup is None else warmup
    optimizer = adamw_with_decay_groups(model, lr, weight_decay)
    trained = model
    if distributed.is_distributed():
        from torch.nn.parallel import DistributedDataParallel
        trained = DistributedDataParallel(model)
    manager = MaskManager(config).attach(trained, optimizer) if config is not None else None
    result, start = TrainingResult(), 0

    if out is not None and resume and (out / CHECKPOINT).exists():
        state = torch.load(out / CHECKPOINT, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if manager is not None:
            manager.load_state_dict(state["masks"])
        gen.set_state(state["generator"])
        start = int(state["step"])
        result.losses = list(state["losses"])
        result.eval_log = [tuple(e) for e in state["eval_log"]]

    def save_checkpoint(step: int) -> None:
        if out is None or rank != 0:
            return
        _atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "masks": manager.state_dict() if manager is not None else None,
                            "generator": gen.get_state(), "step": step, "losses": result.losses,
                            "eval_log": [list(e) for e in result.eval_log]}, out / CHECKPOINT)

    def evaluate(step: int) -> None:
        loss = held_out_loss(model, val_ids, seq_len, eval_windows)
        result.eval_log.append((step, loss))
        if out is not None and rank == 0:
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "train_loss": result.losses[-1] if result.losses else None,
                                    "held_out_loss": loss, "sparsity": manager.current_sparsity() if manager else 0.0})
                        + "\n")

    trained.train()
    bar = tqdm(range(start, steps), desc=desc, disable=not progress or rank != 0, dynamic_ncols=True,
               initial=start, total=steps)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup)
        batch = random_windows(train_ids, batch_size, seq_len, gen)  # [B, S+1]
        local = batch.chunk(world)[rank]  # [B/world, S+1]
        logits = trained(input_ids=local[:, :-1]).logits  # [b, S, V]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), local[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if manager is not None:
            manager.step()
        reported = distributed.all_reduce_mean_(loss.detach().clone()).item()
        result.losses.append(reported)
        done = step + 1
        if done % eval_every == 0 or done == steps:
            evaluate(done)
            bar.set_postfix(loss=f"{reported:.3f}", held_out=f"{result.eval_log[-1][1]:.3f}")
        if done % checkpoint_every == 0 or done == steps:
            save_checkpoint(done)
    model.eval()
    if manager is not None:
        result.report = manager.finalize()
        result.masks = {k: v.cpu().clone() for k, v in manager.masks.items()}
    return result
