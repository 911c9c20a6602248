"""Dense -> MoE conversion of a built-in Llama model: perplexity against the fraction of
MLP parameters active per token, and the MLP time per token against dense.

- partition (MoEfication): each MLP split into E experts by balanced co-activation
  clustering, a router fitted on calibration data, top-k of E experts run (unit gates),
  for k/E = 1/8, 2/8, 4/8, 8/8 (8/8 is exact: a sanity row);
- upcycle: E copies + router; perplexity at step 0 (equal to dense by construction) and
  after a short continued training, next to the dense model trained for the same steps
  on the same batches (so the comparison is fair).
MLP time: forward (inference, no grad) of layer 0's MLP on the calibration tokens'
real MLP inputs (4096), dense `LlamaMLP` vs the MoE layer (its no-grad inference path,
routing statistics on, as in use), same process: the median over `--rounds` interleaved
rounds of the MoE / dense time ratio within a round. Perplexity: test split, first
`--windows` windows.

    nice python benchmarks/bench_moe_conversion.py [--model small] [--upcycle-steps 50]
Prints a Markdown table, then one JSON line.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from sparselm.bench.timing import alternating_rounds, median_ratio
from sparselm.data import calibration, load_corpus
from sparselm.data.tokens import corpus_token_ids
from sparselm.evaluate import model_context, perplexity
from sparselm.moe.convert import collect_mlp_inputs
from sparselm.moe.partition import partition
from sparselm.moe.training import train_lm
from sparselm.moe.upcycle import upcycle
from sparselm.zoo import load_builtin


def mlp_seconds(modules: dict, x_ND: torch.Tensor, rounds: int = 30) -> dict[str, list[float]]:
    """Forward seconds of each module on x, no grad: one warm-up call each, then `rounds`
    alternating rounds (`alternating_rounds`)."""
    def timed(module):
        def call() -> float:
            start = time.perf_counter()
            module(x_ND)
            return time.perf_counter() - start
        return call

    with torch.no_grad():
        for m in modules.values():
            m(x_ND)
        return alternating_rounds({name: timed(m) for name, m in modules.items()}, rounds)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small", choices=["tiny", "small"])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-ks", default="1,2,4,8")
    p.add_argument("--samples", type=int, default=64, help="calibration windows")
    p.add_argument("--windows", type=int, default=48, help="test windows for perplexity")
    p.add_argument("--upcycle-steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds per MLP pair")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    dense, tok = load_builtin(args.model)
    seq_len = model_context(dense)
    corpus = load_corpus(None)
    calib = calibration(tok, corpus, n=args.samples, seq_len=seq_len, seed=0)
    test_ids = corpus_token_ids(tok, corpus, "test")
    dense_ppl = perplexity(dense, test_ids, seq_len, max_windows=args.windows)
    x_ND = collect_mlp_inputs(dense, calib, max_tokens=4096, progress=False)[0]
    rows = [{"method": "dense", "k": args.experts, "active": 1.0, "ppl": dense_ppl, "mlp_time": 1.0}]

    for k in [int(v) for v in args.top_ks.split(",")]:
        moe, report = partition(dense, calib, num_experts=args.experts, top_k=k, progress=False)
        ppl = perplexity(moe, test_ids, seq_len, max_windows=args.windows)
        secs = mlp_seconds({"dense": dense.model.layers[0].mlp, "moe": moe.model.layers[0].mlp}, x_ND, args.rounds)
        rows.append({"method": "partition", "k": k, "active": k / args.experts, "ppl": ppl,
                     "mlp_time": median_ratio(secs, "moe", "dense"),
                     "dense_mlp_us_per_token": statistics.median(secs["dense"]) / len(x_ND) * 1e6,
                     "moe_mlp_us_per_token": statistics.median(secs["moe"]) / len(x_ND) * 1e6,
                     "router_recall": sum(r["router_top_k_recall"] for r in report) / len(report)})

    moe = upcycle(dense, num_experts=args.experts, top_k=2)
    rows.append({"method": "upcycle (step 0)", "k": 2, "active": 2.0,  # each expert is a full MLP copy
                 "ppl": perplexity(moe, test_ids, seq_len, max_windows=args.windows),
                 "mlp_time": median_ratio(mlp_seconds({"dense": dense.model.layers[0].mlp,
                                                       "moe": moe.model.layers[0].mlp}, x_ND, args.rounds),
                                          "moe", "dense")})
    if args.upcycle_steps:
        train_ids = corpus_token_ids(tok, corpus, "train")
        run = dict(steps=args.upcycle_steps, batch_size=8, seq_len=seq_len, lr=5e-4, seed=1, progress=False)
        train_lm(moe, train_ids, **run)
        rows.append({"method": f"upcycle (+{args.upcycle_steps} steps)", "k": 2, "active": 2.0,
                     "ppl": perplexity(moe, test_ids, seq_len, max_windows=args.windows), "mlp_time": None})
        dense_cont = copy.deepcopy(dense)
        train_lm(dense_cont, train_ids, **run)
        rows.append({"method": f"dense (+{args.upcycle_steps} steps)", "k": args.experts, "active": 1.0,
                     "ppl": perplexity(dense_cont, test_ids, seq_len, max_windows=args.windows), "mlp_time": 1.0})

    print(f"Dense -> MoE on built-in {args.model!r} (hidden {dense.config.hidden_size}, MLP "
          f"{dense.config.intermediate_size}, {dense.config.num_hidden_layers} layers), E={args.experts}, "
          f"{args.samples}x{seq_len} calibration tokens, test ppl over {args.windows} windows, "
          f"{torch.get_num_threads()} threads\n")
    print("| method | experts run | MLP params active / token | test ppl | ppl / dense | MLP time / dense |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        t = "-" if r["mlp_time"] is None else f"{r['mlp_time']:.2f}"
        print(f"| {r['method']} | {r['k']}/{args.experts} | {r['active']:.3f} | {r['ppl']:.2f} | "
              f"{r['ppl'] / dense_ppl:.3f} | {t} |")
    summary = {"benchmark": "moe_conversion", "model": args.model, "experts": args.experts, "dense_ppl": dense_ppl,
               "rows": rows}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
