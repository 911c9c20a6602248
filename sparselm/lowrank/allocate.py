"""Rank allocation: which rank each layer gets so the factorized layers keep a parameter budget.

The budget `keep` is the fraction of the candidate layers' weight parameters that remain
(biases are untouched and not counted). A layer is only factorized at ranks that save
parameters, R < O*I / (O+I); otherwise it stays dense and counts in full.

- `uniform_ranks`: every layer keeps the same fraction, R = floor(keep * O*I / (O+I)).
- `sensitivity_ranks`: each layer gets its own parameter ratio from a grid, chosen from the
  measured loss increase when that layer alone is truncated (ASVD's sensitivity-based rank
  search, Yuan et al. 2023, sec. 3.3): binary-search a loss threshold, give every layer the
  smallest ratio whose increase stays under it, and keep the smallest threshold that meets the
  budget.
"""
from __future__ import annotations

import math

from sparselm.errors import SparselmError
from sparselm.lowrank.linear import break_even_rank, rank_saves_parameters


def check_keep(keep: float) -> None:
    if not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise SparselmError(f"keep={keep!r} must be a fraction in (0, 1] of the parameters to keep; "
                            "for example --keep 0.8")


def rank_for_ratio(ratio: float, out_features: int, in_features: int) -> int | None:
    """The rank that keeps `ratio` of an [O, I] weight's parameters, or None when no saving rank
    fits (ratio too close to 1: the layer stays dense)."""
    rank = math.floor(ratio * break_even_rank(out_features, in_features))
    if rank < 1 or not rank_saves_parameters(rank, out_features, in_features):
        return None
    return rank


def kept_parameters(ranks: dict[str, int | None], shapes: dict[str, tuple[int, int]]) -> int:
    """Weight parameters after factorization: R*(O+I) per factorized layer, O*I per dense one."""
    total = 0
    for name, (out_features, in_features) in shapes.items():
        rank = ranks.get(name)
        total += out_features * in_features if rank is None else rank * (out_features + in_features)
    return total


def uniform_ranks(shapes: dict[str, tuple[int, int]], keep: float) -> dict[str, int | None]:
    """R = floor(keep * O*I/(O+I)) for every layer; None (dense) where that saves nothing.

    Raises SparselmError when `keep` is so small that some layer would get rank 0.
    """
    check_keep(keep)
    ranks = {}
    for name, (out_features, in_features) in shapes.items():
        if keep < 1 and math.floor(keep * break_even_rank(out_features, in_features)) < 1:
            raise SparselmError(f"keep={keep} leaves rank 0 for {name} [{out_features}x{in_features}]; "
                                "pass a larger keep")
        ranks[name] = rank_for_ratio(keep, out_features, in_features) if keep < 1 else None
    return ranks


def sensitivity_ranks(shapes: dict[str, tuple[int, int]], sensitivity: dict[str, dict[float, float]],
                      keep: float) -> dict[str, int | None]:
    """Per-layer ranks from measured sensitivity, meeting `keep` with the smallest loss threshold.

    `sensitivity[name][ratio]` is the calibration-loss increase when only `name` is truncated to
    parameter ratio `ratio` (ratios in (0, 1)). A layer may also stay dense (ratio 1, increase 0).
    The result keeps at most `keep` of the parameters when the grid allows it; when even the
    smallest ratio everywhere is above budget, it raises.
    """
    check_keep(keep)
    budget = keep * sum(o * i for o, i in shapes.values())
    missing = set(shapes) - set(sensitivity)
    if missing:
        raise SparselmError(f"no sensitivity measured for {sorted(missing)[:3]}; measure every layer first")

    def ranks_at(threshold: float) -> dict[str, int | None]:
        chosen = {}
        for name, (out_features, in_features) in shapes.items():
            fits = [r for r, delta in sensitivity[name].items() if delta <= threshold]
            chosen[name] = rank_for_ratio(min(fits), out_features, in_features) if fits else None
        return chosen

    candidates = sorted({d for per_layer in sensitivity.values() for d in per_layer.values()})
    if kept_parameters(ranks_at(math.inf), shapes) > budget:
        raise SparselmError(f"keep={keep} is below what the sensitivity grid can reach; "
                            "pass a larger keep or a grid with smaller ratios")
    lo, hi = 0, len(candidates) - 1  # the answer is the smallest candidate index within budget
    while lo < hi:
        mid = (lo + hi) // 2
        if kept_parameters(ranks_at(candidates[mid]), shapes) <= budget:
            hi = mid
        else:
            lo = mid + 1
    chosen = ranks_at(candidates[lo])
    return _fill_budget(chosen, shapes, sensitivity, budget)


def _fill_budget(ranks: dict[str, int | None], shapes: dict[str, tuple[int, int]],
                 sensitivity: dict[str, dict[float, float]], budget: float) -> dict[str, int | None]:
    """The grid is coarse: hand the budget left over to the most sensitive factorized layers,
    raising their rank (never above break-even) while the total stays within budget."""
    order = sorted((n for n in ranks if ranks[n] is not None),
                   key=lambda n: -max(sensitivity[n].values()))
    spare = budget - kept_parameters(ranks, shapes)
    for name in order:
        out_features, in_features = shapes[name]
        extra = int(spare // (out_features + in_features))
        ceiling = math.ceil(break_even_rank(out_features, in_features)) - 1
        grow = max(0, min(extra, ceiling - ranks[name]))
        if grow and rank_saves_parameters(ranks[name] + grow, out_features, in_features):
            ranks[name] += grow
            spare -= grow * (out_features + in_features)
    return ranks
