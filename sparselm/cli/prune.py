"""`sparselm prune MODEL --method M --sparsity S [--pattern N:M] --out DIR`."""
from __future__ import annotations

from sparselm.cli.common import add_calibration_args, add_device_arg


def register(sub) -> None:
    p = sub.add_parser("prune", help="prune a model with magnitude, Wanda or SparseGPT and save it",
                       description="Prune the linear layers of a model's decoder blocks and save the result "
                                   "(Hugging Face layout, loadable by transformers).")
    p.add_argument("model", help="local Hugging Face causal LM folder, or a built-in name (tiny, small)")
    p.add_argument("--method", choices=["magnitude", "wanda", "sparsegpt"], default="sparsegpt")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of weights removed, in [0, 1)")
    p.add_argument("--pattern", default="unstructured", help="'unstructured' or N:M (N kept of every M), e.g. 2:4")
    p.add_argument("--owl", action="store_true", help="outlier-weighted per-block sparsity (OWL)")
    p.add_argument("--lm-head", action="store_true",
                   help="prune the LM head too (same sparsity/pattern; off by default; refused if tied)")
    p.add_argument("--refine", type=int, default=0, metavar="ITERS",
                   help="refit the kept weights to the dense layer outputs (CG iterations; 0 = off)")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--packed", action="store_true", help="store the sparse weights packed (smaller files)")
    p.add_argument("--eval", action="store_true", help="also measure held-out perplexity before and after")
    add_calibration_args(p)
    add_device_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from sparselm.cli.common import calibration_for, resolve_device
    from sparselm.errors import SparselmError
    from sparselm.io import check_output_dir, load, save
    from sparselm.prune import make_config, sparsify

    kwargs = dict(sparsity=args.sparsity, pattern=args.pattern, owl=args.owl, lm_head=args.lm_head)
    if args.method != "magnitude":
        kwargs["refine"] = args.refine
    elif args.refine:
        raise SparselmError("--refine needs calibration statistics; use it with wanda or sparsegpt")
    config = make_config(args.method, **kwargs)  # validate before loading anything
    out = Path(args.out)
    check_output_dir(out, overwrite=args.overwrite, protect=(args.model,))  # before the work, not after
    device = resolve_device(args.device)
    model, tok = load(args.model)
    calib, record = (None, {})
    if config.needs_calibration:
        calib, record = calibration_for(model, tok, args)
    before = _ppl(model, tok) if args.eval else None
    report = sparsify(model, config, calib, device=device)
    after = _ppl(model, tok) if args.eval else None
    metadata = {"pruning": {**report.to_dict(), "calibration": record, "source_model": str(args.model)}}
    if before is not None:
        metadata["perplexity"] = {"dense": before, "pruned": after}
    save(model, tok, out, metadata=metadata, overwrite=args.overwrite, packed=args.packed, protect=(args.model,))
    print(f"| method | pattern | target | measured sparsity | seconds |{' ppl dense | ppl pruned |' if before else ''}")
    print(f"| --- | --- | --- | --- | --- |{' --- | --- |' if before else ''}")
    extra = f" {before:.3f} | {after:.3f} |" if before is not None else ""
    print(f"| {report.method} | {report.pattern} | {report.target_sparsity:.2%} | {report.sparsity:.2%} | "
          f"{report.seconds:.1f} |{extra}")
    print(f"saved to {out}")
    return 0


def _ppl(model, tok) -> float:
    from sparselm.evaluate import evaluate

    return evaluate(model, tok).perplexity
