"""`quantize` on a whole (random-init) model, packing, bytes per parameter, save / load."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from sparselm.adapters import linear_weight
from sparselm.errors import SparselmError
from sparselm.quant import (GPTQ, RTN, QuantSparseLinear, SparseGPTQ, bytes_per_parameter, load_quantized,
                            pack_quantized, quantize, save_quantized)
from sparselm.quant.quantize import quantizable_layers


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def calib(n=8, seq=32):
    return torch.randint(0, 512, (n, seq), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def joint_model():
    model = tiny_model()
    report = quantize(model, SparseGPTQ(sparsity=0.5, bits=4, group_size=32), calib(), progress=False)
    return model, report


def test_joint_model_keeps_exact_masks_and_grid(joint_model):
    model, report = joint_model
    layers = quantizable_layers(model)
    assert report.layers == len(layers) == 14
    for name, mod in layers.items():
        qw = mod.sparselm_quant
        w = linear_weight(mod)
        assert torch.equal(qw.dequantize(), w), name  # the model holds exactly the dequantized weight
        assert not w[~qw.keep].any(), name  # pruned weights are exactly zero
        # SparseGPT removes floor(0.5 * rows * block) per block of 128 columns
        rows, cols = w.shape
        removed = sum(int(0.5 * rows * (min(b + 128, cols) - b)) for b in range(0, cols, 128))
        assert int((~qw.keep).sum()) == removed, name
    assert report.sparsity >= 0.5


def test_packed_model_matches_and_round_trips(joint_model, tmp_path):
    model, _ = joint_model
    ids = calib(2, 16)
    with torch.no_grad():
        ref = model(ids).logits
    size_before = bytes_per_parameter(model)
    save_quantized(model, None, tmp_path / "q")  # packs in place
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantSparseLinear)
    assert bytes_per_parameter(model) == size_before
    assert size_before["vs_bf16"] <= 0.35
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    loaded, tok = load_quantized(tmp_path / "q")
    assert tok is None
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)
    header = json.loads((tmp_path / "q" / "sparselm_quant.json").read_text())
    assert len(header["layers"]) == 14 and header["size"]["vs_bf16"] <= 0.35
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folder left


def test_checkpoint_with_missing_or_mismatched_tensor_is_refused(joint_model, tmp_path):
    model, _ = joint_model
    save_quantized(model, None, tmp_path / "q")
    weights = tmp_path / "q" / "model.safetensors"
    tensors = load_file(weights)
    name = "model.layers.1.self_attn.q_proj.codes"
    bad = dict(tensors)
    bad.pop(name)
    save_file(bad, weights)
    with pytest.raises(SparselmError, match=name.replace(".", r"\.")):
        load_quantized(tmp_path / "q")
    bad = dict(tensors)
    bad[name] = bad[name][:-1].clone()
    save_file(bad, weights)
    with pytest.raises(SparselmError, match="q_proj.codes.*shape"):
        load_quantized(tmp_path / "q")


def test_rtn_and_gptq_on_a_model():
    ids = calib(2, 16)
    for config in (RTN(bits=8, group_size=32, symmetric=False), GPTQ(bits=4, group_size=64)):
        model = tiny_model()
        with torch.no_grad():
            dense = model(ids).logits
        shapes = [tuple(linear_weight(m).shape) for m in quantizable_layers(model).values()]
        report = quantize(model, config, calib(), progress=False)
        assert report.mean_sqnr_db > (30 if config.bits == 8 else 10)
        for mod in quantizable_layers(model).values():
            assert torch.equal(mod.sparselm_quant.dequantize(), linear_weight(mod))
        with torch.no_grad():
            quant = model(ids).logits
        pack_quantized(model)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, quant)
        assert not torch.equal(quant, dense)
        size = bytes_per_parameter(model)
        expected, params = 0, 0
        for r, c in shapes:  # dense codes (no mask pays off) + fp16 scale (+ uint8 zero) per group
            groups = -(-c // config.group_size)
            expected += (r * c * config.bits + 7) // 8 + r * groups * (2 if config.symmetric else 3)
            params += r * c
        assert size["bytes"] == expected and size["parameters"] == params


def test_bad_input():
    model = tiny_model()
    with pytest.raises(SparselmError, match="calibration"):
        quantize(model, GPTQ(), None)
    with pytest.raises(SparselmError, match="config"):
        quantize(model, {"bits": 4})
    with pytest.raises(SparselmError, match="bits"):
        RTN(bits=2)
    with pytest.raises(SparselmError, match="sparsity"):
        SparseGPTQ(sparsity=1.5)
    with pytest.raises(SparselmError, match="no quantized layers"):
        pack_quantized(model)
    with pytest.raises(SparselmError, match="not a quantized"):
        load_quantized("nowhere")
