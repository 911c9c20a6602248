"""Activation sparsity: thresholds hit their target, hooks and swaps equal the reference,
measurement counts what it should, ReLU-fication makes exact zeros."""
import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from sparselm.activation.install import install_thresholds
from sparselm.activation.measure import measure_activations
from sparselm.activation.projections import projection_modules
from sparselm.activation.relufy import relufy
from sparselm.activation.sparse_linear import ActivationSparseLinear, gather_gemv
from sparselm.activation.thresholds import (
    allocate_sparsity, calibrate_thresholds, collect_projection_inputs, magnitude_threshold,
)
from sparselm.errors import SparselmError


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 512, (6, 48), generator=torch.Generator().manual_seed(0))


def test_magnitude_threshold_is_inverse_cdf():
    x = torch.tensor([[-5.0, 1.0, -2.0, 4.0, 3.0]])
    assert magnitude_threshold(x, 0.4) == 2.0  # |x| sorted 1,2,3,4,5: 2 of 5 entries <= 2
    assert magnitude_threshold(x, 0.0) == -1.0


@pytest.fixture(scope="module")
def inputs(llama, ids):
    return collect_projection_inputs(llama, ids)


@pytest.mark.parametrize("allocation", ["uniform", "greedy"])
def test_thresholds_hit_target_on_calibration_data(llama, ids, inputs, allocation):
    for target in (0.25, 0.5):
        th = calibrate_thresholds(llama, ids, target, allocation, inputs=inputs)
        assert {"0.q", "0.k", "0.v", "0.gate", "0.up"} <= set(th)  # separate thresholds
        report = measure_activations(llama, ids, th, decode_tokens=0)
        assert report.overall("prefill") == pytest.approx(target, abs=0.01)
    if allocation == "greedy":
        levels = allocate_sparsity(inputs, projection_modules(llama), 0.5, "greedy")
        assert len(set(levels.values())) > 1  # non-uniform


def test_hooks_and_swap_equal_reference_and_undo(llama, ids, inputs):
    th = calibrate_thresholds(llama, ids, 0.4, inputs=inputs)
    dense = llama(input_ids=ids[:2]).logits
    # Reference: threshold each projection input by hand in a patched forward.
    mods = projection_modules(llama)
    originals = {n: m.forward for n, m in mods.items()}
    for n, m in mods.items():
        m.forward = (lambda f, t: (lambda x: f(x * (x.abs() > t))))(originals[n], th[n])
    reference = llama(input_ids=ids[:2]).logits
    for n, m in mods.items():
        del m.forward
    handle = install_thresholds(llama, th, mode="hooks")
    torch.testing.assert_close(llama(input_ids=ids[:2]).logits, reference)
    handle.remove()
    handle = install_thresholds(llama, th, mode="swap")
    assert isinstance(llama.model.layers[0].mlp.down_proj, ActivationSparseLinear)
    torch.testing.assert_close(llama(input_ids=ids[:2]).logits, reference, atol=1e-4, rtol=1e-4)
    handle.remove()
    torch.testing.assert_close(llama(input_ids=ids[:2]).logits, dense)
    assert not (reference - dense).abs().max() < 1e-6  # thresholds did change the output


def test_decode_only_leaves_prefill_dense(llama, ids, inputs):
    th = calibrate_thresholds(llama, ids, 0.5, inputs=inputs)
    dense = llama(input_ids=ids[:1]).logits
    dense_one = llama(input_ids=ids[:1, :1]).logits
    handle = install_thresholds(llama, th, decode_only=True)
    torch.testing.assert_close(llama(input_ids=ids[:1]).logits, dense)
    assert (llama(input_ids=ids[:1, :1]).logits - dense_one).abs().max() > 1e-4  # one token: sparsified
    handle.remove()


def test_activation_sparse_linear_equals_dense_on_thresholded_input():
    torch.manual_seed(1)
    lin = nn.Linear(32, 24)
    layer = ActivationSparseLinear.from_linear(lin, threshold=0.5)
    layer._gemv = gather_gemv  # the pure-PyTorch path (the kernel path is tested by its owner)
    x = torch.randn(1, 32)
    expected = lin(x * (x.abs() > 0.5))
    torch.testing.assert_close(layer(x), expected)
    xb = torch.randn(3, 5, 32)
    torch.testing.assert_close(layer(xb), lin(xb * (xb.abs() > 0.5)), atol=1e-5, rtol=1e-5)
    w_t = torch.randn(32, 8)
    xs = torch.randn(32) * (torch.rand(32) > 0.7)
    torch.testing.assert_close(gather_gemv(xs, w_t), xs @ w_t)


def test_measure_counts_exact_zeros_after_relufy(llama, ids):
    import copy
    model = copy.deepcopy(llama)
    before = measure_activations(model, ids, 0.0, decode_tokens=4)
    assert before.fraction("prefill", "0.down") < 0.01  # SiLU gives almost no exact zeros
    swapped, added = relufy(model, after_norms=True)
    assert swapped == 2 and added == 4
    after = measure_activations(model, ids, 0.0, decode_tokens=4)
    assert after.fraction("prefill", "0.down") > 0.3  # ReLU(gate) * up: about half zero
    assert after.fraction("decode", "1.q") > 0.3  # ReLU after the input norm
    assert model.config.hidden_act == "relu"
    assert "| 0.down |" in after.table()


def test_unsupported_layout_raises():
    class NoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = LlamaConfig()
            self.config.model_type = "mystery"
            self.lin = nn.Linear(4, 4)
    with pytest.raises(SparselmError):
        projection_modules(NoBlocks())


def test_gpt2_family_supported():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=128, n_positions=64)).eval()
    x = torch.randint(0, 128, (2, 16))
    th = calibrate_thresholds(model, x, 0.5)
    assert set(th) == {"0.qkv", "0.o", "0.up", "0.down"}
    assert measure_activations(model, x, th, decode_tokens=2).overall("prefill") == pytest.approx(0.5, abs=0.01)
