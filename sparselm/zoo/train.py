"""A plain causal-LM training loop (AdamW, linear warm-up then cosine decay), CPU friendly."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm


def random_windows(ids: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """[batch_size, seq_len + 1] windows of a 1-D token stream at seeded random offsets."""
    starts = torch.randint(0, ids.numel() - seq_len - 1, (batch_size,), generator=gen)
    return torch.stack([ids[s:s + seq_len + 1] for s in starts.tolist()])


def cosine_lr(step: int, steps: int, lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def adamw_with_decay_groups(model, lr: float, weight_decay: float = 0.1) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norms, biases and gains undecayed), betas (0.9, 0.95)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def train_causal_lm(model, train_ids: torch.Tensor, *, steps: int, batch_size: int, seq_len: int, lr: float,
                    seed: int = 0, warmup: int | None = None, weight_decay: float = 0.1,
                    progress: bool = True, desc: str = "train",
                    callback: Callable[[int, float], None] | None = None) -> list[float]:
    """Train `model` in place on random windows of `train_ids`; returns the per-step losses.

    `callback(step, loss)` runs after each optimizer step (e.g. to log or re-apply masks).
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    warmup = max(1, steps // 20) if warmup is None else warmup
    opt = adamw_with_decay_groups(model, lr, weight_decay)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup)
        batch = random_windows(train_ids, batch_size, seq_len, gen)  # [B, S+1]
        logits = model(input_ids=batch[:, :-1]).logits  # [B, S, V]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if callback is not None:
            callback(step, losses[-1])
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses
