"""`sparselm shrink MODEL --neurons 0.3 --heads 0.25 --layers 2 [--heal STEPS] --out DIR`."""
from __future__ import annotations


def register(subparsers) -> None:
    from sparselm.cli.common import add_calibration_args

    p = subparsers.add_parser("shrink", help="remove MLP neurons, attention heads and layers (the model really shrinks)")
    p.add_argument("model", help="local HF model folder or built-in name (tiny, small)")
    p.add_argument("--neurons", type=float, default=0.0, help="fraction of MLP neurons to remove per layer (default 0)")
    p.add_argument("--heads", type=float, default=0.0,
                   help="fraction of attention heads to remove, in whole KV groups (default 0)")
    p.add_argument("--head-mode", choices=("groups", "query"), default="groups",
                   help="groups: remove KV groups with their query heads; query: the same query heads from every group")
    p.add_argument("--layers", type=int, default=0, help="decoder layers to remove by block influence (default 0)")
    p.add_argument("--layer-selection", choices=("iterative", "once"), default="iterative",
                   help="iterative: re-measure block influence after each removal (default); once: ShortGPT")
    p.add_argument("--score", choices=("activation", "taylor"), default="activation",
                   help="neuron/head importance (default activation)")
    p.add_argument("--heal", type=int, default=0, metavar="STEPS", help="distillation steps against the input model")
    p.add_argument("--heal-lr", type=float, default=3e-4, help="learning rate of healing (default 3e-4)")
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
    from sparselm.io import check_output_dir, load, save
    from sparselm.structured import shrink
    from sparselm.structured.before_after import before_after_table, compare_before_after

    model, tokenizer = load(args.model)
    check_output_dir(args.out, overwrite=args.overwrite, protect=(args.model,))  # before the work, not after
    calib, calib_record = calibration_for(model, tokenizer, args)
    dense = copy.deepcopy(model)
    report = shrink(model, calib, neurons=args.neurons, heads=args.heads, layers=args.layers, score=args.score,
                    head_mode=args.head_mode, layer_selection=args.layer_selection, heal_steps=args.heal,
                    heal_lr=args.heal_lr)
    save(model, tokenizer, args.out, overwrite=True, protect=(args.model,),
         metadata={"method": "shrink", "neurons": args.neurons, "heads": args.heads, "layers": args.layers,
                   "layer_selection": args.layer_selection, "score": args.score, "head_mode": args.head_mode,
                   "heal_steps": args.heal,
                   "calibration": calib_record, "report": report.to_dict()})
    eval_ids = corpus_token_ids(tokenizer, load_corpus(args.calib), "test")
    rows = compare_before_after(dense, model, eval_ids, calib.shape[1], args.eval_windows)
    print(before_after_table(rows))
    print(f"removed layers {report.removed_layers}; heads {report.num_heads} (kv {report.num_kv_heads}); "
          f"MLP widths {report.intermediate_sizes}; saved to {args.out}")
    print(json.dumps({"out": args.out, **rows, "report": report.to_dict()}, default=str))
    return 0
