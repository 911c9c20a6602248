"""A resumable sweep: prune a model with several (method, pattern, sparsity) cells, evaluate each.

Finished cells are appended to `results.jsonl` in the output folder as soon as they finish;
a rerun with the same folder skips them, so an interrupted sweep loses at most one cell.
Every cell starts from a fresh copy of the input model and uses the same calibration samples
and the same evaluation windows.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sparselm.report import markdown_table, plot_perplexity_vs_sparsity, write_json

COLUMNS = [("method", "method", ""), ("pattern", "pattern", ""), ("target", "target sparsity", ".0%"),
           ("sparsity", "measured sparsity", ".2%"), ("perplexity", "perplexity", ".3f"),
           ("ppl_ratio", "ppl / dense", ".3f"), ("seconds", "pruning s", ".1f")]


@dataclass(frozen=True)
class Cell:
    method: str
    pattern: str = "unstructured"
    sparsity: float = 0.5
    owl: bool = False
    refine: int = 0

    @property
    def key(self) -> str:
        s = "nm" if self.pattern != "unstructured" else f"{self.sparsity:g}"
        return f"{self.method}|{self.pattern}|{s}|owl={int(self.owl)}|refine={self.refine}"

    def config(self):
        from sparselm.prune import make_config

        kw = dict(sparsity=self.sparsity if self.pattern == "unstructured" else 0.5, pattern=self.pattern,
                  owl=self.owl)
        if self.method != "magnitude":
            kw["refine"] = self.refine
        return make_config(self.method, **kw)


def _done(path: Path) -> dict[str, dict]:
    rows = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash: that cell is simply recomputed
            rows[row["key"]] = row
    return rows


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_sweep(model_source: str, cells: list[Cell], out_dir: Path, *, calib_args, eval_windows: int = 64,
              device: str = "cpu", title: str = "", progress: bool = True) -> list[dict]:
    """Run (or resume) the sweep; write results.{jsonl,json,md} and perplexity_vs_sparsity.png."""
    from sparselm.cli.common import calibration_for
    from sparselm.data import corpus_token_ids
    from sparselm.evaluate import model_context, perplexity
    from sparselm.io import load
    from sparselm.prune import sparsify

    # validate every cell before any work
    for c in cells:
        c.config()
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "results.jsonl"
    done = _done(log)
    model, tok = load(model_source)
    seq_len = model_context(model)
    test_ids = corpus_token_ids(tok, None, "test")
    calib, calib_record = calibration_for(model, tok, calib_args)
    meta = {"model": str(model_source), "calibration": calib_record, "eval": {"split": "test", "seq_len": seq_len,
                                                                               "windows": eval_windows}}
    if "dense" not in done:
        ppl = perplexity(model, test_ids, seq_len, max_windows=eval_windows)
        row = {"key": "dense", "method": "dense", "pattern": "-", "target": 0.0, "sparsity": 0.0,
               "perplexity": ppl, "seconds": 0.0}
        _append(log, row)
        done["dense"] = row
    dense_ppl = done["dense"]["perplexity"]
    if any(c.key not in done for c in cells):
        from sparselm.kernels import load_extension

        if progress:
            print("C++ kernels: building on first use (cached afterwards) or loading")
        load_extension()  # now, so that no cell's pruning time includes the one-time build
    for i, cell in enumerate(cells):
        if cell.key in done:
            if progress:
                print(f"[{i + 1}/{len(cells)}] {cell.key}: done before, skipped")
            continue
        if progress:
            print(f"[{i + 1}/{len(cells)}] {cell.key}")
        if i > 0 or "dense" in done:
            model, tok = load(model_source)  # every cell starts from the unpruned model
        config = cell.config()
        rep = sparsify(model, config, calib if config.needs_calibration else None, device=device, progress=progress)
        ppl = perplexity(model, test_ids, seq_len, max_windows=eval_windows)
        row = {"key": cell.key, **asdict(cell), "target": config.effective_sparsity, "sparsity": rep.sparsity,
               "perplexity": ppl, "seconds": rep.seconds, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _append(log, row)
        done[cell.key] = row
    rows = [done["dense"]] + [done[c.key] for c in cells]
    for r in rows:
        r["ppl_ratio"] = r["perplexity"] / dense_ppl
        if r.get("owl"):
            r["method"] = r["method"] + "+owl" if not r["method"].endswith("+owl") else r["method"]
        if r.get("refine"):
            r["method"] = r["method"] + "+refine" if "+refine" not in r["method"] else r["method"]
    table = markdown_table(rows, COLUMNS)
    write_json(out_dir / "results.json", {"meta": meta, "results": rows})
    (out_dir / "results.md").write_text(f"# {title or 'sparselm compare'}\n\n{table}\n\n"
                                        f"Calibration: {calib_record}. Evaluation: test split, {eval_windows} "
                                        f"windows of {seq_len} tokens.\n")
    plot_perplexity_vs_sparsity([{**r, "method": r["method"].split("+")[0]} for r in rows],
                                out_dir / "perplexity_vs_sparsity.png", title or str(model_source))
    return rows
