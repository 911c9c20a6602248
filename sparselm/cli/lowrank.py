"""`sparselm lowrank MODEL --keep 0.8 --method {svd,asvd,whiten} --out DIR`."""
from __future__ import annotations


def register(subparsers) -> None:
    from sparselm.cli.common import add_calibration_args

    p = subparsers.add_parser("lowrank", help="factorize linear layers into thin matrices (SVD, ASVD, whitened SVD)")
    p.add_argument("model", help="local HF model folder or built-in name (tiny, small)")
    p.add_argument("--keep", type=float, default=0.8, help="fraction of the block linears' parameters kept (default 0.8)")
    p.add_argument("--method", choices=("svd", "asvd", "whiten"), default="whiten", help="factorization (default whiten)")
    p.add_argument("--allocation", choices=("uniform", "sensitivity"), default="uniform",
                   help="rank per layer: same fraction everywhere, or from measured sensitivity (default uniform)")
    p.add_argument("--eval-windows", type=int, default=16, help="test windows for perplexity (default 16)")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_calibration_args(p, samples=64, seq_len=None)
    p.set_defaults(func=run)


def run(args) -> int:
    import copy
    import json

    from sparselm.cli.common import calibration_for
    from sparselm.data import corpus_token_ids, load_corpus
    from sparselm.io import check_output_dir, load
    from sparselm.lowrank import lowrank, save_lowrank
    from sparselm.structured.before_after import before_after_table, compare_before_after

    model, tokenizer = load(args.model)
    check_output_dir(args.out, overwrite=args.overwrite, protect=(args.model,))  # before the work, not after
    calib, calib_record = calibration_for(model, tokenizer, args)
    dense = copy.deepcopy(model)
    report = lowrank(model, calib, keep=args.keep, method=args.method, allocation=args.allocation)
    save_lowrank(model, tokenizer, args.out, overwrite=True, protect=(args.model,),
                 metadata={"method": f"lowrank-{args.method}", "keep": args.keep, "allocation": args.allocation,
                           "calibration": calib_record, "kept_fraction": report.kept_fraction})
    eval_ids = corpus_token_ids(tokenizer, load_corpus(args.calib), "test")
    rows = compare_before_after(dense, model, eval_ids, calib.shape[1], args.eval_windows)
    print(before_after_table(rows))
    factored = sum(r is not None for r in report.ranks.values())
    print(f"{factored}/{len(report.ranks)} layers factorized, {report.kept_fraction:.1%} of block linear "
          f"parameters kept; saved to {args.out}")
    print(json.dumps({"out": args.out, **rows, "report": report.to_dict()}, default=str))
    return 0
