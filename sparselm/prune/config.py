"""Pruning configs: frozen dataclasses, validated on construction, found by name in a registry."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from sparselm.errors import SparselmError
from sparselm.prune.masks import Pattern, check_sparsity, parse_pattern


@dataclass(frozen=True)
class PruneConfig:
    """Common settings.

    sparsity: fraction of weights removed from each prunable linear layer of the decoder
        blocks (ignored for N:M patterns, whose sparsity is 1 - N/M).
    pattern: "unstructured" or "N:M" (N kept in every M consecutive inputs, e.g. "2:4").
    owl: allocate sparsity per block by outlier ratio (OWL); the mean stays `sparsity`.
    ignore: substrings of layer names (relative to the block, e.g. "self_attn.o_proj") left dense.
    lm_head: also prune the LM head, at the same sparsity / pattern, calibrated on the final
        norm's outputs (off by default, as in SparseGPT and Wanda: the head is the layer the
        logits depend on most; a tied head, which is the embedding, is refused).
    """

    sparsity: float = 0.5
    pattern: str = "unstructured"
    owl: bool = False
    owl_lambda: float = 0.08
    owl_threshold: float = 5.0
    ignore: tuple[str, ...] = ()
    lm_head: bool = False

    name = "base"
    needs_calibration = True

    def __post_init__(self):
        check_sparsity(self.sparsity)
        p = parse_pattern(self.pattern)
        object.__setattr__(self, "pattern", str(p))
        if self.owl and p.is_nm:
            raise SparselmError("OWL allocates unstructured sparsity per block; it cannot be combined with an "
                                "N:M pattern (every layer of an N:M model has the same sparsity)")
        if not 0 <= self.owl_lambda < 0.5:
            raise SparselmError(f"owl_lambda must be in [0, 0.5); got {self.owl_lambda}")
        refine = getattr(self, "refine", 0)  # Wanda and SparseGPT: CG iterations of the refit
        if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
            raise SparselmError(f"refine must be a whole number of iterations >= 0 (0: no refit); got {refine!r}")

    @property
    def parsed_pattern(self) -> Pattern:
        return parse_pattern(self.pattern)

    @property
    def effective_sparsity(self) -> float:
        p = self.parsed_pattern
        return p.sparsity if p.is_nm else self.sparsity

    def to_dict(self) -> dict:
        return {"method": self.name, **asdict(self)}


@dataclass(frozen=True)
class Magnitude(PruneConfig):
    """|W| pruning. scope="layer": each layer loses `sparsity` (N:M per row); "global": one threshold."""

    scope: str = "layer"
    name = "magnitude"
    needs_calibration = False

    def __post_init__(self):
        super().__post_init__()
        if self.scope not in ("layer", "global"):
            raise SparselmError(f"magnitude scope must be 'layer' or 'global'; got {self.scope!r}")
        if self.scope == "global" and self.parsed_pattern.is_nm:
            raise SparselmError("global magnitude pruning is unstructured; use scope='layer' with N:M")
        if self.owl:
            raise SparselmError("OWL needs activation statistics; use it with wanda or sparsegpt")


@dataclass(frozen=True)
class Wanda(PruneConfig):
    """Wanda (Sun et al. 2023). refine > 0 refits the kept weights (that many CG iterations)."""

    refine: int = 0
    name = "wanda"


@dataclass(frozen=True)
class SparseGPT(PruneConfig):
    """SparseGPT (Frantar & Alistarh 2023). refine > 0 refits the kept weights after the pass."""

    blocksize: int = 128
    percdamp: float = 0.01
    refine: int = 0
    name = "sparsegpt"

    def __post_init__(self):
        super().__post_init__()
        if self.blocksize <= 0:
            raise SparselmError(f"blocksize must be positive; got {self.blocksize}")
        if not 0 < self.percdamp < 1:
            raise SparselmError(f"percdamp must be in (0, 1); got {self.percdamp}")


METHODS: dict[str, type[PruneConfig]] = {"magnitude": Magnitude, "wanda": Wanda, "sparsegpt": SparseGPT}


def make_config(method: str, **kwargs) -> PruneConfig:
    if method not in METHODS:
        raise SparselmError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[method](**kwargs)
