"""GPTQ and the joint sparse + quantized pass, on a single layer with correlated inputs."""
import pytest
import torch

from sparselm.prune.masks import Pattern, is_valid_nm
from sparselm.prune.sparsegpt import sparsegpt_prune
from sparselm.quant.gptq import gptq_quantize, layer_output_error, sparse_gptq
from sparselm.quant.groupwise import GroupColumnQuantizer, quantize_rtn


def correlated_inputs(tokens=2048, cols=192, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) / cols ** 0.5
    x = torch.randn(tokens, 24, generator=gen) @ torch.randn(24, cols, generator=gen)  # low-rank part
    return x + 0.3 * torch.randn(tokens, cols, generator=gen) @ mix  # [T, C]


def hessian_of(x):
    return 2 * x.t() @ x / x.shape[0]  # [C, C]


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_beats_rtn_on_correlated_inputs(bits):
    x = correlated_inputs()
    w = torch.randn(96, 192, generator=torch.Generator().manual_seed(3))
    gq = gptq_quantize(w, hessian_of(x), bits=bits, group_size=64)
    rtn = quantize_rtn(w, bits=bits, group_size=64)
    e_gptq, e_rtn = layer_output_error(w, gq.dequantize(), x), layer_output_error(w, rtn.dequantize(), x)
    assert e_gptq < 0.8 * e_rtn
    assert gq.codes.min() >= -(1 << (bits - 1)) and gq.codes.max() < (1 << (bits - 1))


def test_gptq_equals_the_sparsegpt_loop_at_zero_sparsity():
    """Two implementations of Alg. 1 (ours and SparseGPT's with its quantizer hook) agree."""
    x = correlated_inputs(cols=160)
    w = torch.randn(32, 160, generator=torch.Generator().manual_seed(4))
    H = hessian_of(x)
    gq = gptq_quantize(w, H, bits=4, group_size=32, blocksize=64)
    cq = GroupColumnQuantizer(32, 160, 4, 32)
    ref, keep = sparsegpt_prune(w, H, 0.0, blocksize=64, quantizer=cq)
    assert keep.all()
    torch.testing.assert_close(gq.dequantize(), ref, rtol=1e-5, atol=1e-6)


def test_gptq_result_lies_on_its_group_grid():
    x = correlated_inputs(cols=100)
    w = torch.randn(16, 100)
    gq = gptq_quantize(w, hessian_of(x), bits=4, group_size=40, symmetric=False)
    assert gq.scales.shape == (16, 3)
    deq = gq.dequantize()
    for j, (a, b) in enumerate(((0, 40), (40, 80), (80, 100))):
        s, z = gq.scales[:, j].float(), gq.zeros[:, j].float()
        q = deq[:, a:b] / s[:, None] + z[:, None]
        torch.testing.assert_close(q, q.round(), rtol=0, atol=1e-4)
        assert q.round().min() >= 0 and q.round().max() <= 15


@pytest.mark.parametrize("pattern,sparsity", [(Pattern(), 0.5), (Pattern(2, 4), 0.5)])
def test_joint_pass_keeps_the_exact_mask(pattern, sparsity):
    x = correlated_inputs()
    w = torch.randn(64, 192, generator=torch.Generator().manual_seed(5))
    H = hessian_of(x)
    sq = sparse_gptq(w, H, sparsity, pattern, bits=4, group_size=64, symmetric=False, blocksize=64)
    deq = sq.dequantize()
    assert torch.equal(deq[~sq.keep], torch.zeros_like(deq[~sq.keep]))
    if pattern.is_nm:
        assert is_valid_nm(deq, 2, 4)
    else:
        assert (~sq.keep).sum().item() == int(0.5 * 64 * 64) * 3  # floor(s * R * block) per block
        # the first block's mask is chosen before any rounding: the same as SparseGPT alone
        _, keep_only = sparsegpt_prune(w, H, sparsity, pattern, blocksize=64)
        assert torch.equal(keep_only[:, :64], sq.keep[:, :64])
    # joint compensation beats pruning then rounding
    pruned, keep = sparsegpt_prune(w, H, sparsity, pattern, blocksize=64)
    after = quantize_rtn(pruned, 4, 64, False, keep=keep).dequantize()
    assert layer_output_error(w, deq, x) < layer_output_error(w, after, x)
