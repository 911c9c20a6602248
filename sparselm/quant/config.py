"""Quantization configs: frozen dataclasses, validated on construction.

    RTN(bits=4, group_size=128)                      round-to-nearest, no calibration
    GPTQ(bits=4, group_size=128)                     GPTQ (Frantar et al. 2022), needs calibration
    SparseGPTQ(sparsity=0.5, pattern="unstructured", bits=4)
                                                     SparseGPT's joint prune + quantize pass
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from sparselm.errors import SparselmError
from sparselm.prune.masks import Pattern, check_sparsity, parse_pattern
from sparselm.quant.groupwise import check_quant_args


@dataclass(frozen=True)
class QuantConfig:
    """Common settings.

    bits: 4 or 8. group_size: columns (input features) sharing one scale; 128 by default.
    symmetric: signed codes and no zero point; False adds a uint8 zero point per group.
    ignore: substrings of layer names (relative to the block, e.g. "mlp.down_proj") left as they are.
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    ignore: tuple[str, ...] = ()

    name = "base"
    needs_calibration = False

    def __post_init__(self):
        check_quant_args(self.bits, self.group_size)
        object.__setattr__(self, "ignore", tuple(self.ignore))

    def to_dict(self) -> dict:
        return {"method": self.name, **asdict(self)}

    @property
    def label(self) -> str:
        return f"{self.name} int{self.bits} g{self.group_size}{'' if self.symmetric else ' asym'}"


@dataclass(frozen=True)
class RTN(QuantConfig):
    """Round-to-nearest, group-wise. Zeros stay exactly zero, so a pruned model keeps its mask."""

    name = "rtn"


@dataclass(frozen=True)
class GPTQ(QuantConfig):
    """GPTQ with lazy block updates; blocksize is rounded up to a multiple of group_size.

    The error compensation moves every weight, so zeros of an already-pruned model do not stay
    zero: to combine with pruning use SparseGPTQ (joint) or RTN (which keeps zeros exactly)."""

    blocksize: int = 128
    percdamp: float = 0.01
    name = "gptq"
    needs_calibration = True

    def __post_init__(self):
        super().__post_init__()
        if self.blocksize <= 0:
            raise SparselmError(f"blocksize must be positive; got {self.blocksize}")
        if not 0 < self.percdamp < 1:
            raise SparselmError(f"percdamp must be in (0, 1); got {self.percdamp}")


@dataclass(frozen=True)
class SparseGPTQ(GPTQ):
    """Prune (`sparsity`, or N:M `pattern`) and quantize in one SparseGPT pass (section 3.5)."""

    sparsity: float = 0.5
    pattern: str = "unstructured"
    name = "sparsegptq"

    def __post_init__(self):
        super().__post_init__()
        check_sparsity(self.sparsity)
        object.__setattr__(self, "pattern", str(parse_pattern(self.pattern)))

    @property
    def parsed_pattern(self) -> Pattern:
        return parse_pattern(self.pattern)

    @property
    def label(self) -> str:
        p = self.parsed_pattern
        return f"sparsegpt {p if p.is_nm else f'{self.sparsity:.0%}'} + {super().label.split(' ', 1)[1]}"


METHODS: dict[str, type[QuantConfig]] = {"rtn": RTN, "gptq": GPTQ, "sparsegptq": SparseGPTQ}


def make_quant_config(method: str, **kwargs) -> QuantConfig:
    if method not in METHODS:
        raise SparselmError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[method](**kwargs)
