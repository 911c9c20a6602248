"""`sparselm activations MODEL`: measure activation sparsity, calibrate TEAL thresholds and
report perplexity at target sparsities, optionally ReLU-fy and fine-tune first."""
from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "activations", help="measure activation sparsity; TEAL thresholds and ReLU-fication with perplexity",
        description="Per block and projection input: fraction of activations below a threshold, prefill vs "
                    "decode, histograms (table + plot). With --targets, calibrate TEAL thresholds and report "
                    "held-out perplexity at each model-wide activation sparsity.")
    p.add_argument("model", help="built-in name (tiny, small) or a local HF causal-LM folder")
    p.add_argument("--corpus", default=None, help="text file or folder (default: the built-in corpus)")
    p.add_argument("--threshold", type=float, default=1e-2, help="|x| at or below this counts as sparse (default 0.01)")
    p.add_argument("--targets", default="0.25,0.4,0.5",
                   help="comma-separated model-wide TEAL sparsities to evaluate ('' to skip)")
    p.add_argument("--allocation", choices=("uniform", "greedy"), default="greedy")
    p.add_argument("--decode-only", action="store_true", help="sparsify only single-token (decode) forwards")
    p.add_argument("--relufy-steps", type=int, default=None,
                   help="ReLU-fy the MLPs and fine-tune for this many steps before measuring")
    p.add_argument("--relu-after-norms", action="store_true", help="with --relufy-steps: also ReLU after the norms")
    p.add_argument("--samples", type=int, default=16, help="calibration windows (default 16)")
    p.add_argument("--eval-windows", type=int, default=32, help="held-out perplexity windows (default 32)")
    p.add_argument("--out", default=None, help="folder for activations.png and activations.json")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    from pathlib import Path

    from sparselm.activation.install import install_thresholds
    from sparselm.activation.measure import measure_activations
    from sparselm.activation.relufy import relufy_and_finetune
    from sparselm.activation.thresholds import calibrate_thresholds, collect_projection_inputs
    from sparselm.data import calibration, load_corpus
    from sparselm.data.tokens import corpus_token_ids
    from sparselm.errors import SparselmError
    from sparselm.evaluate import model_context, perplexity
    from sparselm.io import load

    try:
        targets = [float(t) for t in args.targets.split(",") if t.strip()]
    except ValueError:
        raise SparselmError(f"--targets must be comma-separated numbers like 0.25,0.4,0.5, got {args.targets!r}") from None
    corpus = load_corpus(args.corpus)
    model, tokenizer = load(args.model)
    seq_len = min(128, model_context(model))
    val_ids = corpus_token_ids(tokenizer, corpus, "validation")
    calib = calibration(tokenizer, corpus, n=args.samples, seq_len=seq_len, seed=0)
    summary: dict = {"model": args.model, "threshold": args.threshold}
    if args.relufy_steps is not None:
        before = measure_activations(model, calib, 0.0)
        ppl_before = perplexity(model, val_ids, seq_len, max_windows=args.eval_windows)
        train_ids = corpus_token_ids(tokenizer, corpus, "train")
        relufy_and_finetune(model, train_ids, val_ids, steps=args.relufy_steps, seq_len=seq_len,
                            after_norms=args.relu_after_norms)
        after = measure_activations(model, calib, 0.0)
        ppl_after = perplexity(model, val_ids, seq_len, max_windows=args.eval_windows)
        summary["relufication"] = {"steps": args.relufy_steps, "exact_zeros_before": before.overall("prefill"),
                                   "exact_zeros_after": after.overall("prefill"),
                                   "perplexity_before": ppl_before, "perplexity_after": ppl_after}
        print(f"ReLU-fication ({args.relufy_steps} steps): exact-zero activations "
              f"{before.overall('prefill'):.3f} -> {after.overall('prefill'):.3f}, "
              f"perplexity {ppl_before:.2f} -> {ppl_after:.2f}\n")
    report = measure_activations(model, calib, args.threshold)
    print(f"fraction of projection inputs with |x| <= {args.threshold:g} (weighted by the weights they multiply)\n")
    print(report.table())
    summary["measured"] = {"prefill": report.overall("prefill"), "decode": report.overall("decode"),
                           "per_projection": report.rows()}
    if targets:
        dense_ppl = perplexity(model, val_ids, seq_len, max_windows=args.eval_windows)
        inputs = collect_projection_inputs(model, calib)
        rows = [{"target": 0.0, "measured": 0.0, "perplexity": dense_ppl}]
        for target in targets:
            th = calibrate_thresholds(model, calib, target, args.allocation, inputs=inputs)
            measured = measure_activations(model, calib, th, decode_tokens=0).overall("prefill")
            handle = install_thresholds(model, th, decode_only=args.decode_only)
            try:
                ppl = perplexity(model, val_ids, seq_len, max_windows=args.eval_windows)
            finally:
                handle.remove()
            rows.append({"target": target, "measured": measured, "perplexity": ppl})
        print(f"\nTEAL thresholds ({args.allocation} allocation{', decode only' if args.decode_only else ''}):\n")
        print("| target sparsity | measured on calibration | held-out perplexity | vs dense |\n| --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['target']:.2f} | {r['measured']:.3f} | {r['perplexity']:.2f} | "
                  f"{r['perplexity'] / dense_ppl:.3f}x |")
        summary["teal"] = {"allocation": args.allocation, "decode_only": args.decode_only, "rows": rows}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report.plot(out / "activations.png", title=f"activation sparsity of {args.model} (|x| <= {args.threshold:g})")
        (out / "activations.json").write_text(json.dumps(summary, indent=2))
        print(f"\nplot: {out / 'activations.png'}")
    print(json.dumps({k: v for k, v in summary.items() if k != "measured"} | {
        "prefill": summary["measured"]["prefill"], "decode": summary["measured"]["decode"]}))
    return 0
