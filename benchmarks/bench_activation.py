"""Activation sparsity: held-out perplexity vs TEAL activation sparsity (uniform and greedy
allocation) on a built-in model, ReLU-fication before/after a short fine-tune, and the
decode speed of ActivationSparseLinear (thresholding included) vs dense nn.Linear at batch 1
on LLM-shaped layers. Prints Markdown tables, then one JSON line.

    python benchmarks/bench_activation.py [--model tiny] [--relufy-steps 60] [--repeats 15]
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # shared cores: see ALGORITHMS.md

import argparse
import copy
import json
import time

import torch
from torch import nn

from sparselm.activation.install import install_thresholds
from sparselm.activation.measure import measure_activations
from sparselm.activation.relufy import relufy_and_finetune
from sparselm.activation.sparse_linear import ActivationSparseLinear
from sparselm.activation.thresholds import calibrate_thresholds, collect_projection_inputs
from sparselm.data import calibration, load_corpus
from sparselm.data.tokens import corpus_token_ids
from sparselm.evaluate import model_context, perplexity
from sparselm.io import load

TARGETS = (0.25, 0.4, 0.5, 0.6, 0.7)


def quality(model, tokenizer, corpus, eval_windows: int, samples: int) -> list[dict]:
    seq_len = min(128, model_context(model))
    calib = calibration(tokenizer, corpus, n=samples, seq_len=seq_len, seed=0)
    test_ids = corpus_token_ids(tokenizer, corpus, "test")
    dense = perplexity(model, test_ids, seq_len, max_windows=eval_windows)
    inputs = collect_projection_inputs(model, calib)
    rows = [{"allocation": "dense", "target": 0.0, "measured": 0.0, "perplexity": dense, "vs_dense": 1.0}]
    for allocation in ("uniform", "greedy"):
        for target in TARGETS:
            th = calibrate_thresholds(model, calib, target, allocation, inputs=inputs)
            handle = install_thresholds(model, th)
            try:
                ppl = perplexity(model, test_ids, seq_len, max_windows=eval_windows)
            finally:
                handle.remove()
            measured = measure_activations(model, calib, th, decode_tokens=0).overall("prefill")
            rows.append({"allocation": allocation, "target": target, "measured": measured, "perplexity": ppl,
                         "vs_dense": ppl / dense})
    return rows


def _down_fraction(report) -> float:
    """Mean fraction of exact zeros at the MLP down-projection inputs (what ReLU zeroes)."""
    downs = [n for n in report.stats["prefill"] if n.endswith(".down")]
    return sum(report.fraction("prefill", n) for n in downs) / len(downs)


def relufication(model, tokenizer, corpus, steps: int, eval_windows: int, lr: float) -> dict:
    seq_len = min(128, model_context(model))
    calib = calibration(tokenizer, corpus, n=8, seq_len=seq_len, seed=0)
    test_ids = corpus_token_ids(tokenizer, corpus, "test")
    before = measure_activations(model, calib, 0.0, decode_tokens=0)
    before_zero, before_down = before.overall("prefill"), _down_fraction(before)
    before_ppl = perplexity(model, test_ids, seq_len, max_windows=eval_windows)
    model = copy.deepcopy(model)
    train_ids = corpus_token_ids(tokenizer, corpus, "train")
    val_ids = corpus_token_ids(tokenizer, corpus, "validation")
    relufy_and_finetune(model, train_ids, val_ids, steps=0)
    swapped_ppl = perplexity(model, test_ids, seq_len, max_windows=eval_windows)
    relufy_and_finetune(model, train_ids, val_ids, steps=steps, seq_len=seq_len, lr=lr)
    after = measure_activations(model, calib, 0.0, decode_tokens=0)
    return {"steps": steps, "lr": lr, "exact_zeros_before": before_zero, "perplexity_before": before_ppl,
            "perplexity_relu_no_finetune": swapped_ppl, "down_zeros_before": before_down,
            "down_zeros_after": _down_fraction(after), "exact_zeros_after": after.overall("prefill"),
            "perplexity_after": perplexity(model, test_ids, seq_len, max_windows=eval_windows)}


def best_ms(fn, xs, repeats: int) -> float:
    fn(xs[0])
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(xs[i % len(xs)])
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


@torch.no_grad()
def decode_speed(repeats: int) -> list[dict]:
    """ActivationSparseLinear vs nn.Linear, batch 1, fp32; inputs Gaussian, thresholds at the
    quantile for the target sparsity. Several weight copies are rotated so the weights come
    from memory, not cache (each copy >= 64 MiB)."""
    rows = []
    for out_f, in_f in ((4096, 4096), (11008, 4096)):
        copies = 3 if out_f * in_f * 4 < 128 * 2**20 else 2
        lins = [nn.Linear(in_f, out_f, bias=False) for _ in range(copies)]
        x = torch.randn(1, in_f)
        dense_ms = best_ms(lambda i: lins[i](x), list(range(copies)), repeats)
        for s in (0.5, 0.7):
            t = float(torch.quantile(x.abs().flatten(), s))
            sparse = [ActivationSparseLinear.from_linear(lin, t) for lin in lins]
            torch.testing.assert_close(sparse[0](x), lins[0](x * (x.abs() > t)), atol=1e-3, rtol=1e-4)
            ms = best_ms(lambda i: sparse[i](x), list(range(copies)), repeats)
            rows.append({"shape": f"{out_f}x{in_f}", "sparsity": s, "dense_ms": dense_ms, "sparse_ms": ms,
                         "speedup": dense_ms / ms})
            del sparse
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--relufy-steps", type=int, default=60)
    ap.add_argument("--relufy-lr", type=float, default=3e-4)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    t_all = time.time()
    corpus = load_corpus(None)
    model, tokenizer = load(args.model)
    rows = quality(model, tokenizer, corpus, args.eval_windows, args.samples)
    print(f"\n## TEAL activation sparsity on built-in `{args.model}` (test split, {args.eval_windows} windows)\n")
    print("| allocation | target | measured (calibration) | test perplexity | vs dense |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['allocation']} | {r['target']:.2f} | {r['measured']:.3f} | {r['perplexity']:.2f} | "
              f"{r['vs_dense']:.3f}x |")
    relu = relufication(model, tokenizer, corpus, args.relufy_steps, args.eval_windows, args.relufy_lr)
    print(f"\n## ReLU-fication ({args.relufy_steps} fine-tune steps)\n")
    print("| | exact zeros, all projection inputs (weighted) | exact zeros, down-proj inputs | test perplexity |")
    print("| --- | --- | --- | --- |")
    print(f"| original | {relu['exact_zeros_before']:.3f} | {relu['down_zeros_before']:.3f} | {relu['perplexity_before']:.2f} |")
    print(f"| ReLU, no fine-tune | - | - | {relu['perplexity_relu_no_finetune']:.2f} |")
    print(f"| ReLU + fine-tune | {relu['exact_zeros_after']:.3f} | {relu['down_zeros_after']:.3f} | "
          f"{relu['perplexity_after']:.2f} |")
    try:
        from sparselm.kernels import extension_status
        kernel = str(extension_status())
    except ImportError:
        kernel = "pure-PyTorch gather"
    speed = decode_speed(args.repeats)
    print(f"\n## Decode, batch 1, fp32: ActivationSparseLinear ({kernel}) vs nn.Linear, "
          f"{torch.get_num_threads()} threads\n")
    print("| shape (out x in) | activation sparsity | dense ms | sparse ms | speedup |\n| --- | --- | --- | --- | --- |")
    for r in speed:
        print(f"| {r['shape']} | {r['sparsity']:.0%} | {r['dense_ms']:.3f} | {r['sparse_ms']:.3f} | {r['speedup']:.2f}x |")
    print(f"\ntotal {time.time() - t_all:.0f} s\n")
    print(json.dumps({"benchmark": "activation", "model": args.model, "teal": rows, "relufication": relu,
                      "decode": speed, "kernel": kernel}))


if __name__ == "__main__":
    main()
