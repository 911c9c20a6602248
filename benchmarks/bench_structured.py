"""Structured pruning on the built-in "small" model: neurons, layers, healing, Torch-Pruning.

Run: python benchmarks/bench_structured.py [--heal STEPS] [--quick]
Prints Markdown tables, then one JSON line last. Everything is compared in the same run:
- 50% of MLP neurons removed (activation-weighted scores): time of the MLPs of all blocks
  (median of 25 interleaved rounds, 2048 tokens), decode tokens/s (greedy, KV cache; batch 1 and
  16 through the transformers forward, batch 1 also through sparselm's lean decode loop; dense and
  pruned alternating over 15 rounds, ratio = median of the per-round ratios), perplexity on the
  test split before and after a distillation heal;
- two decoder layers removed: by block influence re-measured after each removal (sparselm's
  default) and measured once (ShortGPT), vs at random (mean of 5 seeds) vs the last two;
- width pruning at the same 50% of MLP neurons with Torch-Pruning (`torch-pruning` package,
  its group L2-magnitude importance; `pip install -e ".[peers]"`), if it is installed and runs on the model.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time

import torch

from sparselm.bench.generation import measure_generation
from sparselm.bench.timing import alternating_rounds, median_ratio, ratio_interval
from sparselm.data import calibration, corpus_token_ids, load_corpus
from sparselm.evaluate import perplexity
from sparselm.structured import heal, shrink
from sparselm.structured.layers import remove_layers, select_layers_to_remove
from sparselm.zoo import load_builtin


def mlp_times(models: dict, tokens: int = 2048, rounds: int = 25) -> dict[str, float]:
    """Median seconds of running every block's MLP on [1, tokens, hidden] (no attention), per
    model, in interleaved rounds (one call of each model per round) so that load changes on a
    shared machine hit every model alike."""
    hidden = next(iter(models.values())).config.hidden_size
    x = torch.randn(1, tokens, hidden, generator=torch.Generator().manual_seed(0))
    mlps = {name: [layer.mlp for layer in m.model.layers] for name, m in models.items()}
    samples = {name: [] for name in models}
    with torch.inference_mode():
        for r in range(rounds + 3):
            for name, blocks in mlps.items():
                start = time.perf_counter()
                for mlp in blocks:
                    mlp(x)
                if r >= 3:  # three warm-up rounds
                    samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in samples.items()}


def decode_ratio(base, variant, batch: int = 1, runtime: str = "transformers", rounds: int = 15):
    """Decode tokens/s of base and variant measured in alternating rounds: (base tok/s, variant
    tok/s, median of the per-round ratios variant / base, its 95% interval (low, high, coverage)).
    Measured minutes apart instead, the machine's drift decides the ratio."""
    def speed(model):
        return lambda: measure_generation(model, prompt_len=32, new_tokens=64, batch_size=batch, repeats=2,
                                          runtime=runtime).decode_tokens_per_s

    speeds = alternating_rounds({"base": speed(base), "variant": speed(variant)}, rounds)
    return (statistics.median(speeds["base"]), statistics.median(speeds["variant"]),
            median_ratio(speeds, "variant", "base"), ratio_interval(speeds, "variant", "base"))


def torch_pruning_width(model, ratio: float, example: torch.Tensor):
    """Remove `ratio` of MLP neurons with Torch-Pruning's own importance; returns the model or an error."""
    import torch_pruning as tp

    model = copy.deepcopy(model)
    mlp_layers = {id(m) for layer in model.model.layers for m in (layer.mlp.gate_proj, layer.mlp.up_proj,
                                                                    layer.mlp.down_proj)}
    ignored = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and id(m) not in mlp_layers]
    ratios = {layer.mlp.gate_proj: ratio for layer in model.model.layers}
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=0.0, pruning_ratio_dict=ratios, ignored_layers=ignored,
                                  root_module_types=[torch.nn.Linear], output_transform=lambda out: out.logits)
    pruner.step()
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    model.config.intermediate_size = widths[0]
    for layer in model.model.layers:
        layer.mlp.intermediate_size = layer.mlp.gate_proj.out_features
    return model, widths


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--heal", type=int, default=40, help="distillation steps (default 40)")
    parser.add_argument("--windows", type=int, default=24, help="test windows for perplexity (default 24)")
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps (a smoke run)")
    parser.add_argument("--decode-rounds", type=int, default=15,
                        help="alternating dense/pruned rounds per decode ratio (default 15; more rounds "
                             "narrow the ratio's confidence interval)")
    args = parser.parse_args()
    if args.decode_rounds < 1:
        parser.error(f"--decode-rounds must be >= 1, got {args.decode_rounds}")
    torch.manual_seed(0)
    name = "tiny" if args.quick else "small"
    model, tok = load_builtin(name, progress=False)
    seq_len = min(256, model.config.max_position_embeddings)
    calib = calibration(tok, None, n=32, seq_len=seq_len, seed=0)
    test_ids = corpus_token_ids(tok, load_corpus(None), "test")

    def ppl(m):
        return perplexity(m, test_ids, seq_len, max_windows=args.windows)

    started = time.time()
    dense = {"ppl": ppl(model), "params": sum(p.numel() for p in model.parameters())}

    # --- 50% of MLP neurons -----------------------------------------------------------
    pruned = copy.deepcopy(model)
    report = shrink(pruned, calib, neurons=0.5, score="activation", progress=False)
    neurons = {"ppl": ppl(pruned), "params": report.params_after}
    ratios, intervals = {}, {}
    for key, batch, runtime in (("decode_b1", 1, "transformers"), ("decode_b16", 16, "transformers"),
                                ("decode_b1_lean", 1, "lean")):
        dense[key], neurons[key], ratios[key], intervals[key] = decode_ratio(model, pruned, batch, runtime,
                                                                            args.decode_rounds)
    lean_ratio = ratios["decode_b1_lean"]
    lean_low, lean_high, lean_cover = intervals["decode_b1_lean"]
    taylor = copy.deepcopy(model)
    shrink(taylor, calib, neurons=0.5, score="taylor", progress=False)
    neurons["ppl_taylor"] = ppl(taylor)

    losses = heal(pruned, model, calib, args.heal, lr=3e-4, batch_size=8, progress=False)
    neurons["ppl_healed"] = ppl(pruned)
    neurons["heal_loss_first_last"] = (losses[0], losses[-1]) if losses else None

    # --- two layers -------------------------------------------------------------------
    n_layers = len(model.model.layers)
    count = min(2, n_layers - 1)  # the tiny model (--quick) has two layers only
    by_iterative, influence = select_layers_to_remove(model, model.model.layers, calib, count, "iterative",
                                                      progress=False)

    def without(drop):
        m = copy.deepcopy(model)
        remove_layers(m, m.model.layers, sorted(drop))
        return ppl(m)

    by_bi = sorted(int(i) for i in torch.argsort(influence)[:count])
    rng = random.Random(0)
    random_sets = [sorted(rng.sample(range(n_layers), count)) for _ in range(5)]
    layers = {"influence": [round(v, 4) for v in influence.tolist()], "bi_drop": by_bi, "ppl_bi": without(by_bi),
              "iterative_drop": by_iterative, "ppl_iterative": without(by_iterative),
              "random_drops": random_sets, "ppl_random": [without(d) for d in random_sets],
              "ppl_last2": without(list(range(n_layers - count, n_layers)))}
    layers["ppl_random_mean"] = statistics.mean(layers["ppl_random"])

    # --- Torch-Pruning at the same ratio ------------------------------------------------
    try:
        tp_model, widths = torch_pruning_width(model, 0.5, calib[:1, :16])
        tp_result = {"ppl": ppl(tp_model), "widths": widths,
                     "params": sum(p.numel() for p in tp_model.parameters())}
        tp_model_healed = tp_model
        heal(tp_model_healed, model, calib, args.heal, lr=3e-4, batch_size=8, progress=False)
        tp_result["ppl_healed"] = ppl(tp_model_healed)
    except Exception as err:  # noqa: BLE001 - report why it does not run on this model
        tp_model, tp_result = None, {"error": f"{type(err).__name__}: {err}"[:300]}

    timed = {"dense": model, "neurons": pruned} | ({"tp": tp_model} if tp_model is not None else {})
    seconds = mlp_times(timed)
    dense["mlp_s"], neurons["mlp_s"] = seconds["dense"], seconds["neurons"]
    if tp_model is not None:
        tp_result["mlp_s"] = seconds["tp"]

    print(f"## Structured pruning, built-in {name!r} model (test-split perplexity, {args.windows} windows of {seq_len})\n")
    print("| variant | params | ppl | ppl healed | MLP time | decode tok/s b1 | decode tok/s b16 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| dense | {dense['params']:,} | {dense['ppl']:.2f} | - | 1.00x ({dense['mlp_s'] * 1e3:.1f} ms) | "
          f"{dense['decode_b1']:.1f} | {dense['decode_b16']:.1f} |")
    print(f"| 50% neurons (activation) | {neurons['params']:,} | {neurons['ppl']:.2f} | {neurons['ppl_healed']:.2f} | "
          f"{neurons['mlp_s'] / dense['mlp_s']:.2f}x | {neurons['decode_b1']:.1f} ({ratios['decode_b1']:.2f}x) | "
          f"{neurons['decode_b16']:.1f} ({ratios['decode_b16']:.2f}x) |")
    print(f"| 50% neurons (taylor) | {neurons['params']:,} | {neurons['ppl_taylor']:.2f} | - | - | - | - |")
    if "error" in tp_result:
        print(f"| Torch-Pruning 50% | did not run: {tp_result['error']} | | | | | |")
    else:
        print(f"| Torch-Pruning 50% (group L2 magnitude) | {tp_result['params']:,} | {tp_result['ppl']:.2f} | "
              f"{tp_result['ppl_healed']:.2f} | {tp_result['mlp_s'] / dense['mlp_s']:.2f}x | - | - |")
    print(f"\nBatch-1 decode through the lean loop (dense and pruned alternating): dense "
          f"{dense['decode_b1_lean']:.1f} tok/s, 50% neurons {neurons['decode_b1_lean']:.1f} tok/s, "
          f"{lean_ratio:.3f}x (median of {args.decode_rounds} per-round ratios, {lean_cover:.0%} interval "
          f"{lean_low:.3f}-{lean_high:.3f}x; target 1.3x: {'met' if lean_ratio >= 1.3 else 'NOT met'}"
          f"{', the whole interval above it' if lean_low >= 1.3 else ''})")
    print(f"\nHealing: {args.heal} distillation steps (batch 8 x {seq_len}) against the dense model's logits.\n")
    print("| two layers removed | layers | ppl |")
    print("| --- | --- | ---: |")
    print(f"| block influence, re-measured after each removal (default) | {by_iterative} | "
          f"{layers['ppl_iterative']:.2f} |")
    print(f"| block influence measured once (ShortGPT) | {by_bi} | {layers['ppl_bi']:.2f} |")
    print(f"| random, mean of 5 seeds | {random_sets} | {layers['ppl_random_mean']:.2f} |")
    print(f"| last two | {list(range(n_layers - count, n_layers))} | {layers['ppl_last2']:.2f} |")
    print(f"\nblock influence per layer: {layers['influence']}; total time {time.time() - started:.0f} s\n")
    print(json.dumps({"bench": "structured", "model": name, "dense": dense, "neurons_50": neurons, "layers_2": layers,
                      "torch_pruning_50": tp_result, "decode_rounds": args.decode_rounds,
                      "ratio_intervals": {k: {"low": lo, "high": hi, "coverage": c}
                                          for k, (lo, hi, c) in intervals.items()},
                      "ratios": {"mlp_time": neurons["mlp_s"] / dense["mlp_s"],
                                 **ratios,
                                 "ppl_bi_vs_random": layers["ppl_bi"] / layers["ppl_random_mean"],
                                 "ppl_bi_vs_last2": layers["ppl_bi"] / layers["ppl_last2"],
                                 "ppl_iterative_vs_random": layers["ppl_iterative"] / layers["ppl_random_mean"],
                                 "ppl_iterative_vs_last2": layers["ppl_iterative"] / layers["ppl_last2"]}}))


if __name__ == "__main__":
    main()
