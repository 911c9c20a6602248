"""The one config of sparse training, validated on construction."""
from __future__ import annotations

from dataclasses import dataclass

from sparselm.errors import SparselmError
from sparselm.training.densities import DISTRIBUTIONS, check_sparsity

METHODS = ("static", "gmp", "set", "rigl")


def parse_nm(pattern: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """"2:4" -> (2, 4); None stays None."""
    if pattern is None or isinstance(pattern, tuple):
        return pattern
    try:
        n, m = (int(part) for part in str(pattern).split(":"))
    except ValueError:
        raise SparselmError(f"N:M pattern must look like '2:4', got {pattern!r}") from None
    return n, m


@dataclass(frozen=True)
class SparseTrainingConfig:
    """What to sparsify during training and how the masks evolve.

    sparsity:        fraction of zeros over the sparsified layers at the end of training.
    method:          static (fixed random mask), gmp (cubic magnitude ramp, Zhu & Gupta 2017),
                     set (Mocanu et al. 2018) or rigl (Evci et al. 2020).
    distribution:    uniform, or erk (Erdos-Renyi densities solved to the same total).
    total_steps:     optimizer steps of the whole run (sets the RigL/SET stop and GMP end).
    update_interval: SET/RigL mask update every this many steps (RigL: 100).
    drop_fraction:   SET/RigL initial drop fraction, cosine-annealed to 0 (RigL: 0.3).
    end_fraction:    SET/RigL stop updating after this fraction of total_steps (RigL: 0.75).
    gmp_start_fraction / gmp_end_fraction / gmp_frequency: the cubic ramp's t0, end and dt.
    nm:              optional N:M pattern kept by every mask during training (static/set/rigl).
    sparsify_embeddings / sparsify_lm_head: both dense by default (RigL's practice).
    """
    sparsity: float
    method: str = "rigl"
    distribution: str = "uniform"
    total_steps: int = 1000
    update_interval: int = 100
    drop_fraction: float = 0.3
    end_fraction: float = 0.75
    gmp_start_fraction: float = 0.1
    gmp_end_fraction: float = 0.75
    gmp_frequency: int = 10
    initial_sparsity: float = 0.0
    nm: tuple[int, int] | None = None
    sparsify_embeddings: bool = False
    sparsify_lm_head: bool = False
    seed: int = 0

    def __post_init__(self):
        check_sparsity(self.sparsity)
        check_sparsity(self.initial_sparsity, "initial sparsity")
        if self.method not in METHODS:
            raise SparselmError(f"unknown sparse-training method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.distribution not in DISTRIBUTIONS:
            raise SparselmError(
                f"unknown density distribution {self.distribution!r}; use one of {', '.join(DISTRIBUTIONS)}")
        if int(self.total_steps) < 1:
            raise SparselmError(f"total steps must be >= 1, got {self.total_steps}")
        if int(self.update_interval) < 1:
            raise SparselmError(
                f"update interval must be a positive number of steps, got {self.update_interval}; RigL uses 100")
        if not 0.0 < self.drop_fraction < 1.0:
            raise SparselmError(
                f"drop fraction must be in (0, 1), got {self.drop_fraction}; RigL uses 0.3")
        if not 0.0 < self.end_fraction <= 1.0:
            raise SparselmError(f"end fraction must be in (0, 1], got {self.end_fraction}; RigL uses 0.75")
        if not 0.0 <= self.gmp_start_fraction < self.gmp_end_fraction <= 1.0:
            raise SparselmError(
                "GMP needs 0 <= start fraction < end fraction <= 1, got "
                f"{self.gmp_start_fraction} and {self.gmp_end_fraction}")
        if int(self.gmp_frequency) < 1:
            raise SparselmError(f"GMP frequency must be a positive number of steps, got {self.gmp_frequency}")
        nm = parse_nm(self.nm)
        object.__setattr__(self, "nm", nm)
        if nm is not None:
            n, m = nm
            if not 0 < n < m:
                raise SparselmError(f"an N:M pattern needs 0 < N < M, got {n}:{m}; e.g. use 2:4")
            if self.method == "gmp":
                raise SparselmError(
                    "N:M masks are supported for static, set and rigl; GMP's cubic ramp prunes "
                    "unstructured weights. Drop --nm or pick another method")
            if abs((1.0 - n / m) - self.sparsity) > 1e-6:
                raise SparselmError(
                    f"an {n}:{m} pattern has sparsity {1 - n / m:g}, but sparsity {self.sparsity:g} "
                    f"was asked; pass sparsity={1 - n / m:g}")
            if self.distribution != "uniform":
                raise SparselmError("N:M masks fix every layer's density at N/M; use distribution='uniform'")

    @property
    def end_step(self) -> int:
        """SET/RigL stop updating at this step."""
        return max(1, int(self.end_fraction * self.total_steps))

    @property
    def gmp_start(self) -> int:
        return int(self.gmp_start_fraction * self.total_steps)

    @property
    def gmp_end(self) -> int:
        return max(self.gmp_start + 1, int(self.gmp_end_fraction * self.total_steps))
