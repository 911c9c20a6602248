"""pack(): per-layer choice by measured time, the LM head left alone, outputs unchanged."""
import pytest
import torch

from sparselm.errors import SparselmError
from sparselm.pack import SparseLinear, auto, pack

from .helpers import pruned_llama


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSELM_CACHE", str(tmp_path))
    monkeypatch.setattr(auto, "_memory_cache", {})


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("fmt", ["csr", "bitmask", "auto"])
def test_forced_and_auto_formats_keep_outputs(fmt):
    model = pruned_llama(0.7)
    ids = torch.randint(0, 512, (2, 9))
    before = logits(model, ids)
    report = pack(model, fmt, batch_size=1, progress=False)
    assert len(report.layers) == 14  # 7 linears x 2 blocks; no lm_head, no embeddings
    assert all(not layer.name.startswith("lm_head") for layer in report.layers)
    assert isinstance(model.lm_head, torch.nn.Linear)
    if fmt != "auto":
        assert all(layer.chosen == fmt for layer in report.layers)
        assert isinstance(model.model.layers[1].mlp.down_proj, SparseLinear)
        assert report.packed_bytes < report.dense_bytes
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-4, atol=1e-4)
    assert "| model.layers.0.self_attn.q_proj |" in report.table()


def test_auto_picks_the_fastest_measured_and_caches_it(monkeypatch):
    speeds = {"dense": 1.0, "csr": 2.0, "bitmask": 0.5, "nm": 3.0}

    def fake_time(modules, x):
        return {name: speeds[name] for name in modules}

    monkeypatch.setattr(auto, "_time_candidates", fake_time)
    model = pruned_llama(0.7)
    report = pack(model, "auto", progress=False)
    assert {layer.chosen for layer in report.layers} == {"bitmask"}
    timed = [layer for layer in report.layers if layer.ms]
    assert 0 < len(timed) < len(report.layers)  # repeated shapes reuse the cached choice
    # Dense faster than every format, or a format only within the noise margin: stay dense.
    speeds.update(bitmask=0.97)
    monkeypatch.setattr(auto, "_memory_cache", {})
    monkeypatch.setattr(auto, "_load_disk_cache", lambda: {})
    report = pack(pruned_llama(0.7), "auto", use_cache=False, progress=False)
    assert {layer.chosen for layer in report.layers} == {"dense"}


def test_auto_considers_nm_only_for_nm_layers(monkeypatch):
    seen = set()

    def fake_time(modules, x):
        seen.update(modules)
        return {name: 0.1 if name == "nm" else 1.0 for name in modules}

    monkeypatch.setattr(auto, "_time_candidates", fake_time)
    report = pack(pruned_llama(pattern="2:4"), "auto", use_cache=False, progress=False)
    assert "nm" in seen and {layer.chosen for layer in report.layers} == {"nm"}
    seen.clear()
    pack(pruned_llama(0.9), "auto", use_cache=False, progress=False)
    assert "nm" not in seen


def test_dense_layers_stay_dense_and_bad_input():
    model = pruned_llama(0.0)
    report = pack(model, "auto", progress=False)
    assert all(layer.chosen == "dense" for layer in report.layers)
    with pytest.raises(SparselmError, match=r"model\.layers\.0\.self_attn\.q_proj.*not 2:4"):
        pack(pruned_llama(0.5), "nm", progress=False)
    with pytest.raises(SparselmError, match="unknown pack format"):
        pack(model, "zip", progress=False)
    with pytest.raises(SparselmError, match="batch_size"):
        pack(model, "auto", batch_size=0, progress=False)
