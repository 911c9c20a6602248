"""Schedules for sparse training: the cubic sparsity ramp of gradual magnitude pruning and
RigL's cosine-annealed drop fraction.

- GMP (Zhu & Gupta 2017, "To prune, or not to prune", eq. 1):
      s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))^3   for t0 <= t <= t0 + n * dt
  updated every dt steps; s_i before t0, s_f after t0 + n * dt.
- RigL (Evci et al. 2020, eq. 1): f(t) = alpha / 2 * (1 + cos(pi * t / T_end)), the fraction
  of active weights dropped and regrown at update step t, zero from T_end on.
"""
from __future__ import annotations

import math

from sparselm.errors import SparselmError


def gmp_sparsity(step: int, final_sparsity: float, start: int, end: int,
                 initial_sparsity: float = 0.0) -> float:
    """Target sparsity at `step` of the cubic schedule from `start` to `end` (= t0 + n*dt).

    Exactly `initial_sparsity` for step <= start and `final_sparsity` for step >= end.
    """
    if end <= start:
        raise SparselmError(f"GMP end step ({end}) must be after its start step ({start}); "
                            "pass a larger end or a smaller start")
    if step <= start:
        return float(initial_sparsity)
    if step >= end:
        return float(final_sparsity)
    progress = (step - start) / (end - start)
    return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** 3


def is_gmp_update(step: int, start: int, end: int, frequency: int) -> bool:
    """True on the steps where GMP prunes: t0, t0 + dt, ..., and the end step itself."""
    if step < start or step > end:
        return False
    return (step - start) % frequency == 0 or step == end


def cosine_drop_fraction(step: int, initial_fraction: float, end_step: int) -> float:
    """RigL's drop fraction alpha/2 * (1 + cos(pi * t / T_end)); 0 for t >= T_end."""
    if step >= end_step or end_step <= 0:
        return 0.0
    return initial_fraction / 2.0 * (1.0 + math.cos(math.pi * step / end_step))


def is_dst_update(step: int, interval: int, end_step: int) -> bool:
    """SET/RigL update the mask every `interval` steps, strictly before `end_step`."""
    return step > 0 and step % interval == 0 and step < end_step
