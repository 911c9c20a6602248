"""`sparselm pack` writes a packed checkpoint without touching its input; `sparselm bench --json`."""
import hashlib
import json

import pytest
import torch

from sparselm.cli import main


def folder_digest(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def test_pack_then_bench(tmp_path, tiny, capsys):
    from sparselm.io import load, save

    model, tok = tiny
    for layer in model.model.layers:
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight.data
                w[w.abs() < w.abs().median()] = 0  # 50% magnitude pruning
    save(model, tok, tmp_path / "pruned")
    before = folder_digest(tmp_path / "pruned")
    code = main(["pack", str(tmp_path / "pruned"), "--format", "bitmask", "--out", str(tmp_path / "packed")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "bytes/parameter" in printed and "| model.layers.0.mlp.up_proj |" in printed
    assert folder_digest(tmp_path / "pruned") == before
    packed, _ = load(tmp_path / "packed")
    assert type(packed.model.layers[1].self_attn.o_proj).__name__ == "SparseLinear"
    ids = torch.randint(0, 100, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)

    code = main(["bench", str(tmp_path / "packed"), "--variants", "dense,bitmask", "--prompt-len", "8",
                 "--new-tokens", "4", "--repeats", "1", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    variants = {r["variant"]: r for r in result["results"]}
    assert set(variants) == {"dense", "bitmask"}
    assert variants["bitmask"]["weight_bytes"] < variants["dense"]["weight_bytes"]
    assert variants["dense"]["decode_tokens_per_s"] > 0 and variants["bitmask"]["flops_per_token"] > 0
    assert "energy" in result


def test_pack_refuses_existing_output(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert main(["pack", "tiny", "--out", str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_bench_two_four_variant_needs_a_gpu():
    from sparselm.bench.generation import compare_generation, default_variants

    from .helpers import pruned_llama

    assert "2:4" not in default_variants("cpu") and default_variants("cuda") == ("dense", "2:4")
    summary = compare_generation(pruned_llama(pattern="2:4"), ["dense", "nm", "2:4"], prompt_len=4, new_tokens=2,
                                 repeats=1, progress=False, device="cpu")
    assert [r["variant"] for r in summary["results"]] == ["dense", "nm"]
    assert "need a CUDA GPU" in summary["skipped"]["2:4"] and "variant nm" in summary["skipped"]["2:4"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_bench_refuses_cuda_without_a_gpu(capsys):
    assert main(["bench", "tiny", "--device", "cuda", "--json"]) == 2
    assert "no CUDA GPU is available" in capsys.readouterr().err


def test_device_names_are_checked(monkeypatch):
    """--device: a malformed name, CUDA without a GPU, and a GPU index past the machine's GPUs are
    clear errors naming the fix (the last one was PyTorch's own error deep inside the run)."""
    from sparselm.cli.common import resolve_device
    from sparselm.errors import SparselmError

    assert resolve_device("cpu") == "cpu"
    with pytest.raises(SparselmError, match="not a device name"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SparselmError, match="no CUDA GPU"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == "cuda:0" and resolve_device("cuda") == "cuda"
    with pytest.raises(SparselmError, match=r"names GPU 7, but this machine has 1 \(cuda:0 to cuda:0\)"):
        resolve_device("cuda:7")
