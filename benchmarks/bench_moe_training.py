"""MoE vs dense LM trained from scratch at equal active parameters, steps and tokens.

All models: Llama architecture, same attention/embeddings, trained on the default corpus
(Python standard library) with the built-in tiny model's tokenizer, same seed, so every
model sees the same batches. The MoE models have E SwiGLU experts of hidden F, top-k
routing; the dense model has one SwiGLU MLP of hidden k*F, i.e. the same MLP parameters
active per token (the MoE adds only its router).
  dense       one MLP of hidden k*F
  moe_aux     Switch balance loss (coef 5e-2) + z-loss
  moe_bias    aux-loss-free bias balancing (rate 5e-3) + z-loss
  moe_none    no balancing (z-loss only): the contrast
Reported: held-out perplexity (windows spread evenly over the whole validation split), total /
active parameters, load CV and MaxVio after training (mean over layers) on those windows and over the last 50
training steps, wall time. The MoE gates are scaled by k (see MoEConfig.gate_scale). One PNG
holds the loss curves and the final perplexities.

    nice python benchmarks/bench_moe_training.py [--steps 300] [--threads 1] [--plot reports/moe_training.png]
Prints a Markdown table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from sparselm.data import load_corpus
from sparselm.data.tokens import corpus_token_ids
from sparselm.evaluate import perplexity
from sparselm.moe.layer import model_routing_metrics, reset_routing_stats
from sparselm.moe.training import build_dense_lm, build_moe_lm, load_tokenizer, train_lm


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-hidden", type=int, default=128)
    p.add_argument("--shared-experts", type=int, default=0, help="always-active experts (DeepSeekMoE)")
    p.add_argument("--aux-coef", type=float, default=0.05, help="Switch balance loss weight (moe_aux)")
    p.add_argument("--bias-rate", type=float, default=5e-3, help="aux-loss-free bias step (moe_bias)")
    p.add_argument("--gate-scale", type=float, default=None, help="routed gate scale (default: top-k)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-windows", type=int, default=256,
                   help="held-out windows, spread evenly over the whole validation split (default 256)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--runs", default="dense,moe_aux,moe_bias,moe_none")
    p.add_argument("--plot", default="reports/moe_training.png", help="PNG path for the loss curves")
    args = p.parse_args(argv)
    if args.eval_windows < 1:
        p.error(f"--eval-windows must be >= 1, got {args.eval_windows}")
    return args


def spread_windows(ids: torch.Tensor, seq_len: int, count: int) -> torch.Tensor:
    """`count` windows of `seq_len` tokens at evenly spaced offsets over the whole stream,
    concatenated (perplexity's non-overlapping windows of the result are exactly these).
    The validation split is whole source files one after another: its first windows are one
    or two files, and the routers' load on them says more about those files than about
    held-out text."""
    n = ids.numel() // seq_len
    picks = torch.linspace(0, n - 1, min(count, n)).round().long().unique()
    return ids[: n * seq_len].view(n, seq_len)[picks].reshape(-1)


def smooth(values: list[float], width: int = 20) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= width:
            acc -= values[i - width]
        out.append(acc / min(i + 1, width))
    return out


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    for name, r in results.items():
        ax_loss.plot(smooth(r["losses"]), label=f"{name} (val ppl {r['val_ppl']:.2f})")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("train loss (LM, 20-step mean)")
    ax_loss.legend()
    ax_loss.set_title("MoE vs dense at equal active parameters")
    names = list(results)
    ax_ppl.bar(names, [results[n]["val_ppl"] for n in names], color=["gray"] + ["C1"] * (len(names) - 1))
    ax_ppl.set_ylabel("held-out perplexity")
    ax_ppl.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"  # written beside the target, then moved into place whole
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    corpus = load_corpus(None)
    tok = load_tokenizer("tiny", corpus)
    train_ids = corpus_token_ids(tok, corpus, "train")
    val_ids = spread_windows(corpus_token_ids(tok, corpus, "validation"), args.context, args.eval_windows)
    arch = dict(hidden=args.hidden, layers=args.layers, heads=4, kv_heads=2, context=args.context, tokenizer=tok)
    results = {}
    for name in args.runs.split(","):
        if name == "dense":
            active_experts = args.top_k + args.shared_experts
            model = build_dense_lm(len(tok), intermediate=active_experts * args.expert_hidden, **arch)
        else:
            model = build_moe_lm(len(tok), experts=args.experts, top_k=args.top_k, expert_hidden=args.expert_hidden,
                                 balance=name.split("_", 1)[1], shared_experts=args.shared_experts,
                                 aux_coef=args.aux_coef, bias_rate=args.bias_rate, gate_scale=args.gate_scale,
                                 **arch)
        def reset_near_end(step, loss, model=model):  # train-time balance: the last 50 steps only
            if step == args.steps - 51:
                reset_routing_stats(model)

        t0 = time.time()
        history = train_lm(model, train_ids, steps=args.steps, batch_size=args.batch_size, seq_len=args.context,
                           lr=args.lr, seed=0, desc=name, callback=reset_near_end)
        seconds = time.time() - t0
        train_routing = model_routing_metrics(model)
        reset_routing_stats(model)
        val_ppl = perplexity(model, val_ids, args.context, max_windows=args.eval_windows)
        routing = model_routing_metrics(model)
        total = sum(p.numel() for p in model.parameters())
        experts_total = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
        active = total - experts_total + experts_total * args.top_k // args.experts
        results[name] = {
            "val_ppl": val_ppl, "final_loss": sum(history["losses"][-20:]) / len(history["losses"][-20:]),
            "seconds": seconds,
            "total_params": total, "active_params": active, "losses": history["losses"],
            "load_cv": (sum(m["load_cv"] for m in routing.values()) / len(routing)) if routing else None,
            "max_violation": (sum(m["max_violation"] for m in routing.values()) / len(routing)) if routing else None,
            "train_load_cv": (sum(m["load_cv"] for m in train_routing.values()) / len(train_routing))
            if train_routing else None,
            "layers": routing,
        }
    plot(results, args.plot)

    print(f"MoE vs dense, {args.steps} steps x {args.batch_size} x {args.context} tokens, hidden {args.hidden}, "
          f"{args.layers} layers, E={args.experts} top-{args.top_k} F={args.expert_hidden} "
          f"+ {args.shared_experts} shared (dense F={(args.top_k + args.shared_experts) * args.expert_hidden}), "
          f"aux coef {args.aux_coef}, bias rate {args.bias_rate}, {torch.get_num_threads()} threads\n")
    print("| model | total params | active params | val ppl | ppl / dense | final loss | load CV (held-out) "
          "| MaxVio (held-out) | load CV (last 50 train steps) | s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    dense_ppl = results.get("dense", {}).get("val_ppl")
    for name, r in results.items():
        cv = "-" if r["load_cv"] is None else f"{r['load_cv']:.3f}"
        mv = "-" if r["max_violation"] is None else f"{r['max_violation']:.3f}"
        tcv = "-" if r["train_load_cv"] is None else f"{r['train_load_cv']:.3f}"
        ratio = f"{r['val_ppl'] / dense_ppl:.3f}" if dense_ppl else "-"
        print(f"| {name} | {r['total_params']:,} | {r['active_params']:,} | {r['val_ppl']:.2f} | {ratio} | "
              f"{r['final_loss']:.3f} | {cv} | {mv} | {tcv} | {r['seconds']:.0f} |")
    print(f"\nplot: {args.plot}")
    summary = {"benchmark": "moe_training", "steps": args.steps, "batch_size": args.batch_size,
               "context": args.context, "experts": args.experts, "top_k": args.top_k, "plot": args.plot,
               "results": {n: {k: v for k, v in r.items() if k not in ("losses", "layers")} for n, r in results.items()}}
    if dense_ppl:
        summary["ppl_ratio_vs_dense"] = {n: r["val_ppl"] / dense_ppl for n, r in results.items() if n != "dense"}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
