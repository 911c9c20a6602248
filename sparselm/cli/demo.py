"""`sparselm demo`: the main job on the built-in default, no network, no downloads.

Trains (first run only, then cached) the built-in small Llama-architecture model on the
interpreter's own standard library sources, prunes it with magnitude, Wanda and SparseGPT at
50% unstructured and at 2:4 (plus SparseGPT with the kept weights refit), and writes one table as JSON, Markdown and a PNG plot.
"""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("demo", help="prune the built-in model with every method and compare (no downloads)")
    p.add_argument("--model", default="small", help="built-in model or local folder (default: small)")
    p.add_argument("--out", default=None, help="report folder (default: sparselm-reports/demo-<time>)")
    p.add_argument("--samples", type=int, default=64, help="calibration windows (default 64)")
    p.add_argument("--windows", type=int, default=64, help="evaluation windows (default 64)")
    p.set_defaults(func=run)


def run(args) -> int:
    import time
    from pathlib import Path

    from sparselm.cli.common import resolve_device
    from sparselm.report import markdown_table
    from sparselm.sweep import COLUMNS, Cell, run_sweep

    t0 = time.time()
    out = Path(args.out or f"sparselm-reports/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    cells = [Cell(m, p, 0.5) for p in ("unstructured", "2:4") for m in ("magnitude", "wanda", "sparsegpt")]
    # sparselm's own recipe beside the three classics: SparseGPT, then the kept weights refit
    cells += [Cell("sparsegpt", p, 0.5, refine=30) for p in ("unstructured", "2:4")]
    calib_args = argparse.Namespace(calib=None, samples=args.samples, seq_len=None, seed=0)
    rows = run_sweep(args.model, cells, out, calib_args=calib_args, eval_windows=args.windows,
                     device=resolve_device(None), title=f"sparselm demo: built-in {args.model} model")
    print()
    print(markdown_table(rows, COLUMNS))
    print(f"\ndemo finished in {time.time() - t0:.0f}s; report folder: {out}")
    print(f"  {out}/results.md  {out}/results.json  {out}/perplexity_vs_sparsity.png")
    return 0
