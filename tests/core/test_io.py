"""Save / load: bit-exact round trip, atomic outputs, never over the input, clear errors."""
import json

import pytest
import torch

from sparselm.errors import SparselmError
from sparselm.io import check_output_dir, load, save
from sparselm.prune import Wanda, sparsify
from tests.conftest import random_llama


def test_round_trip_is_bit_exact_and_plain_transformers_loads_it(tmp_path, tiny):
    model, tok = tiny
    sparsify(model, Wanda(0.5), torch.randint(0, 1000, (4, 64)), progress=False)
    out = save(model, tok, tmp_path / "pruned", metadata={"pruning": {"method": "wanda"}})
    record = json.loads((out / "sparselm.json").read_text())
    assert record["pruning"]["method"] == "wanda" and "sparselm_version" in record
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(out)
    again, tok2 = load(out)
    ids = torch.randint(0, 1000, (2, 40))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        assert torch.equal(plain(input_ids=ids).logits, ref)
        assert torch.equal(again(input_ids=ids).logits, ref)
    for (n, p), (_, q) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(p, q), n
    assert tok2("def f(x):")["input_ids"] == tok("def f(x):")["input_ids"]


def test_existing_output_is_refused_and_input_protected(tmp_path):
    model = random_llama()
    (tmp_path / "taken").mkdir()
    with pytest.raises(SparselmError, match="already exists"):
        save(model, None, tmp_path / "taken")
    src = save(model, None, tmp_path / "src")
    with pytest.raises(SparselmError, match="is the input model"):
        save(model, None, src, overwrite=True, protect=(src,))


def test_crash_leaves_nothing_half_written(tmp_path, monkeypatch):
    model = random_llama()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(model, "save_pretrained", boom)
    with pytest.raises(RuntimeError):
        save(model, None, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_bad_paths_and_corrupt_weights(tmp_path):
    with pytest.raises(SparselmError, match="does not exist"):
        load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SparselmError, match="no config.json"):
        load(tmp_path / "empty")
    out = save(random_llama(), None, tmp_path / "m")
    f = out / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(SparselmError, match="corrupt or truncated"):
        load(out)


def test_unsupported_architecture(tmp_path):
    d = tmp_path / "weird"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "not-a-real-family"}))
    with pytest.raises(SparselmError, match="unsupported architecture"):
        load(d)


def test_output_check_creates_nothing(tmp_path):
    """Commands check --out before their work; a crash afterwards must not leave an empty folder
    that blocks the rerun."""
    out = check_output_dir(tmp_path / "a" / "b")
    assert out == (tmp_path / "a" / "b").resolve() and not (tmp_path / "a").exists()
