"""`sparselm train`: bad input fails fast; end to end (slow) with log, plot, model and resume."""
import json

import pytest

from sparselm.cli import main


@pytest.mark.parametrize("argv, word", [
    (["--sparsity", "1.0"], "sparsity"), (["--update-interval", "0"], "update interval"),
    (["--drop-fraction", "0"], "drop fraction"), (["--steps", "0"], "steps"),
])
def test_bad_input_is_one_line_error(tmp_path, capsys, argv, word):
    assert main(["train", "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert word in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_train_cli_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--model", "tiny", "--sparsity", "0.8", "--method", "set", "--steps", "12", "--batch-size", "4",
            "--seq-len", "32", "--eval-every", "6", "--checkpoint-every", "6", "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert (out / "loss_curve.png").stat().st_size > 0 and (out / "model" / "config.json").exists()
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    # A second call resumes from the final checkpoint: no steps left, same result.
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["held_out_perplexity"] == pytest.approx(summary["held_out_perplexity"], rel=1e-6)
