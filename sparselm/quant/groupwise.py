"""Group-wise weight-only integer quantization (int8 / int4), round-to-nearest.

A weight W [R, C] is cut along the input dimension into groups of `group_size` columns
(the last group is narrower when C is not a multiple); every (row, group) pair has its own
scale s (and zero point z when asymmetric):

    symmetric:   q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1),   s = max|w| / (2^(b-1) - 1)
    asymmetric:  q = clamp(round(w / s) + z, 0, 2^b - 1),          s = (max - min) / (2^b - 1),
                 z = round(-min / s), with min <= 0 <= max so that 0 is represented exactly
    w_hat = (q - z) * s    (z = 0 when symmetric)

Scales are rounded to float16 *before* the codes are computed, so the fp16 scales stored by
the packed format reproduce `w_hat` bit for bit. Because 0 is always exactly representable,
a pruned (zero) weight stays exactly zero after quantization.

Legend: R = rows (out features), C = columns (in features), G = number of groups.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparselm.errors import SparselmError

SUPPORTED_BITS = (4, 8)


def check_quant_args(bits: int, group_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise SparselmError(f"bits must be one of {SUPPORTED_BITS}; got {bits!r}")
    if not isinstance(group_size, int) or group_size <= 0:
        raise SparselmError(f"group_size must be a positive integer (128 is the usual choice); got {group_size!r}")


def num_groups(columns: int, group_size: int) -> int:
    return math.ceil(columns / group_size)


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Smallest and largest integer code."""
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if symmetric else (0, (1 << bits) - 1)


def group_params(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale [R], zero [R]) for one group of columns w [R, g]; scale already fp16-exact.

    An all-zero group gets scale 1 (its codes are all the zero point)."""
    w = w.float()
    if symmetric:
        qmax = (1 << (bits - 1)) - 1
        scale = w.abs().amax(dim=1) / qmax  # [R]
        zero = torch.zeros_like(scale)
    else:
        qmax = (1 << bits) - 1
        lo = w.amin(dim=1).clamp(max=0)  # [R]; include 0 so that it stays exact
        hi = w.amax(dim=1).clamp(min=0)  # [R]
        scale = (hi - lo) / qmax
    scale = scale.half().float()  # what the packed format stores
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # all-zero (or underflowed) group
    if not symmetric:
        zero = torch.round(-lo / scale).clamp(0, qmax)  # [R]
    if torch.isinf(scale).any():
        raise SparselmError("a weight group is too large for float16 scales (|w| > 65504 * 2^(bits-1)); "
                            "the layer cannot be quantized with fp16 scales")
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Integer codes (as float) of w [R, g] with per-row scale/zero [R]."""
    lo, hi = code_range(bits, symmetric)
    return torch.clamp(torch.round(w.float() / scale.unsqueeze(1)) + zero.unsqueeze(1), lo, hi)  # [R, g]


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """w_hat = (q - z) * s, in float32; q [R, g], scale/zero [R]."""
    return (q.float() - zero.unsqueeze(1)) * scale.unsqueeze(1)  # [R, g]


@dataclass
class QuantizedWeight:
    """Integer codes and group parameters of one weight, plus its exact dequantization.

    codes: int16 [R, C] (signed when symmetric, in [0, 2^b) when asymmetric);
    scales: float16 [R, G]; zeros: uint8 [R, G] (all zero when symmetric);
    keep: bool [R, C] or None, the sparsity mask (codes outside it dequantize to exactly 0).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    symmetric: bool
    keep: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        """float32 [R, C]: (q - z) * s per group, zero outside `keep`."""
        rows, cols = self.codes.shape
        col_group = torch.arange(cols, device=self.codes.device) // self.group_size  # [C]
        s = self.scales.float()[:, col_group]  # [R, C]
        z = self.zeros.float()[:, col_group]  # [R, C]
        w = (self.codes.float() - z) * s
        if self.keep is not None:
            w = w * self.keep
        return w


def codes_from_dequantized(w_hat: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                           group_size: int, symmetric: bool, keep: torch.Tensor | None = None) -> QuantizedWeight:
    """Recover the codes of an already-quantized weight (e.g. GPTQ output) from its group params.

    Exact: w_hat = (q - z) * s in float32, so round(w_hat / s) + z is q again; the round trip
    is checked, and a mismatch (w_hat not on the grid) raises."""
    cols = w_hat.shape[1]
    col_group = torch.arange(cols, device=w_hat.device) // group_size  # [C]
    s = scales.float()[:, col_group]  # [R, C]
    z = zeros.float()[:, col_group]  # [R, C]
    lo, hi = code_range(bits, symmetric)
    q = torch.clamp(torch.round(w_hat.float() / s) + z, lo, hi)  # [R, C]
    if keep is not None:
        q = torch.where(keep, q, z)  # pruned weights: the code of 0
    qw = QuantizedWeight(q.to(torch.int16), scales.half(), zeros.to(torch.uint8), bits, group_size, symmetric, keep)
    if not torch.equal(qw.dequantize(), w_hat.float() * (keep if keep is not None else 1)):
        raise SparselmError("the weight is not on the quantization grid of its scales; it was changed after "
                            "quantization")
    return qw


def quantize_rtn(weight: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = True,
                 keep: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest group-wise quantization of weight [R, C] (any float dtype).

    keep (optional bool [R, C]): weights outside it are treated as zero (a sparse weight keeps
    its exact mask); group params are computed on the kept weights only."""
    check_quant_args(bits, group_size)
    if weight.ndim != 2:
        raise SparselmError(f"expected a 2-D weight [out, in]; got shape {tuple(weight.shape)}")
    w = weight.detach().float()  # [R, C]
    if keep is not None:
        w = w * keep
    rows, cols = w.shape
    g = num_groups(cols, group_size)
    scales = torch.empty(rows, g, device=w.device)  # [R, G]
    zeros = torch.empty(rows, g, device=w.device)  # [R, G]
    codes = torch.empty(rows, cols, device=w.device)  # [R, C]
    for j in range(g):
        sl = slice(j * group_size, min((j + 1) * group_size, cols))
        s, z = group_params(w[:, sl], bits, symmetric)
        scales[:, j], zeros[:, j] = s, z
        codes[:, sl] = quantize_codes(w[:, sl], s, z, bits, symmetric)
    if keep is not None:
        codes = torch.where(keep, codes, zeros[:, torch.arange(cols, device=w.device) // group_size])
    return QuantizedWeight(codes.to(torch.int16), scales.half(), zeros.to(torch.uint8), bits, group_size, symmetric,
                           keep)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10 log10(||x||^2 / ||x - x_hat||^2) in dB."""
    ref = reference.double()
    noise = (ref - approx.double()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / noise))


class GroupColumnQuantizer:
    """Column-at-a-time quantizer for the OBS loops of GPTQ and SparseGPT.

    Called as `quantizer(column [R], column_index, current [R, k])` where `current` holds the
    weights of the current block from that column on, already updated by the error
    compensation. At the first column of every group, the group's scale/zero are computed from
    those *updated* weights (GPTQ, Frantar et al. 2022, "group-wise" variant) and recorded;
    each column is then rounded to the nearest grid point. The caller must align its blocks
    with the groups (block size a multiple of `group_size`) so that a group never straddles two
    blocks.
    """

    def __init__(self, rows: int, columns: int, bits: int = 4, group_size: int = 128, symmetric: bool = True,
                 device=None):
        check_quant_args(bits, group_size)
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        g = num_groups(columns, group_size)
        self.scales = torch.ones(rows, g, device=device)  # [R, G]
        self.zeros = torch.zeros(rows, g, device=device)  # [R, G]

    def __call__(self, column: torch.Tensor, index: int, current: torch.Tensor) -> torch.Tensor:
        j = index // self.group_size
        if index % self.group_size == 0:
            width = min(self.group_size, current.shape[1])
            self.scales[:, j], self.zeros[:, j] = group_params(current[:, :width], self.bits, self.symmetric)
        s, z = self.scales[:, j], self.zeros[:, j]
        q = quantize_codes(column.unsqueeze(1), s, z, self.bits, self.symmetric)  # [R, 1]
        return dequantize_codes(q, s, z).squeeze(1)  # [R]

    def result(self, w_hat: torch.Tensor, keep: torch.Tensor | None = None) -> QuantizedWeight:
        """The codes and recorded group parameters of the finished weight w_hat [R, C]."""
        return codes_from_dequantized(w_hat, self.scales, self.zeros, self.bits, self.group_size, self.symmetric,
                                      keep)


def aligned_blocksize(blocksize: int, group_size: int) -> int:
    """The smallest multiple of `group_size` that is >= `blocksize` (groups never straddle blocks)."""
    return group_size * max(1, math.ceil(blocksize / group_size))
