"""The CLI end to end on the tiny model: prune -> eval, compare resumes, errors are one line."""
import json
import subprocess
import sys

import pytest

from sparselm.cli import main


def test_prune_then_eval(tmp_path, capsys, tiny_pair):
    out = tmp_path / "pruned"
    assert main(["prune", "tiny", "--method", "wanda", "--pattern", "2:4", "--samples", "8", "--seq-len", "64",
                 "--out", str(out)]) == 0
    record = json.loads((out / "sparselm.json").read_text())
    assert record["pruning"]["pattern"] == "2:4"
    assert record["pruning"]["calibration"]["samples"] == 8
    assert all(abs(s - 0.5) < 1e-9 for s in record["pruning"]["layer_sparsity"].values())
    capsys.readouterr()
    assert main(["eval", str(out), "--json", "--max-windows", "4"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["sparsity"] == pytest.approx(0.5)
    assert report["params"]["nonzero"] < report["params"]["total"]
    # the output exists now: a second run must refuse, not overwrite
    assert main(["prune", "tiny", "--method", "magnitude", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_compare_is_resumable(tmp_path, capsys, tiny_pair):
    args = ["compare", "tiny", "--methods", "magnitude,wanda", "--sparsity", "0.5", "--pattern", "unstructured",
            "--samples", "8", "--seq-len", "64", "--windows", "4", "--out", str(tmp_path / "cmp")]
    assert main(args) == 0
    log = (tmp_path / "cmp" / "results.jsonl").read_text().splitlines()
    assert len(log) == 3  # dense + 2 cells
    assert (tmp_path / "cmp" / "perplexity_vs_sparsity.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(args[:3] + ["magnitude,wanda,sparsegpt"] + args[4:]) == 0
    assert "done before, skipped" in capsys.readouterr().out
    log = (tmp_path / "cmp" / "results.jsonl").read_text().splitlines()
    assert len(log) == 4  # only the new cell was computed


def test_demo_on_the_tiny_model(tmp_path, capsys, tiny_pair):
    """`sparselm demo` (the README's main job) end to end, on the tiny model: every method and
    pattern lands at exactly 50%, the report files are written, and the kernels are built
    before the timed cells (no cell's pruning time includes the one-time build)."""
    out = tmp_path / "demo"
    assert main(["demo", "--model", "tiny", "--samples", "8", "--windows", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.index("C++ kernels") < printed.index("[1/8]")
    rows = json.loads((out / "results.json").read_text())["results"]
    assert [r["method"] for r in rows] == ["dense"] + ["magnitude", "wanda", "sparsegpt"] * 2 + \
        ["sparsegpt+refine"] * 2
    assert [r["pattern"] for r in rows[1:]] == ["unstructured"] * 3 + ["2:4"] * 3 + ["unstructured", "2:4"]
    assert all(r["sparsity"] == pytest.approx(0.5) for r in rows[1:])
    assert all(r["perplexity"] > 1 for r in rows)
    assert (out / "results.md").read_text().count("\n| ") >= 9
    assert (out / "perplexity_vs_sparsity.png").stat().st_size > 1000


@pytest.mark.parametrize("argv,needle", [
    (["prune", "tiny", "--sparsity", "1.2", "--out", "x"], "[0, 1)"),
    (["prune", "tiny", "--pattern", "4:4", "--out", "x"], "0 < N < M"),
    (["prune", "/no/such/model", "--out", "x"], "does not exist"),
    (["eval", "tiny", "--data", "/no/such/text"], "does not exist"),
])
def test_bad_input_is_one_clear_line(argv, needle, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sparselm", *argv], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.strip().splitlines() if "error" in l]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_calibration_text_too_short(tmp_path, capsys, tiny_pair):
    short = tmp_path / "short.txt"
    short.write_text("def f():\n    return 1\n" * 20)
    assert main(["prune", "tiny", "--calib", str(short), "--out", str(tmp_path / "o")]) == 2
    assert "calibration text too short" in capsys.readouterr().err
