"""The dispatch benchmark's script runs end to end on tiny shapes, with new or fixed routing."""
import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_moe_dispatch.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_moe_dispatch", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fresh_inputs_never_repeat():
    stream = _bench().fresh_inputs(0, 8, 4, torch.bfloat16)
    a, b = next(stream), next(stream)
    assert a.shape == (1, 8, 4) and a.dtype == torch.bfloat16 and not torch.equal(a, b)


@pytest.mark.parametrize("fixed", [False, True], ids=["new_routing", "fixed_routing"])
def test_dispatch_benchmark_runs(fixed, capsys):
    argv = ["--tokens", "64", "--dim", "32", "--hidden", "16", "--rounds", "2", "--warmup", "1", "--threads", "1"]
    threads = torch.get_num_threads()
    try:
        summary = _bench().main(argv + (["--fixed-routing"] if fixed else []))
    finally:
        torch.set_num_threads(threads)  # the script sets the process's thread count
    assert summary["fixed_routing"] is fixed and summary["warmup"] == 1 and summary["rounds"] == 2
    for dtype in ("fp32", "bf16"):
        rows = summary["results"][dtype]
        assert {"moe_naive", "moe_sorted", "dense_swiglu", "dense_fused", "mixtral_hf"} <= set(rows)
        assert rows["dense_swiglu"]["time_vs_dense"] == 1.0
        assert all(r["ms"] > 0 for r in rows.values())
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith('{"benchmark": "moe_dispatch"')


def test_dispatch_benchmark_dtypes_option():
    argv = ["--tokens", "32", "--dim", "16", "--hidden", "8", "--rounds", "1", "--warmup", "0", "--threads", "1"]
    threads = torch.get_num_threads()
    try:
        summary = _bench().main(argv + ["--dtypes", "fp32"])
        assert set(summary["results"]) == {"fp32"}  # bf16 skipped when not asked for
        with pytest.raises(SystemExit):
            _bench().main(argv + ["--dtypes", "fp32,fp8"])  # refused before any timing
    finally:
        torch.set_num_threads(threads)
