"""`sparselm eval MODEL`: held-out perplexity, sparsity and parameter counts."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("eval", help="perplexity, sparsity and parameter counts of a model",
                       description="Perplexity over non-overlapping windows of the held-out split (the model's "
                                   "context, or --seq-len; the first --max-windows windows), measured sparsity "
                                   "of the decoder-block linear layers, and parameter counts.")
    p.add_argument("model", help="local Hugging Face causal LM folder, or a built-in name (tiny, small)")
    p.add_argument("--data", default=None, help="text file or folder (default: the built-in corpus)")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the model's context, <= 2048)")
    p.add_argument("--max-windows", default="64", help="number of windows, or 'all' (default 64)")
    p.add_argument("--layers", action="store_true", help="also print the sparsity of every layer")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of tables")
    p.set_defaults(func=run)


def run(args) -> int:
    from sparselm.cli.common import print_json
    from sparselm.errors import SparselmError
    from sparselm.evaluate import evaluate
    from sparselm.io import load

    if args.max_windows == "all":
        max_windows = None
    else:
        try:
            max_windows = int(args.max_windows)
        except ValueError:
            raise SparselmError(f"--max-windows must be a number or 'all'; got {args.max_windows!r}") from None
        if max_windows <= 0:
            raise SparselmError("--max-windows must be positive")
    model, tok = load(args.model)
    report = evaluate(model, tok, args.data, split=args.split, seq_len=args.seq_len, max_windows=max_windows,
                      progress=not args.json)
    if args.json:
        print_json(report.to_dict())
        return 0
    print(report.table())
    if args.layers:
        print("\n| layer | sparsity |\n| --- | --- |")
        for name, s in report.layer_sparsity.items():
            print(f"| {name} | {s:.2%} |")
    return 0
