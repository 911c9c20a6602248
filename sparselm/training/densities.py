"""Per-layer densities for sparse training: uniform and Erdos-Renyi(-Kernel).

ERK (Mocanu et al. 2018, "Scalable training of artificial neural networks with adaptive
sparse connectivity"; Evci et al. 2020, RigL, Appendix) gives a linear layer of shape
[n_out, n_in] the density

    d_l = eps * (n_in + n_out) / (n_in * n_out)

and solves eps so that the active weights add up to the requested total. A layer whose
density would exceed 1 is made dense, and eps is solved again over the remaining layers,
until no layer exceeds 1.
"""
from __future__ import annotations

from collections.abc import Mapping

from sparselm.errors import SparselmError

DISTRIBUTIONS = ("uniform", "erk")


def check_sparsity(sparsity: float, what: str = "sparsity") -> float:
    """Return `sparsity` as a float, or raise SparselmError if it is outside [0, 1)."""
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise SparselmError(f"{what} must be a number in [0, 1), got {sparsity!r}") from None
    if not 0.0 <= value < 1.0:
        raise SparselmError(
            f"{what} must be in [0, 1) (the fraction of weights set to zero), got {value}; "
            "e.g. use 0.9 for 90% zeros")
    return value


def uniform_densities(shapes: Mapping[str, tuple[int, int]], sparsity: float) -> dict[str, float]:
    """Every layer gets density 1 - sparsity."""
    sparsity = check_sparsity(sparsity)
    return {name: 1.0 - sparsity for name in shapes}


def erk_raw_scale(shape: tuple[int, int]) -> float:
    """(n_in + n_out) / (n_in * n_out) for a weight of shape [n_out, n_in]."""
    n_out, n_in = int(shape[0]), int(shape[1])
    return (n_in + n_out) / (n_in * n_out)


def erk_densities(shapes: Mapping[str, tuple[int, int]], sparsity: float) -> dict[str, float]:
    """Erdos-Renyi densities whose active-weight total equals (1 - sparsity) * total weights.

    Guarantees: every density is in (0, 1]; sum(d_l * numel_l) == (1 - sparsity) * sum(numel_l)
    up to float rounding; layers with density < 1 keep the ratio d_l / raw_l equal (one eps).
    """
    sparsity = check_sparsity(sparsity)
    if not shapes:
        return {}
    numel = {name: int(s[0]) * int(s[1]) for name, s in shapes.items()}
    raw = {name: erk_raw_scale(s) for name, s in shapes.items()}
    target_active = (1.0 - sparsity) * sum(numel.values())
    dense: set[str] = set()
    while True:
        # Active weights left for the sparse layers once the dense ones are paid for.
        budget = target_active - sum(numel[n] for n in dense)
        weighted = sum(raw[n] * numel[n] for n in shapes if n not in dense)
        if weighted <= 0:  # every layer became dense
            return {name: 1.0 for name in shapes}
        eps = budget / weighted
        too_dense = {n for n in shapes if n not in dense and eps * raw[n] > 1.0}
        if not too_dense:
            break
        dense |= too_dense
    return {name: 1.0 if name in dense else eps * raw[name] for name in shapes}


def layer_densities(shapes: Mapping[str, tuple[int, int]], sparsity: float,
                    distribution: str = "uniform") -> dict[str, float]:
    """Dispatch on `distribution` ("uniform" or "erk")."""
    if distribution == "uniform":
        return uniform_densities(shapes, sparsity)
    if distribution == "erk":
        return erk_densities(shapes, sparsity)
    raise SparselmError(
        f"unknown density distribution {distribution!r}; use one of {', '.join(DISTRIBUTIONS)}")
