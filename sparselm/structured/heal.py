"""Healing: a short distillation fine-tune of the pruned model against the dense model's logits.

Loss per token: KL(p_teacher || p_student) over the vocabulary at temperature T, times T^2
(Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", sec. 2), averaged over
tokens. AdamW with linear warmup and cosine decay, a fixed step budget, batches drawn in a
seeded order from the calibration windows.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from sparselm.errors import SparselmError
from sparselm.lowrank.input_statistics import check_calibration, model_device


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of T^2 * KL(softmax(t/T) || softmax(s/T)); logits [B, S, V]."""
    vocab = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)  # [N, V]
    t = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)  # [N, V]
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


@torch.no_grad()
def evaluate_distillation(student: nn.Module, teacher: nn.Module, calib_ids: torch.Tensor,
                          batch_size: int = 8, temperature: float = 1.0) -> float:
    """Mean distillation loss of `student` over all of `calib_ids` (eval mode, no update)."""
    check_calibration(calib_ids)
    device = model_device(student)
    modes = student.training, teacher.training
    student.eval(), teacher.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, calib_ids.shape[0], batch_size):
            batch = calib_ids[start:start + batch_size].to(device)
            loss = distillation_loss(student(input_ids=batch, use_cache=False).logits,
                                     teacher(input_ids=batch, use_cache=False).logits, temperature)
            total, count = total + loss.item() * batch.shape[0], count + batch.shape[0]
    finally:
        student.train(modes[0]), teacher.train(modes[1])
    return total / count


def heal(student: nn.Module, teacher: nn.Module, calib_ids: torch.Tensor, steps: int, *, lr: float = 3e-4,
         batch_size: int = 8, temperature: float = 1.0, warmup: int | None = None, seed: int = 0,
         progress: bool = True) -> list[float]:
    """Fine-tune `student` in place for `steps` AdamW steps; returns the per-step losses.

    The teacher is frozen and only run forward. Dropout stays off (eval mode) so the student
    learns the teacher's deterministic function.
    """
    if not isinstance(steps, int) or steps < 0:
        raise SparselmError(f"heal steps {steps!r} must be a whole number >= 0")
    check_calibration(calib_ids)
    if steps == 0:
        return []
    device = model_device(student)
    warmup = max(1, steps // 10) if warmup is None else warmup
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def lr_factor(step):  # linear warmup then cosine decay to 10% of lr
        if step < warmup:
            return (step + 1) / warmup
        progress_frac = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_frac))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(calib_ids.shape[0], generator=generator)
    modes = student.training, teacher.training
    student.eval(), teacher.eval()
    losses = []
    try:
        bar = tqdm(range(steps), desc="healing", disable=not progress, leave=False)
        for step in bar:
            rows = torch.arange(step * batch_size, (step + 1) * batch_size) % calib_ids.shape[0]
            batch = calib_ids[order[rows]].to(device)  # [B, S]
            with torch.no_grad():
                teacher_logits = teacher(input_ids=batch, use_cache=False).logits
            loss = distillation_loss(student(input_ids=batch, use_cache=False).logits, teacher_logits, temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        optimizer.zero_grad(set_to_none=True)
        student.train(modes[0]), teacher.train(modes[1])
    return losses
