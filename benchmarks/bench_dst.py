"""Dynamic sparse training on the default corpus: dense vs static, SET, RigL and GMP at 80%
and 90% sparsity, same steps, same tokens, same seed. Prints a Markdown table of held-out
perplexity (and its ratio to dense), writes all loss curves into one plot, then one JSON line.

Expected from the literature (Evci et al. 2020): RigL <= SET <= static at equal sparsity.
This is a small-model CPU run (a few hundred steps); it reports what it measures.

    python benchmarks/bench_dst.py [--steps 400] [--out bench_dst_out]
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # shared cores: see ALGORITHMS.md

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sparselm.data import load_corpus
from sparselm.data.tokens import corpus_token_ids
from sparselm.evaluate import perplexity
from sparselm.training.config import SparseTrainingConfig
from sparselm.training.loss_curves import plot_loss_curves
from sparselm.training.sparse_training_loop import train_sparse
from sparselm.zoo import load_builtin


def fresh_model(vocab_size: int, seq_len: int, hidden: int, layers: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)  # every run starts from the same initial weights
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq_len, tie_word_embeddings=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--sparsities", default="0.8,0.9")
    ap.add_argument("--methods", default="static,set,rigl,gmp")
    ap.add_argument("--distribution", default="uniform", choices=("uniform", "erk"))
    ap.add_argument("--eval-windows", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: this model is too small to gain from more)")
    ap.add_argument("--out", default="bench_dst_out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    corpus = load_corpus(None)
    _, tokenizer = load_builtin("tiny", corpus)  # the built-in byte-level BPE tokenizer
    train_ids = corpus_token_ids(tokenizer, corpus, "train")
    val_ids = corpus_token_ids(tokenizer, corpus, "validation")
    test_ids = corpus_token_ids(tokenizer, corpus, "test")
    interval = max(1, args.steps // 20)

    runs = [("dense", 0.0)] + [(m, float(s)) for s in args.sparsities.split(",") for m in args.methods.split(",")]
    rows, curves = [], {}
    t_all = time.time()
    for method, sparsity in runs:
        model = fresh_model(len(tokenizer), args.seq_len, args.hidden, args.layers, seed=0)
        config = None if method == "dense" else SparseTrainingConfig(
            sparsity=sparsity, method=method, distribution=args.distribution, total_steps=args.steps,
            update_interval=interval, gmp_frequency=max(1, args.steps // 50), seed=0)
        t0 = time.time()
        result = train_sparse(model, train_ids, val_ids, config, steps=args.steps, batch_size=args.batch_size,
                              seq_len=args.seq_len, lr=args.lr, seed=0, eval_every=max(1, args.steps // 5),
                              desc=f"{method} {sparsity:.0%}")
        ppl = perplexity(model, test_ids, args.seq_len, max_windows=args.eval_windows)
        label = "dense" if method == "dense" else f"{method} {sparsity:.0%}"
        curves[label] = {"losses": result.losses, "eval_log": result.eval_log}
        rows.append({"method": method, "sparsity": sparsity,
                     "measured_sparsity": result.report["sparsity"] if result.report else 0.0,
                     "test_perplexity": ppl, "final_held_out_loss": result.eval_log[-1][1],
                     "seconds": time.time() - t0})
    dense_ppl = rows[0]["test_perplexity"]
    for r in rows:
        r["ppl_vs_dense"] = r["test_perplexity"] / dense_ppl
    plot_loss_curves(curves, out / "dst_curves.png", title=f"sparse training, {args.steps} steps, {args.distribution}")

    print(f"\n## Sparse training: {args.steps} steps x {args.batch_size} x {args.seq_len} tokens, "
          f"Llama hidden {args.hidden} x {args.layers} layers, {args.distribution} densities, default corpus\n")
    print("| method | target sparsity | measured sparsity (sparsified layers) | test perplexity | vs dense |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['method']} | {r['sparsity']:.0%} | {r['measured_sparsity']:.3f} | {r['test_perplexity']:.2f} | "
              f"{r['ppl_vs_dense']:.3f}x |")
    print(f"\nloss curves: {out / 'dst_curves.png'}; total {time.time() - t_all:.0f} s\n")
    by = {(r["method"], r["sparsity"]): r["test_perplexity"] for r in rows}
    checks = {f"rigl_beats_static_{s}": by.get(("rigl", float(s)), 0) < by.get(("static", float(s)), 0)
              for s in args.sparsities.split(",")}
    print(json.dumps({"benchmark": "dst", "steps": args.steps, "distribution": args.distribution,
                      "rows": rows, **checks}))


if __name__ == "__main__":
    main()
