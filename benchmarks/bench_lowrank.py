"""Low-rank factorization on the built-in "small" model: SVD vs ASVD vs whitened SVD.

Run: python benchmarks/bench_lowrank.py [--keep 0.8] [--quick]
All methods keep the same fraction of the decoder-block linear parameters (uniform rank
allocation; whitened SVD also with sensitivity-based allocation) and are compared with the
dense model in the same run: test-split perplexity, its increase over dense, and decode
tokens/s (greedy, KV cache, batch 1). Target: whitened SVD's perplexity increase at 80% kept is
at most 70% of plain SVD's. Prints Markdown, then one JSON line last.
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from sparselm.bench.generation import measure_generation
from sparselm.data import calibration, corpus_token_ids, load_corpus
from sparselm.evaluate import perplexity
from sparselm.lowrank import lowrank
from sparselm.zoo import load_builtin


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keep", type=float, default=0.8, help="fraction of block linear parameters kept")
    parser.add_argument("--windows", type=int, default=24, help="test windows for perplexity (default 24)")
    parser.add_argument("--quick", action="store_true", help="tiny model (a smoke run)")
    args = parser.parse_args()
    torch.manual_seed(0)
    name = "tiny" if args.quick else "small"
    model, tok = load_builtin(name, progress=False)
    seq_len = min(256, model.config.max_position_embeddings)
    calib = calibration(tok, None, n=32, seq_len=seq_len, seed=0)
    test_ids = corpus_token_ids(tok, load_corpus(None), "test")
    started = time.time()

    def measure(m) -> dict:
        gen = measure_generation(m, prompt_len=32, new_tokens=64, repeats=5)
        return {"ppl": perplexity(m, test_ids, seq_len, max_windows=args.windows),
                "decode_tok_s": gen.decode_tokens_per_s, "params": sum(p.numel() for p in m.parameters())}

    rows = {"dense": measure(model)}
    for method, allocation in (("svd", "uniform"), ("asvd", "uniform"), ("whiten", "uniform"),
                               ("whiten", "sensitivity")):
        m = copy.deepcopy(model)
        t0 = time.time()
        report = lowrank(m, calib, keep=args.keep, method=method, allocation=allocation, sensitivity_rows=4,
                         progress=False)
        seconds = time.time() - t0
        rows[f"{method}/{allocation}"] = {**measure(m), "kept": report.kept_fraction, "seconds": seconds}
    dense_ppl = rows["dense"]["ppl"]
    for r in rows.values():
        r["ppl_increase"] = r["ppl"] - dense_ppl
    svd_inc = rows["svd/uniform"]["ppl_increase"]
    whiten_inc = rows["whiten/uniform"]["ppl_increase"]
    ratio = whiten_inc / svd_inc if svd_inc > 0 else float("nan")

    print(f"## Low rank at {args.keep:.0%} of block linear parameters, built-in {name!r} model "
          f"(test perplexity, {args.windows} windows of {seq_len})\n")
    print("| method / allocation | params | kept (block linears) | ppl | ppl increase | decode tok/s | time to factorize |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for key, r in rows.items():
        kept = f"{r['kept']:.3f}" if "kept" in r else "1.000"
        secs = f"{r['seconds']:.1f} s" if "seconds" in r else "-"
        print(f"| {key} | {r['params']:,} | {kept} | {r['ppl']:.2f} | {r['ppl_increase']:+.2f} | "
              f"{r['decode_tok_s']:.1f} ({r['decode_tok_s'] / rows['dense']['decode_tok_s']:.2f}x) | {secs} |")
    print(f"\nwhitened SVD's increase is {ratio:.2f}x plain SVD's (target <= 0.70); total {time.time() - started:.0f} s\n")
    print(json.dumps({"bench": "lowrank", "model": name, "keep": args.keep, "rows": rows,
                      "whiten_vs_svd_increase": ratio}))


if __name__ == "__main__":
    main()
