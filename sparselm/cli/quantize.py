"""`sparselm quantize MODEL --method {rtn,gptq,sparsegptq} --bits 4 --out DIR`."""
from __future__ import annotations


def register(subparsers) -> None:
    from sparselm.cli.common import add_calibration_args, add_device_arg

    p = subparsers.add_parser("quantize", help="weight-only int4/int8 quantization (RTN, GPTQ), optionally joint "
                                               "with SparseGPT pruning; writes packed weights")
    p.add_argument("model", help="local HF model folder or built-in name (tiny, small)")
    p.add_argument("--method", choices=("rtn", "gptq", "sparsegptq"), default="gptq", help="(default gptq)")
    p.add_argument("--bits", type=int, choices=(4, 8), default=4, help="(default 4)")
    p.add_argument("--group-size", type=int, default=128, help="input columns per scale (default 128)")
    p.add_argument("--asymmetric", action="store_true", help="add a zero point per group")
    p.add_argument("--sparsity", type=float, default=0.5, help="sparsegptq: fraction removed (default 0.5)")
    p.add_argument("--pattern", default="unstructured", help="sparsegptq: 'unstructured' or N:M such as 2:4")
    p.add_argument("--eval-windows", type=int, default=16, help="test windows for perplexity (default 16; 0 = skip)")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_calibration_args(p, samples=128, seq_len=None)
    add_device_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import copy
    import json

    from sparselm.cli.common import calibration_for, resolve_device
    from sparselm.data import corpus_token_ids, load_corpus
    from sparselm.evaluate import model_context, perplexity
    from sparselm.io import check_output_dir, load
    from sparselm.quant import bytes_per_parameter, make_quant_config, quantize, save_quantized

    extra = {"sparsity": args.sparsity, "pattern": args.pattern} if args.method == "sparsegptq" else {}
    config = make_quant_config(args.method, bits=args.bits, group_size=args.group_size,
                               symmetric=not args.asymmetric, **extra)
    model, tokenizer = load(args.model)
    check_output_dir(args.out, overwrite=args.overwrite, protect=(args.model,))  # before the work, not after
    calib, record = calibration_for(model, tokenizer, args) if config.needs_calibration else (None, {})
    dense = copy.deepcopy(model) if args.eval_windows else None
    report = quantize(model, config, calib, device=resolve_device(args.device))
    size = bytes_per_parameter(model)
    result = {"out": args.out, "report": report.to_dict(), "size": size}
    if args.eval_windows:
        ids = corpus_token_ids(tokenizer, load_corpus(args.calib), "test")
        seq = min(256, model_context(model))
        result["perplexity"] = {"dense": perplexity(dense, ids, seq, max_windows=args.eval_windows),
                                "quantized": perplexity(model, ids, seq, max_windows=args.eval_windows)}
    save_quantized(model, tokenizer, args.out, overwrite=True, protect=(args.model,),
                   metadata={"quantization": config.to_dict(), "calibration": record})
    ppl = result.get("perplexity")
    print(f"{report.label}: {report.layers} layers, sparsity {report.sparsity:.1%}, "
          f"{size['bytes_per_parameter']:.3f} bytes/param ({size['vs_bf16']:.3f} of bf16)"
          + (f", perplexity {ppl['dense']:.2f} -> {ppl['quantized']:.2f}" if ppl else "") + f"; saved to {args.out}")
    print(json.dumps(result, default=str))
    return 0
