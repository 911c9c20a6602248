"""`sparselm quantize` end to end on the built-in tiny model."""
import json

import pytest
import torch

from sparselm.cli import main
from sparselm.quant import QuantSparseLinear, load_quantized


@pytest.mark.slow  # calibrates and evaluates the built-in model (about a minute on 2 cores)
def test_quantize_command_writes_a_loadable_packed_model(tmp_path, capsys):
    out = tmp_path / "q"
    rc = main(["quantize", "tiny", "--method", "sparsegptq", "--sparsity", "0.5", "--group-size", "32",
               "--samples", "4", "--seq-len", "32", "--eval-windows", "2", "--out", str(out)])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["report"]["sparsity"] >= 0.5
    assert result["size"]["vs_bf16"] < 0.35
    model, tok = load_quantized(out)
    assert tok is not None
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantSparseLinear)
    header = json.loads((out / "sparselm_quant.json").read_text())
    assert header["metadata"]["quantization"]["method"] == "sparsegptq"
    ids = torch.tensor([tok.encode("def f(x):\n    return x\n")])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_quantize_command_reports_bad_input(tmp_path, capsys):
    rc = main(["quantize", "tiny", "--method", "rtn", "--group-size", "0", "--out", str(tmp_path / "q")])
    assert rc == 2
    assert "group_size" in capsys.readouterr().err
