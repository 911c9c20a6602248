"""Packed sparse + quantized layers: exact dequantization, equal forward, bytes per parameter."""
import pytest
import torch
from torch import nn

from sparselm.quant.groupwise import quantize_rtn
from sparselm.quant.packed import QuantSparseLinear, pack_bits, pack_codes, unpack_bits, unpack_codes


def test_bit_and_nibble_round_trips_on_odd_counts():
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(77, generator=gen) > 0.4
    assert torch.equal(unpack_bits(pack_bits(mask), 77), mask)
    assert pack_bits(torch.tensor([True, False, True] + [False] * 5)).tolist() == [5]
    codes = torch.randint(0, 16, (33,), generator=gen)
    assert torch.equal(unpack_codes(pack_codes(codes, 4), 4, 33), codes.to(torch.int16))
    assert pack_codes(torch.tensor([1, 2]), 4).tolist() == [0x21]  # first code in the low nibble
    codes8 = torch.randint(0, 256, (5,), generator=gen)
    assert torch.equal(unpack_codes(pack_codes(codes8, 8), 8, 5), codes8.to(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True), (8, False)])
@pytest.mark.parametrize("shape,density", [((37, 300), 0.5), ((16, 64), 1.0), ((5, 129), 0.1)])
def test_packed_layer_equals_dense_dequantized(shape, density, bits, symmetric, dtype):
    gen = torch.Generator().manual_seed(1)
    rows, cols = shape
    w = torch.randn(rows, cols, generator=gen)
    keep = torch.rand(rows, cols, generator=gen) < density
    qw = quantize_rtn(w, bits, 128, symmetric, keep=keep)
    dense = nn.Linear(cols, rows, bias=True).to(dtype)
    dense.weight.data.copy_(qw.dequantize())
    packed = QuantSparseLinear.from_quantized(qw, dense.bias, dtype=dtype)
    assert (packed.mask is not None) == (density < 0.75 if bits == 4 else density < 0.875)
    torch.testing.assert_close(packed.dequantize(), qw.dequantize(), rtol=0, atol=0)
    x = torch.randn(3, 7, cols, generator=gen).to(dtype)
    torch.testing.assert_close(packed(x), dense(x), rtol=0, atol=0)


def test_all_zero_layer():
    qw = quantize_rtn(torch.zeros(8, 40), 4, 16)
    packed = QuantSparseLinear.from_quantized(qw)
    assert packed.nnz == 0 and packed.codes.numel() == 0
    assert torch.equal(packed(torch.randn(2, 40)), torch.zeros(2, 8))


def test_bytes_per_parameter_at_half_sparsity_int4():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(256, 1024, generator=gen)
    keep = torch.rand(256, 1024, generator=gen) < 0.5
    qw = quantize_rtn(w, 4, 128, keep=keep)
    packed = QuantSparseLinear.from_quantized(qw)
    nnz = int((qw.dequantize() != 0).sum())  # kept weights that round to 0 need no code either
    assert packed.nnz == nnz <= int(keep.sum())
    expected = 256 * 1024 / 8 + (nnz + 1) // 2 + 256 * 8 * 2  # mask + codes + fp16 scales
    assert packed.weight_nbytes() == expected
    assert packed.bytes_per_parameter() / 2 <= 0.35  # the target against bf16 dense
    dense_int4 = QuantSparseLinear.from_quantized(quantize_rtn(w, 4, 128))
    assert dense_int4.mask is None and dense_int4.weight_nbytes() == 256 * 1024 // 2 + 256 * 8 * 2
