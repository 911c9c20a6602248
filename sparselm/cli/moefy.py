"""`sparselm moefy`: convert a dense Llama-architecture model into a mixture of experts."""
from __future__ import annotations

from sparselm.cli.common import add_calibration_args


def register(subparsers) -> None:
    p = subparsers.add_parser("moefy", help="convert a dense model's MLPs into mixture-of-experts layers",
                              description="Dense -> MoE: sparse upcycling (copies + router + short training) or "
                                          "MoEfication (partition each MLP's neurons into experts, fit a router).")
    p.add_argument("model", help="local Hugging Face model folder or built-in name (tiny, small)")
    p.add_argument("--experts", type=int, default=8, help="experts per layer (default 8)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    p.add_argument("--method", choices=["upcycle", "partition"], default="partition")
    p.add_argument("--out", required=True, help="output folder (HF layout, safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--train-steps", type=int, default=100,
                   help="upcycle: continued-training steps on the calibration corpus (default 100; 0 = none)")
    p.add_argument("--lr", type=float, default=5e-4, help="upcycle: peak learning rate (default 5e-4)")
    p.add_argument("--batch-size", type=int, default=8, help="upcycle: training batch size (default 8)")
    p.add_argument("--balance", choices=["aux", "bias", "none"], default="aux",
                   help="upcycle: load balancing during training (default aux)")
    p.add_argument("--router-steps", type=int, default=300, help="partition: router fitting steps (default 300)")
    p.add_argument("--eval-windows", type=int, default=32,
                   help="validation windows for perplexity before/after (default 32; 0 = skip)")
    add_calibration_args(p, samples=64, seq_len=None)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from sparselm.cli.common import calibration_for, print_json
    from sparselm.data import load_corpus
    from sparselm.data.tokens import corpus_token_ids
    from sparselm.errors import SparselmError
    from sparselm.evaluate import model_context, perplexity
    from sparselm.io import load
    from sparselm.moe.io import save_moe

    if args.experts < 1 or not 1 <= args.top_k <= args.experts:
        raise SparselmError(f"--top-k ({args.top_k}) must be between 1 and --experts ({args.experts})")
    model, tok = load(args.model, dtype=torch.float32)
    calib, record = calibration_for(model, tok, args)
    corpus = load_corpus(args.calib)
    seq_len = calib.shape[1]
    val_ids = corpus_token_ids(tok, corpus, "validation") if args.eval_windows else None
    summary = {"method": args.method, "experts": args.experts, "top_k": args.top_k, "calibration": record}
    if val_ids is not None:
        summary["dense_perplexity"] = perplexity(model, val_ids, seq_len, max_windows=args.eval_windows)

    if args.method == "upcycle":
        from sparselm.moe.training import train_lm
        from sparselm.moe.upcycle import upcycle

        fields = {"router_aux_loss_coef": 0.01 if args.balance == "aux" else 0.0,
                  "bias_update_rate": 1e-3 if args.balance == "bias" else 0.0}
        moe = upcycle(model, num_experts=args.experts, top_k=args.top_k, seed=args.seed, **fields)
        if args.train_steps:
            history = train_lm(moe, corpus_token_ids(tok, corpus, "train"), steps=args.train_steps,
                               batch_size=args.batch_size, seq_len=min(seq_len, model_context(model)), lr=args.lr,
                               seed=args.seed, desc="upcycle training")
            summary["final_train_loss"] = sum(history["losses"][-10:]) / min(10, len(history["losses"]))
        summary["train_steps"] = args.train_steps
    else:
        from sparselm.moe.partition import partition

        moe, report = partition(model, calib, num_experts=args.experts, top_k=args.top_k,
                                router_steps=args.router_steps, seed=args.seed)
        summary["router_top_k_recall"] = [round(r["router_top_k_recall"], 4) for r in report]
    summary["active_mlp_fraction"] = args.top_k / args.experts
    if val_ids is not None:
        summary["moe_perplexity"] = perplexity(moe, val_ids, seq_len, max_windows=args.eval_windows)
    protect = (args.model,)
    save_moe(moe, tok, args.out, metadata={"moefy": {**summary, "source_model": str(args.model)}},
             overwrite=args.overwrite, protect=protect)
    summary["out"] = str(args.out)
    print_json(summary)
    return 0
