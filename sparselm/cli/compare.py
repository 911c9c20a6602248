"""`sparselm compare MODEL --methods ... --sparsity ... --pattern ...`: a resumable sweep."""
from __future__ import annotations

from sparselm.cli.common import add_calibration_args, add_device_arg


def register(sub) -> None:
    p = sub.add_parser("compare", help="sweep methods x sparsities x patterns; one table and a plot",
                       description="Prune fresh copies of MODEL with every combination, evaluate each on the same "
                                   "held-out windows, and write results.{json,md} and a perplexity-vs-sparsity "
                                   "plot. Rerunning with the same --out skips finished cells.")
    p.add_argument("model", help="local Hugging Face causal LM folder, or a built-in name (tiny, small)")
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    p.add_argument("--sparsity", default="0.5,0.6,0.7", help="comma-separated unstructured sparsities")
    p.add_argument("--pattern", default="unstructured,2:4,4:8", help="comma-separated: unstructured and/or N:M")
    p.add_argument("--owl", action="store_true", help="add OWL variants of wanda / sparsegpt (unstructured)")
    p.add_argument("--refine", type=int, default=0, metavar="ITERS",
                   help="add variants of wanda / sparsegpt with the kept weights refit (CG iterations)")
    p.add_argument("--windows", type=int, default=64, help="evaluation windows of the test split (default 64)")
    p.add_argument("--out", default=None, help="results folder (default: sparselm-reports/compare-<model>)")
    add_calibration_args(p)
    add_device_arg(p)
    p.set_defaults(func=run)


def parse_cells(methods: str, sparsities: str, patterns: str, owl: bool = False, refine: int = 0):
    from sparselm.errors import SparselmError
    from sparselm.sweep import Cell

    ms = [m.strip() for m in methods.split(",") if m.strip()]
    try:
        ss = [float(s) for s in sparsities.split(",") if s.strip()]
    except ValueError:
        raise SparselmError(f"--sparsity must be comma-separated numbers; got {sparsities!r}") from None
    ps = [p.strip() for p in patterns.split(",") if p.strip()]
    cells = []
    for m in ms:
        for p in ps:
            variants = [(False, 0)]
            if m != "magnitude" and p == "unstructured":
                variants += [(True, 0)] if owl else []
            if m != "magnitude" and refine:
                variants += [(False, refine)]
            for o, r in variants:
                if p == "unstructured":
                    cells += [Cell(m, p, s, o, r) for s in ss]
                else:
                    cells.append(Cell(m, p, 0.5, o, r))
    if not cells:
        raise SparselmError("nothing to compare: give at least one method and one pattern")
    return cells


def run(args) -> int:
    from pathlib import Path

    from sparselm.cli.common import resolve_device
    from sparselm.sweep import COLUMNS, run_sweep
    from sparselm.report import markdown_table

    cells = parse_cells(args.methods, args.sparsity, args.pattern, args.owl, args.refine)
    for c in cells:
        c.config()  # bad sparsity / pattern: refuse before loading the model
    out = Path(args.out or f"sparselm-reports/compare-{Path(str(args.model)).name}")
    rows = run_sweep(args.model, cells, out, calib_args=args, eval_windows=args.windows,
                     device=resolve_device(args.device), title=f"sparselm compare {args.model}")
    print(markdown_table(rows, COLUMNS))
    print(f"report: {out}/results.md, {out}/results.json, {out}/perplexity_vs_sparsity.png")
    return 0
