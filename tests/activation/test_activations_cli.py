"""`sparselm activations` end to end on the built-in tiny model (slow)."""
import json

import pytest

from sparselm.cli import main


@pytest.mark.slow
def test_activations_cli_reports_targets(tmp_path, capsys):
    out = tmp_path / "act"
    assert main(["activations", "tiny", "--targets", "0.25,0.5", "--samples", "4", "--eval-windows", "4",
                 "--allocation", "uniform", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    summary = json.loads(text.strip().splitlines()[-1])
    rows = summary["teal"]["rows"]
    assert [r["target"] for r in rows] == [0.0, 0.25, 0.5]
    assert rows[1]["measured"] == pytest.approx(0.25, abs=0.01) and rows[2]["measured"] == pytest.approx(0.5, abs=0.01)
    assert rows[2]["perplexity"] > rows[0]["perplexity"]
    assert (out / "activations.png").stat().st_size > 0
    assert "| 0.down |" in text


def test_bad_targets_error(capsys):
    assert main(["activations", "tiny", "--targets", "a,b"]) == 2
    assert "--targets" in capsys.readouterr().err
