"""Packed sparse + quantized storage: `QuantSparseLinear`.

A quantized weight W_hat [R, C] (int4 or int8 codes, fp16 group scales, optional zero points)
is stored as

    mask    uint8 [ceil(R*C / 8)]   bit k (little-endian within a byte) = 1 where W_hat != 0,
                                    row-major order; absent when storing all codes is smaller
    codes   uint8                   the codes of the non-zeros only (all codes without a mask),
                                    row-major, offset to be unsigned; int4: two per byte, the
                                    first in the low nibble
    scales  float16 [R, G]
    zeros   uint8 [R, G]            only when asymmetric (one byte per group)

Guarantee: `dequantize()` is bit-identical to `QuantizedWeight.dequantize()` (both compute
(q - z) * s in float32 from the same fp16 scales), so `forward` equals a dense `nn.Linear`
holding the dequantized weight. At 50% sparsity and int4 with groups of 128 this is about
1/8 (mask) + 1/4 (codes) + 1/64 (scales) = 0.39 bytes per parameter, against 2 for bf16.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparselm.quant.groupwise import QuantizedWeight, code_range, num_groups

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool [N] -> uint8 [ceil(N/8)], little-endian within each byte."""
    flat = mask.flatten().to(torch.uint8)  # [N]
    pad = (-flat.numel()) % 8
    flat = F.pad(flat, (0, pad)).view(-1, 8)  # [N/8, 8]
    return (flat * _BIT_WEIGHTS.to(flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """uint8 [ceil(N/8)] -> bool [N]."""
    bits = packed.unsqueeze(1).bitwise_and(_BIT_WEIGHTS.to(packed.device)).ne(0)  # [N/8, 8]
    return bits.flatten()[:count]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [N] (each < 2^bits) -> uint8; int4 puts two codes in a byte."""
    flat = codes.flatten().to(torch.uint8)
    if bits == 8:
        return flat
    flat = F.pad(flat, (0, flat.numel() % 2)).view(-1, 2)  # [N/2, 2]
    return flat[:, 0] | (flat[:, 1] << 4)


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """uint8 -> unsigned codes [count] as int16."""
    if bits == 8:
        return packed[:count].to(torch.int16)
    pairs = torch.stack([packed & 0x0F, packed >> 4], dim=1)  # [N/2, 2]
    return pairs.flatten()[:count].to(torch.int16)


class QuantSparseLinear(nn.Module):
    """A linear layer whose weight lives as packed (sparse) integer codes; see the module doc.

    The forward pass dequantizes the weight on the fly (to the input dtype) and calls
    `F.linear`: this is a storage format, and its output equals the dense dequantized layer.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, symmetric: bool,
                 nnz: int | None, bias: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.nnz = nnz  # None: every code stored, no mask
        self.weight_dtype = dtype
        stored = in_features * out_features if nnz is None else nnz
        code_bytes = stored if bits == 8 else (stored + 1) // 2
        g = num_groups(in_features, group_size)
        self.register_buffer("codes", torch.zeros(code_bytes, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, g, dtype=torch.float16))
        self.register_buffer("zeros", None if symmetric else torch.zeros(out_features, g, dtype=torch.uint8))
        self.register_buffer("mask", None if nnz is None else
                             torch.zeros((in_features * out_features + 7) // 8, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                       dtype: torch.dtype = torch.float32, sparse: bool | None = None) -> "QuantSparseLinear":
        """Pack `qw`. sparse=None picks the smaller of masked and plain storage."""
        rows, cols = qw.shape
        col_group = torch.arange(cols, device=qw.codes.device) // qw.group_size  # [C]
        zero_codes = qw.zeros.to(torch.int16)[:, col_group]  # [R, C]; code of the value 0
        codes = qw.codes.to(torch.int16)
        if qw.keep is not None:
            codes = torch.where(qw.keep, codes, zero_codes)
        nonzero = codes != zero_codes  # [R, C]
        nnz = int(nonzero.sum())
        if sparse is None:
            masked_bits = rows * cols + nnz * qw.bits
            sparse = masked_bits < rows * cols * qw.bits
        lo, _ = code_range(qw.bits, qw.symmetric)
        unsigned = codes - lo  # [R, C], in [0, 2^bits)
        layer = cls(cols, rows, qw.bits, qw.group_size, qw.symmetric, nnz if sparse else None,
                    bias is not None, dtype)
        layer.codes = pack_codes(unsigned[nonzero] if sparse else unsigned.flatten(), qw.bits)
        layer.scales = qw.scales.half().clone()
        if not qw.symmetric:
            layer.zeros = qw.zeros.to(torch.uint8).clone()
        if sparse:
            layer.mask = pack_bits(nonzero)
        if bias is not None:
            layer.bias.data.copy_(bias.detach().to(dtype))
        return layer.to(qw.codes.device)

    def quantized(self) -> QuantizedWeight:
        """Unpack to codes [R, C] (int16) and group params; pruned entries get the zero point."""
        rows, cols = self.out_features, self.in_features
        lo, _ = code_range(self.bits, self.symmetric)
        g = num_groups(cols, self.group_size)
        zeros = self.zeros if self.zeros is not None else torch.zeros(rows, g, dtype=torch.uint8,
                                                                       device=self.scales.device)
        col_group = torch.arange(cols, device=self.scales.device) // self.group_size  # [C]
        codes = zeros.to(torch.int16)[:, col_group].clone()  # [R, C]
        if self.mask is None:
            codes = unpack_codes(self.codes, self.bits, rows * cols).view(rows, cols) + lo
        else:
            nonzero = unpack_bits(self.mask, rows * cols).view(rows, cols)  # [R, C]
            codes[nonzero] = unpack_codes(self.codes, self.bits, self.nnz) + lo
        return QuantizedWeight(codes, self.scales, zeros, self.bits, self.group_size, self.symmetric)

    def dequantize(self) -> torch.Tensor:
        """The weight [R, C] in float32, bit-identical to the dequantized weight that was packed."""
        return self.quantized().dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantize().to(self.weight_dtype).to(x.dtype)  # [R, C]; same rounding as the dense model
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def weight_nbytes(self) -> int:
        """Bytes of the packed weight (codes, mask, scales, zero points; not the bias)."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.mask, self.scales, self.zeros)
                   if t is not None)

    def bytes_per_parameter(self) -> float:
        return self.weight_nbytes() / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        kind = "dense" if self.mask is None else f"sparse nnz={self.nnz}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}, "
                f"group_size={self.group_size}, {'symmetric' if self.symmetric else 'asymmetric'}, {kind}")


def packed_bytes_per_parameter(qw: QuantizedWeight) -> float:
    """Bytes per weight `qw` would take once packed (without packing the whole model)."""
    return QuantSparseLinear.from_quantized(qw).bytes_per_parameter()
