"""Packed checkpoints: bit-exact round trips, refusal of missing or mismatched tensors."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparselm.errors import SparselmError
from sparselm.pack import load_packed, pack, save_packed, size_report

from .helpers import pruned_llama


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_bit_exact(tmp_path, tie):
    model = pruned_llama(0.7, tie=tie)
    ids = torch.randint(0, 512, (1, 11))
    dense_logits = logits(model, ids)
    weights_before = {k: v.clone() for k, v in model.state_dict().items()}
    save_packed(model, None, tmp_path / "dense-in")
    assert all(torch.equal(weights_before[k], v) for k, v in model.state_dict().items())  # input untouched
    unpacked, _ = load_packed(tmp_path / "dense-in", unpack=True)
    assert torch.equal(logits(unpacked, ids), dense_logits)
    # A model already packed comes back with the same modules and bit-identical outputs.
    pack(model, "bitmask", progress=False)
    packed_logits = logits(model, ids)
    save_packed(model, None, tmp_path / "packed-in")
    again, _ = load_packed(tmp_path / "packed-in")
    assert type(again.model.layers[0].mlp.up_proj).__name__ == "SparseLinear"
    assert torch.equal(logits(again, ids), packed_logits)


def test_size_report_and_header(tmp_path):
    model = pruned_llama(0.7)
    save_packed(model, None, tmp_path / "out")
    size = size_report(tmp_path / "out")
    linear_params = 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 172)
    assert size["parameters"] == sum(p.numel() for p in model.parameters())
    assert size["file_bytes"] == (tmp_path / "out" / "model.safetensors").stat().st_size
    # 70% of the block weights gone: saves at least half their fp32 bytes.
    assert size["dense_bytes"] - size["file_bytes"] > 0.5 * 4 * linear_params
    header = json.loads((tmp_path / "out" / "sparselm_packed.json").read_text())
    spec = header["layers"]["model.layers.0.mlp.up_proj"]
    assert spec["format"] in ("csr", "bitmask") and spec["in_features"] == 64 and spec["out_features"] == 172
    assert spec["dtype"] == "float32"


def rewrite_weights(folder, change):
    path = folder / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)


def test_missing_and_mismatched_tensors_are_refused_by_name(tmp_path):
    model = pruned_llama(0.7)
    save_packed(model, None, tmp_path / "a")
    rewrite_weights(tmp_path / "a", lambda t: t.pop("model.layers.1.mlp.down_proj.values"))
    with pytest.raises(SparselmError, match="model.layers.1.mlp.down_proj.values.*missing"):
        load_packed(tmp_path / "a")
    save_packed(model, None, tmp_path / "b")
    rewrite_weights(tmp_path / "b", lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(SparselmError, match="model.norm.weight.*shape"):
        load_packed(tmp_path / "b")
    save_packed(model, None, tmp_path / "c")
    rewrite_weights(tmp_path / "c", lambda t: t.pop("model.embed_tokens.weight"))
    with pytest.raises(SparselmError, match="model.embed_tokens.weight.*missing"):
        load_packed(tmp_path / "c")


def test_existing_output_is_not_overwritten(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(SparselmError, match="already exists"):
        save_packed(pruned_llama(0.5), None, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_pruned_lm_head_is_packed_saved_and_decoded(tmp_path):
    """A head pruned with lm_head=True is packed like the block linears, round-trips through a
    packed checkpoint, and runs inside the lean decoder's C++ step."""
    from sparselm.bench.lean_decode import LeanDecoder
    from sparselm.prune import Magnitude, sparsify

    model = pruned_llama(0.7)
    sparsify(model, Magnitude(0.7, lm_head=True), progress=False)
    ids = torch.randint(0, 512, (1, 11))
    dense_logits = logits(model, ids)
    pack(model, "bitmask", progress=False)
    assert type(model.lm_head).__name__ == "SparseLinear"
    torch.testing.assert_close(logits(model, ids), dense_logits, rtol=1e-5, atol=1e-5)
    save_packed(model, None, tmp_path / "out")
    again, _ = load_packed(tmp_path / "out")
    assert type(again.lm_head).__name__ == "SparseLinear"
    assert torch.equal(logits(again, ids), logits(model, ids))
    dec = LeanDecoder(again, max_len=16)
    assert dec.fast_path_reason is None and dec._stack_full  # the packed head runs in the C++ step
    dec.step(ids[:, :10])
    torch.testing.assert_close(dec.step(ids[:, 10:]), logits(model, ids)[:, -1], rtol=1e-4, atol=1e-4)


def test_dense_or_tied_lm_head_is_not_packed():
    model = pruned_llama(0.7, tie=True)
    model.model.embed_tokens.weight.data[:, ::2] = 0  # zeros, but the head is the embedding
    pack(model, "bitmask", progress=False)
    assert isinstance(model.lm_head, torch.nn.Linear)  # tied: not packed
    model = pruned_llama(0.7)
    pack(model, "bitmask", progress=False)
    assert isinstance(model.lm_head, torch.nn.Linear)  # untied but dense: not a packing candidate


def test_lm_head_with_a_few_stray_zeros_is_not_a_candidate():
    """A dense head holding some exact zeros (below 10%) is not packed, so an N:M pack of the
    blocks does not fail on it; from 10% zeros it counts as pruned."""
    from sparselm.pack.auto import packable_layers

    model = pruned_llama(pattern="2:4")
    model.lm_head.weight.data[:, :3] = 0  # 3 of 64 columns: ~5% zeros
    assert "lm_head" not in packable_layers(model)
    pack(model, "nm", progress=False)
    assert isinstance(model.lm_head, torch.nn.Linear)
    model = pruned_llama(pattern="2:4")
    model.lm_head.weight.data[:, :7] = 0  # ~11% zeros
    assert "lm_head" in packable_layers(model)
