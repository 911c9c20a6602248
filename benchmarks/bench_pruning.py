"""Pruning benchmark: sparselm against llm-compressor on the same model, data and evaluation.

Both libraries prune the built-in "small" model (Llama architecture, trained here on the
standard-library corpus) with the SAME calibration rows (one seeded draw, written to a
safetensors file that the peer reads), and both pruned models are scored by the SAME code
(`sparselm.evaluate.perplexity`, same held-out test windows, in this process).

Part 1, like for like: SparseGPT and Wanda at 50% unstructured and at 2:4.
  ppl ratio  = sparselm perplexity / llm-compressor perplexity       (target <= 1.00)
  time ratio = sparselm pruning seconds / llm-compressor seconds      (target <= 0.50)
Pruning seconds exclude model loading and saving on both sides; llm-compressor times its
own `oneshot` call (see peers/llmcompressor_prune.py). With --repeats R each side prunes R
times per cell, alternating sparselm and llm-compressor, and the fastest run of each counts
(the usual defence against a shared machine's noise; the results are identical across runs).

Part 2, beyond the peers: at 70% unstructured and at 2:4, sparselm's best recipe against
llm-compressor's best method. Each side's candidates are ranked on the VALIDATION split,
and the winner is reported on the test split, so neither side is picked on test data.
  cut = 1 - (ppl_sparselm - ppl_dense) / (ppl_peer - ppl_dense)       (target >= 0.10)

llm-compressor runs in its own environment; create it once with
    bash benchmarks/peers/setup_llmcompressor.sh
Without it the peer columns are skipped (and the script says so).

Usage: nice python benchmarks/bench_pruning.py [--samples 128 --seq-len 256]
Prints a Markdown report, then one JSON line last.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

REPO_ROOT = Path(__file__).resolve().parent.parent
PEER_PYTHON = REPO_ROOT / ".venv-llmcompressor" / "bin" / "python"
PEER_SCRIPT = Path(__file__).resolve().parent / "peers" / "llmcompressor_prune.py"


@dataclass
class Result:
    """One pruned model, scored."""
    library: str
    label: str  # e.g. "sparsegpt", "sparsegpt+owl+refine"
    pattern: str
    seconds: float = math.nan
    sparsity: float = math.nan  # measured over the decoder blocks' linear layers
    nm_valid: bool | None = None  # every N:M group valid (None for unstructured)
    val_ppl: float = math.nan
    test_ppl: float = math.nan
    error: str | None = None
    settings: dict = field(default_factory=dict)

    def summary(self) -> dict:
        keys = ("library", "label", "pattern", "seconds", "sparsity", "nm_valid", "val_ppl", "test_ppl", "error")
        return {k: getattr(self, k) for k in keys}


class Evaluator:
    """Scores a model on fixed validation and test windows, and measures its sparsity."""

    def __init__(self, tokenizer, seq_len: int, windows: int):
        from sparselm.data.corpus import load_corpus
        from sparselm.data.tokens import corpus_token_ids

        corpus = load_corpus()
        self.seq_len, self.windows = seq_len, windows
        self.ids = {split: corpus_token_ids(tokenizer, corpus, split) for split in ("validation", "test")}

    def score(self, model, result: Result) -> Result:
        from sparselm.adapters import get_adapter, linear_weight
        from sparselm.evaluate import perplexity
        from sparselm.prune import is_valid_nm, parse_pattern

        adapter = get_adapter(model)
        weights = [linear_weight(m) for b in adapter.blocks(model) for m in adapter.linear_layers(b).values()]
        zeros = sum(int((w == 0).sum()) for w in weights)
        result.sparsity = zeros / sum(w.numel() for w in weights)
        pattern = parse_pattern(result.pattern)
        if pattern.is_nm:
            result.nm_valid = all(is_valid_nm(w, pattern.n, pattern.m) for w in weights)
        result.val_ppl = perplexity(model, self.ids["validation"], self.seq_len, max_windows=self.windows)
        result.test_ppl = perplexity(model, self.ids["test"], self.seq_len, max_windows=self.windows)
        # a line per finished model, so an interrupted run still leaves its numbers behind
        tqdm.write(f"{result.library} {result.label} {result.pattern}: sparsity {result.sparsity:.4f}, "
                   f"val {result.val_ppl:.3f}, test {result.test_ppl:.3f}, {result.seconds:.2f}s", file=sys.stderr)
        return result


def run_sparselm(model, dense_state, config, calib, evaluator, label) -> Result:
    """Restore the dense weights, prune in place with `config`, time it, score it."""
    import sparselm.prune as prune

    model.load_state_dict(dense_state)
    result = Result("sparselm", label, config.pattern, settings=config.to_dict())
    start = time.perf_counter()
    prune.sparsify(model, config, calib, progress=False)
    result.seconds = time.perf_counter() - start
    return evaluator.score(model, result)


def run_peer(model_dir: Path, calib_file: Path, work: Path, evaluator, method: str, pattern: str,
             sparsity: float, owl: bool = False, batch_size: int = 1) -> Result:
    """Prune with llm-compressor in its own environment, then score the saved model here."""
    from transformers import AutoModelForCausalLM

    label = method + ("+owl" if owl else "")
    result = Result("llmcompressor", label, pattern)
    out = work / f"peer-{label}-{pattern.replace(':', 'of')}-{sparsity:.2f}"
    if out.exists():  # a repeat of the same cell: the peer refuses to write over its earlier output
        shutil.rmtree(out)
    cmd = [str(PEER_PYTHON), str(PEER_SCRIPT), str(model_dir), str(calib_file), "--method", method,
           "--sparsity", str(sparsity), "--pattern", pattern, "--out", str(out),
           "--threads", str(torch.get_num_threads()),
           "--batch-size", str(batch_size)] + (["--owl"] if owl else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        errors = [line for line in proc.stderr.splitlines() if "Error" in line or "error:" in line]
        result.error = (errors[-1] if errors else f"exit code {proc.returncode}").strip()[:200]
        tqdm.write(f"llmcompressor {label} {pattern}: failed: {result.error}", file=sys.stderr)
        return result
    record = json.loads(lines[-1])
    result.seconds = record["prune_seconds"]
    result.settings = {k: v for k, v in record.items() if k != "out"}
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    return evaluator.score(model.eval(), result)


def best(results: list[Result]) -> Result | None:
    """The candidate with the lowest validation perplexity (test data plays no part)."""
    ok = [r for r in results if r.error is None and not math.isnan(r.val_ppl)]
    return min(ok, key=lambda r: r.val_ppl) if ok else None


def _finite(obj):
    """NaN is not JSON: report missing numbers as null."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def fmt(x, spec=".2f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small", choices=["tiny", "small"],
                        help="built-in model (tiny: a quick smoke run of this script)")
    parser.add_argument("--samples", type=int, default=128, help="calibration rows shared by both libraries")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per calibration row and evaluation window (default: the model's context)")
    parser.add_argument("--more-samples", type=int, default=256,
                        help="calibration rows for sparselm's best recipe in part 2 (0: same as --samples)")
    parser.add_argument("--refine", type=int, default=50, help="refinement iterations in sparselm's best recipe")
    parser.add_argument("--windows", type=int, default=64, help="evaluation windows per split (seq-len tokens each)")
    parser.add_argument("--peer-batch-size", type=int, default=1,
                        help="llm-compressor calibration batch size (1 is its default)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="prune each part-1 cell this many times per side, alternating; report the fastest")
    parser.add_argument("--skip-peer", action="store_true", help="run sparselm only")
    parser.add_argument("--skip-beyond", action="store_true", help="skip part 2 (70%% and 2:4 best recipes)")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    from safetensors.torch import save_file

    import sparselm.prune as prune
    from sparselm.data.calibration import calibration
    from sparselm.zoo import load_builtin

    peer = not args.skip_peer and PEER_PYTHON.exists()
    if not args.skip_peer and not peer:
        print("llm-compressor environment not found: peer columns skipped. Create it with\n"
              "    bash benchmarks/peers/setup_llmcompressor.sh\n", file=sys.stderr)

    model, tok = load_builtin(args.model)
    model.eval()
    args.seq_len = args.seq_len or model.config.max_position_embeddings
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    calib = calibration(tok, n=args.samples, seq_len=args.seq_len)  # [n, T], the rows both libraries see
    more = calibration(tok, n=args.more_samples, seq_len=args.seq_len) if args.more_samples else calib
    evaluator = Evaluator(tok, args.seq_len, args.windows)
    dense = evaluator.score(model, Result("dense", "dense", "unstructured"))

    with tempfile.TemporaryDirectory(prefix="sparselm-bench-pruning-") as tmp:
        work = Path(tmp)
        model_dir, calib_file = work / "small", work / "calib.safetensors"
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        save_file({"input_ids": calib.contiguous()}, str(calib_file))

        # Part 1: like for like, same calibration rows, default settings on both sides.
        cells = [(m, p) for m in ("sparsegpt", "wanda") for p in ("unstructured", "2:4")]
        part1: dict[tuple[str, str], tuple[Result, Result | None]] = {}
        for method, pattern in tqdm(cells, desc="part 1: 50% / 2:4", dynamic_ncols=True):
            config = prune.make_config(method, sparsity=0.5, pattern=pattern)
            ours, theirs = None, None
            for _ in range(max(1, args.repeats)):
                run = run_sparselm(model, dense_state, config, calib, evaluator, method)
                ours = run if ours is None or run.seconds < ours.seconds else ours
                if peer:
                    run = run_peer(model_dir, calib_file, work, evaluator, method, pattern, 0.5,
                                   batch_size=args.peer_batch_size)
                    if run.error:  # one failed repeat fails the cell: no silent best-of-fewer
                        theirs = run
                        break
                    theirs = run if theirs is None or run.seconds < theirs.seconds else theirs
            part1[(method, pattern)] = (ours, theirs)

        # Part 2: each side's best at 70% unstructured and at 2:4.
        part2 = {}
        if not args.skip_beyond:
            settings = [("70% unstructured", 0.7, "unstructured"), ("2:4", 0.5, "2:4")]
            for title, sparsity, pattern in tqdm(settings, desc="part 2: best recipes", dynamic_ncols=True):
                ours = []
                for method in ("sparsegpt", "wanda"):
                    owl_options = (False, True) if pattern == "unstructured" else (False,)
                    for owl in owl_options:
                        config = prune.make_config(method, sparsity=sparsity, pattern=pattern, owl=owl,
                                                   refine=args.refine)
                        label = f"{method}{'+owl' if owl else ''}+refine{args.refine}+{more.shape[0]}x{more.shape[1]}"
                        ours.append(run_sparselm(model, dense_state, config, more, evaluator, label))
                theirs = []
                if peer:
                    for method in ("sparsegpt", "wanda"):
                        if pattern == "2:4":  # already pruned in part 1 with these exact settings
                            theirs.append(part1[(method, pattern)][1])
                            continue
                        for owl in (False, True):
                            theirs.append(run_peer(model_dir, calib_file, work, evaluator, method, pattern,
                                                   sparsity, owl=owl, batch_size=args.peer_batch_size))
                part2[title] = (ours, theirs)

    report = render(args, dense, part1, part2, peer)
    print(report["markdown"])
    print(json.dumps(_finite(report["json"])))
    return 0


def render(args, dense: Result, part1, part2, peer: bool) -> dict:
    """Markdown tables and the JSON summary."""
    lines = [f"## Pruning: sparselm vs llm-compressor (built-in '{args.model}' Llama, {torch.get_num_threads()} threads)",
             "",
             f"Calibration: {args.samples} x {args.seq_len} tokens (one seeded draw, shared). "
             f"Evaluation: perplexity on the first {args.windows} non-overlapping {args.seq_len}-token windows "
             f"of the test split. Dense perplexity: {dense.test_ppl:.3f}. "
             f"Seconds: fastest of {max(1, args.repeats)} run(s) per side.",
             "",
             "| method | pattern | sparsity sl / llmc | ppl sparselm | ppl llmc | ppl ratio | s sparselm | s llmc "
             "| time ratio |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    cells_json = []
    for (method, pattern), (ours, theirs) in part1.items():
        theirs = theirs or Result("llmcompressor", method, pattern, error="skipped")
        ppl_ratio = ours.test_ppl / theirs.test_ppl if theirs.error is None else math.nan
        time_ratio = ours.seconds / theirs.seconds if theirs.error is None else math.nan
        valid = "" if ours.nm_valid is None else (" (N:M valid)" if ours.nm_valid and theirs.nm_valid in (True, None)
                                                    else " (N:M INVALID)")
        lines.append(f"| {method} | {pattern} | {fmt(ours.sparsity, '.3f')} / {fmt(theirs.sparsity, '.3f')}{valid} "
                     f"| {fmt(ours.test_ppl, '.3f')} | {fmt(theirs.test_ppl, '.3f')} | {fmt(ppl_ratio, '.3f')} "
                     f"| {fmt(ours.seconds)} | {fmt(theirs.seconds)} | {fmt(time_ratio, '.3f')} |")
        cells_json.append({"method": method, "pattern": pattern, "sparselm": ours.summary(),
                           "llmcompressor": theirs.summary(), "ppl_ratio": ppl_ratio, "time_ratio": time_ratio})
    beyond_json = []
    if part2:
        lines += ["", "### Beyond the peers: best recipe per side (chosen on validation, reported on test)", "",
                  "| setting | side | recipe | sparsity | val ppl | test ppl | increase over dense |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for title, (ours, theirs) in part2.items():
            for r in ours + theirs:
                if r.error:
                    lines.append(f"| {title} | {r.library} | {r.label} | failed: {r.error} | | | |")
                    continue
                lines.append(f"| {title} | {r.library} | {r.label} | {r.sparsity:.3f} | {r.val_ppl:.3f} "
                             f"| {r.test_ppl:.3f} | {r.test_ppl - dense.test_ppl:+.3f} |")
            win_ours, win_theirs = best(ours), best(theirs)
            cut = math.nan
            if win_ours and win_theirs:
                cut = 1 - (win_ours.test_ppl - dense.test_ppl) / (win_theirs.test_ppl - dense.test_ppl)
            lines.append(f"| {title} | **best** | sparselm {win_ours.label if win_ours else 'n/a'} vs llmc "
                         f"{win_theirs.label if win_theirs else 'n/a'} | | | | cut of the increase: "
                         f"**{fmt(cut * 100, '.1f')}%** |")
            beyond_json.append({"setting": title, "sparselm_best": win_ours.summary() if win_ours else None,
                                "llmcompressor_best": win_theirs.summary() if win_theirs else None,
                                "increase_cut": cut})
    ppl_ratios = [c["ppl_ratio"] for c in cells_json if not math.isnan(c["ppl_ratio"])]
    time_ratios = [c["time_ratio"] for c in cells_json if not math.isnan(c["time_ratio"])]
    cuts = [b["increase_cut"] for b in beyond_json if not math.isnan(b["increase_cut"])]
    peer_versions = [t.settings["version"] for _, t in part1.values() if t is not None and "version" in t.settings]
    summary = {
        "benchmark": "pruning_vs_llmcompressor", "model": args.model, "peer": peer,
        "llmcompressor_version": peer_versions[0] if peer_versions else None,
        "calibration": [args.samples, args.seq_len], "eval_windows": args.windows,
        "repeats": max(1, args.repeats), "dense_ppl": dense.test_ppl,
        "max_ppl_ratio": max(ppl_ratios) if ppl_ratios else None,
        "max_time_ratio": max(time_ratios) if time_ratios else None,
        "min_increase_cut": min(cuts) if cuts else None,
        "targets_met": {"ppl_ratio<=1.00": bool(ppl_ratios) and max(ppl_ratios) <= 1.0,
                        "time_ratio<=0.50": bool(time_ratios) and max(time_ratios) <= 0.5,
                        "increase_cut>=0.10": bool(cuts) and len(cuts) == len(beyond_json) and min(cuts) >= 0.10},
        "cells": cells_json, "beyond": beyond_json,
    }
    lines += ["", f"Targets: ppl ratio <= 1.00 (worst {fmt(summary['max_ppl_ratio'], '.3f')}), time ratio <= 0.50 "
              f"(worst {fmt(summary['max_time_ratio'], '.3f')}), cut of the perplexity increase >= 10% "
              f"(worst {fmt(summary['min_increase_cut'] * 100 if cuts else None, '.1f')}%).", ""]
    return {"markdown": "\n".join(lines), "json": summary}


if __name__ == "__main__":
    raise SystemExit(main())
