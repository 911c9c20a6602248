"""The generation benchmark's accounting: bytes, FLOPs, densify, energy availability."""
import pytest
import torch

from sparselm.bench.energy import EnergyMeter
from sparselm.bench.generation import densify, linear_stats, measure_generation, resident_weight_bytes
from sparselm.errors import SparselmError
from sparselm.pack import SparseLinear, pack

from .helpers import pruned_llama


def test_bytes_and_macs_follow_the_packed_layers():
    model = pruned_llama(0.7, tie=True)
    dense_bytes = resident_weight_bytes(model)
    # Tied embedding and LM head are counted once.
    expected = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    assert dense_bytes == expected
    _, dense_macs = linear_stats(model)
    block_weights = {n: m.weight for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and n.startswith("model.layers")}
    nnz = sum(int((w != 0).sum()) for w in block_weights.values())
    pack(model, "csr", progress=False)
    _, packed_macs = linear_stats(model)
    assert dense_macs - packed_macs == sum(w.numel() for w in block_weights.values()) - nnz
    assert resident_weight_bytes(model) < dense_bytes


def test_densify_restores_identical_weights():
    model = pruned_llama(0.6)
    weight = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    pack(model, "bitmask", progress=False)
    assert isinstance(model.model.layers[0].mlp.up_proj, SparseLinear)
    densify(model)
    assert isinstance(model.model.layers[0].mlp.up_proj, torch.nn.Linear)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, weight)


def test_measure_generation_reports_consistent_numbers():
    model = pruned_llama(0.5)
    result = measure_generation(model, prompt_len=6, new_tokens=3, repeats=1)
    assert result.decode_tokens_per_s > 0 and result.prefill_tokens_per_s > 0
    assert result.decode_ms_per_token == pytest.approx(1e3 / result.decode_tokens_per_s)
    assert result.decode_bandwidth_gb_s == pytest.approx(result.weight_bytes * result.decode_tokens_per_s / 1e9)
    with pytest.raises(SparselmError, match="exceed the model's context"):
        measure_generation(model, prompt_len=model.config.max_position_embeddings, new_tokens=1)


def test_energy_meter_says_why_not():
    meter = EnergyMeter("cpu")
    if meter.available:
        meter.start()
        assert meter.stop() >= 0
    else:
        assert meter.stop() is None and "powercap" in meter.reason or "RAPL" in meter.reason


def test_alternating_rounds_flip_the_order_and_pair_the_samples():
    from sparselm.bench.timing import alternating_rounds, median_ratio

    calls = []
    values = {"a": iter([2.0, 4.0, 9.0]), "b": iter([1.0, 2.0, 3.0])}
    samples = alternating_rounds({k: (lambda k=k: calls.append(k) or next(values[k])) for k in "ab"}, 3)
    assert calls == ["a", "b", "b", "a", "a", "b"]  # reversed every other round
    assert samples == {"a": [2.0, 4.0, 9.0], "b": [1.0, 2.0, 3.0]}
    assert median_ratio(samples, "a", "b") == 2.0  # per-round ratios 2, 2, 3
    # pairs round with round: the ratio of the two medians here would be 10
    assert median_ratio({"a": [1.0, 10.0, 10.0], "b": [1.0, 1.0, 10.0]}, "a", "b") == 1.0


def test_median_interval_uses_the_binomial_order_statistics():
    from sparselm.bench.timing import median_interval, ratio_interval

    # n = 15: the 4th smallest and 4th largest (coverage 1 - 2 P(Bin(15, .5) <= 3) = 0.9648)
    low, high, cover = median_interval([float(v) for v in range(15, 0, -1)])
    assert (low, high) == (4.0, 12.0) and abs(cover - 0.96484375) < 1e-9
    low, high, cover = median_interval([float(v) for v in range(1, 21)])  # n = 20: ranks 6 and 15
    assert (low, high) == (6.0, 15.0) and 0.958 < cover < 0.959
    low, high, cover = median_interval([3.0, 1.0, 2.0])  # too few: the full range, coverage 0.75
    assert (low, high, cover) == (1.0, 3.0, 0.75)
    samples = {"a": [2.0 * v for v in range(1, 16)], "b": [1.0] * 15}
    assert ratio_interval(samples, "a", "b")[:2] == (8.0, 24.0)


def test_cache_sizes_come_from_sysfs_or_the_default(monkeypatch):
    from sparselm.bench import timing

    monkeypatch.setattr(timing, "_cpu_caches", lambda: [(1, "Data", 48 << 10), (1, "Instruction", 32 << 10),
                                                        (2, "Unified", 2 << 20), (3, "Unified", 300 << 20)])
    assert timing.cache_bytes(1, 0) == 48 << 10 and timing.cache_bytes(2, 0) == 2 << 20
    assert timing.l3_cache_bytes() == 300 << 20
    monkeypatch.setattr(timing, "_cpu_caches", lambda: [])
    assert timing.cache_bytes(2, 123) == 123 and timing.l3_cache_bytes(default=7) == 7
