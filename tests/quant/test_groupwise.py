"""Round-to-nearest group-wise quantizers: SQNR floors, hand-computed values, ragged groups."""
import pytest
import torch

from sparselm.errors import SparselmError
from sparselm.quant.groupwise import GroupColumnQuantizer, codes_from_dequantized, quantize_rtn, sqnr_db


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits,floor", [(8, 35.0), (4, 15.0)])
def test_sqnr_floor_on_gaussian_weights(bits, floor, symmetric):
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    qw = quantize_rtn(w, bits, 128, symmetric)
    assert sqnr_db(w, qw.dequantize()) >= floor


def test_hand_computed_symmetric_int4():
    w = torch.tensor([[1.75, -0.6, 0.3, 0.0]])
    qw = quantize_rtn(w, bits=4, group_size=4, symmetric=True)
    # scale = max|w| / 7 = 0.25 (exact in fp16); codes = round(w / 0.25)
    assert qw.scales.item() == 0.25
    assert qw.codes.tolist() == [[7, -2, 1, 0]]
    torch.testing.assert_close(qw.dequantize(), torch.tensor([[1.75, -0.5, 0.25, 0.0]]), rtol=0, atol=0)


def test_hand_computed_asymmetric_int4():
    w = torch.tensor([[-1.0, 0.5, 2.0, 0.0]])
    qw = quantize_rtn(w, bits=4, group_size=4, symmetric=False)
    s = torch.tensor(3.0 / 15).half().float()
    z = torch.round(1.0 / s)
    assert qw.zeros.item() == z.item() == 5
    expected = (torch.clamp(torch.round(w / s) + z, 0, 15) - z) * s
    torch.testing.assert_close(qw.dequantize(), expected, rtol=0, atol=0)
    assert qw.dequantize()[0, 3] == 0  # zero is on the grid


def test_groups_that_do_not_divide_the_width():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(8, 300, generator=gen)
    w[:, 256:] *= 100  # the ragged last group must get its own scale
    qw = quantize_rtn(w, 4, 128)
    assert qw.scales.shape == (8, 3)
    ref = torch.cat([quantize_rtn(w[:, a:b], 4, 128).dequantize() for a, b in ((0, 128), (128, 256), (256, 300))], 1)
    torch.testing.assert_close(qw.dequantize(), ref, rtol=0, atol=0)
    assert sqnr_db(w[:, :256], qw.dequantize()[:, :256]) >= 15


def test_zeros_and_mask_stay_exact():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(16, 64, generator=gen)
    keep = torch.rand(16, 64, generator=gen) > 0.5
    for sym in (True, False):
        deq = quantize_rtn(w, 4, 32, sym, keep=keep).dequantize()
        assert torch.equal(deq[~keep], torch.zeros_like(deq[~keep]))
        deq_dense_zeros = quantize_rtn(w * keep, 4, 32, sym).dequantize()
        assert torch.equal(deq_dense_zeros[~keep], torch.zeros_like(deq[~keep]))  # 0 is on every grid


def test_all_zero_group_and_codes_round_trip():
    w = torch.randn(4, 256)
    w[:, :128] = 0
    qw = quantize_rtn(w, 8, 128, symmetric=False)
    assert torch.equal(qw.dequantize()[:, :128], torch.zeros(4, 128))
    back = codes_from_dequantized(qw.dequantize(), qw.scales, qw.zeros, 8, 128, False)
    assert torch.equal(back.codes, qw.codes)


def test_column_quantizer_matches_rtn_without_updates():
    w = torch.randn(8, 200)
    cq = GroupColumnQuantizer(8, 200, 4, 64, symmetric=False)
    cols = [cq(w[:, j], j, w[:, j:]) for j in range(200)]  # no error compensation: plain RTN
    # params are taken at the first column of each group from the weights it is shown
    torch.testing.assert_close(torch.stack(cols, 1), quantize_rtn(w, 4, 64, False).dequantize(), rtol=0, atol=0)


def test_bad_arguments():
    with pytest.raises(SparselmError, match="bits"):
        quantize_rtn(torch.randn(4, 4), bits=3)
    with pytest.raises(SparselmError, match="group_size"):
        quantize_rtn(torch.randn(4, 4), group_size=0)
    with pytest.raises(SparselmError, match="2-D"):
        quantize_rtn(torch.randn(4))
