"""`sparselm train`: sparse training (static, GMP, SET, RigL) of a causal LM on a corpus.

`sparselm train --moe ...` hands every argument after `--moe` to the MoE trainer.
Runs under `torchrun --nproc_per_node=N -m sparselm train ...` as DDP (gloo on CPU).
"""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="sparse training from scratch or fine-tuning: static, gmp, set, rigl (uniform or ERK)",
        description="Train a causal LM with sparse weights. With --moe, the arguments after it go to "
                    "the MoE trainer instead.")
    p.add_argument("--moe", nargs=argparse.REMAINDER, default=None,
                   help="train a mixture-of-experts model instead (all following arguments are the MoE trainer's)")
    p.add_argument("--model", default="tiny",
                   help="built-in architecture (tiny, small) or a local HF causal-LM folder (default tiny)")
    p.add_argument("--init", choices=("scratch", "pretrained"), default=None,
                   help="start from random weights or from the model's weights "
                        "(default: scratch for built-in names, pretrained for folders)")
    p.add_argument("--corpus", default=None, help="text file or folder (default: the built-in corpus)")
    p.add_argument("--sparsity", type=float, default=0.9, help="final fraction of zeros (default 0.9)")
    p.add_argument("--method", choices=("dense", "static", "gmp", "set", "rigl"), default="rigl")
    p.add_argument("--distribution", choices=("uniform", "erk"), default="uniform")
    p.add_argument("--nm", default=None, metavar="N:M", help="keep an N:M pattern during training (e.g. 2:4)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16, help="global batch (split over DDP ranks)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per window (default: min(128, context))")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--update-interval", type=int, default=None,
                   help="SET/RigL mask update interval in steps (default: steps // 20, at least 1)")
    p.add_argument("--drop-fraction", type=float, default=0.3)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=False, default=None, help="output folder (log, plot, checkpoint, model)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.moe is not None:
        from sparselm.moe.training import main as moe_main
        return int(moe_main(list(args.moe)) or 0)

    import json
    from pathlib import Path

    import torch

    from sparselm.data import load_corpus
    from sparselm.data.tokens import corpus_token_ids
    from sparselm.errors import SparselmError
    from sparselm.evaluate import model_context, perplexity
    from sparselm.io import load, save
    from sparselm.training import distributed
    from sparselm.training.config import SparseTrainingConfig
    from sparselm.training.loss_curves import plot_loss_curves
    from sparselm.training.sparse_training_loop import train_sparse
    from sparselm.zoo import BUILTIN_SPECS

    if args.out is None:
        raise SparselmError("sparselm train needs --out DIR (where the log, plot, checkpoint and model go)")
    if args.steps < 1:
        raise SparselmError(f"--steps must be >= 1, got {args.steps}")
    config = None  # validated before anything is loaded, so bad input fails fast
    if args.method != "dense":
        interval = args.update_interval if args.update_interval is not None else max(1, args.steps // 20)
        config = SparseTrainingConfig(sparsity=args.sparsity, method=args.method, distribution=args.distribution,
                                      total_steps=args.steps, update_interval=interval,
                                      drop_fraction=args.drop_fraction, nm=args.nm, seed=args.seed,
                                      gmp_frequency=max(1, args.steps // 50))
    distributed.init_from_environment()
    corpus = load_corpus(args.corpus)
    model, tokenizer = load(args.model)
    init = args.init or ("scratch" if args.model in BUILTIN_SPECS else "pretrained")
    if init == "scratch":
        torch.manual_seed(args.seed)
        model = type(model)(model.config)  # same architecture, fresh random weights
    seq_len = args.seq_len or min(128, model_context(model))
    train_ids = corpus_token_ids(tokenizer, corpus, "train")
    val_ids = corpus_token_ids(tokenizer, corpus, "validation")
    out = Path(args.out)
    result = train_sparse(model, train_ids, val_ids, config, steps=args.steps, batch_size=args.batch_size,
                          seq_len=seq_len, lr=args.lr, seed=args.seed, eval_every=args.eval_every,
                          out_dir=out, checkpoint_every=args.checkpoint_every, resume=not args.no_resume,
                          desc=f"train {args.method}")
    if not distributed.is_main_process():
        return 0
    label = args.method if config is None else f"{args.method} {args.sparsity:.0%} {args.distribution}"
    plot_loss_curves({label: {"losses": result.losses, "eval_log": result.eval_log}}, out / "loss_curve.png",
                     title=f"sparselm train: {label}")
    ppl = perplexity(model, val_ids, seq_len, max_windows=64)
    summary = {"method": args.method, "sparsity": result.report["sparsity"] if result.report else 0.0,
               "distribution": args.distribution, "steps": args.steps, "held_out_perplexity": ppl,
               "final_held_out_loss": result.eval_log[-1][1], "model": str(out / "model")}
    save(model, tokenizer, out / "model", overwrite=True,
         metadata={"sparse_training": {**summary, "layers": (result.report or {}).get("layers", {})}})
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"held-out perplexity {ppl:.2f} at measured sparsity {summary['sparsity']:.3f}; "
          f"plot {out / 'loss_curve.png'}")
    print(json.dumps(summary))
    return 0
