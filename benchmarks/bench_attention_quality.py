"""Quality of sparse attention patterns: held-out perplexity against full attention.

    python benchmarks/bench_attention_quality.py               # built-in tiny model, < 10 min on 2 cores
    python benchmarks/bench_attention_quality.py --model small

1. Patched after training: the built-in model (trained with full attention) evaluated on the
   test split at its context with each pattern patched in, no retraining.
2. Trained with the pattern: the same architecture trained from scratch with full attention
   and with each pattern (same data, seed, steps), evaluated with the pattern it was trained with.
3. Text of 4x the training context: full attention in one pass, against the StreamingLLM
   cache with sinks + window and with the window alone (no sinks).
Prints Markdown tables, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="built-in model (tiny, small)")
    parser.add_argument("--max-windows", type=int, default=32, help="test windows per perplexity")
    parser.add_argument("--train-steps", type=int, default=200,
                        help="steps per from-scratch training run (0 skips that section)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()

    from sparselm.attention import stream_perplexity
    from sparselm.attention.quality import long_text_perplexities, patched_perplexities, train_with_pattern
    from sparselm.attention.streaming_cache import SinkWindowCache
    from sparselm.data.tokens import corpus_token_ids
    from sparselm.evaluate import perplexity
    from sparselm.zoo import BUILTIN_SPECS, load_builtin

    model, tok = load_builtin(args.model, progress=True)
    ctx = model.config.max_position_embeddings
    test_ids = corpus_token_ids(tok, None, "test")
    w8, w4 = ctx // 8, ctx // 4
    patterns = [f"window:{w8}", f"window:{w8}+sinks:4", f"window:{w4}+sinks:4", f"dilated:{w8}:2+sinks:4",
                f"strided:{w8}", f"fixed:{w8}:4", f"window:{w8}+global:4+random:{w8 // 2}:2:0"]
    print(f"# attention quality, built-in {args.model!r} (context {ctx}), {args.max_windows} test windows", flush=True)
    patched = patched_perplexities(model, test_ids, ctx, patterns, max_windows=args.max_windows)
    from sparselm.attention import parse_pattern

    density = {spec: parse_pattern(spec).density(ctx) for spec in patched if spec != "full"}

    spec = BUILTIN_SPECS[args.model]
    train_ids = corpus_token_ids(tok, None, "train")
    trained = {}
    for pattern in [None, f"window:{w8}+sinks:4", f"strided:{w8}"] if args.train_steps > 0 else []:
        name = "full" if pattern is None else parse_pattern(pattern).spec()
        m, losses = train_with_pattern(model.config, train_ids, pattern, steps=args.train_steps,
                                       batch_size=spec.batch_size, seq_len=ctx, lr=spec.lr, seed=spec.seed,
                                       progress=True)
        trained[name] = {"perplexity": perplexity(m, test_ids, ctx, max_windows=args.max_windows),
                         "final_loss": sum(losses[-10:]) / 10}
        print(f"  trained {name}: perplexity {trained[name]['perplexity']:.3f}", flush=True)

    long = long_text_perplexities(model, test_ids, ctx, sinks=4, window=ctx - 4, factor=4)
    no_sinks = SinkWindowCache.for_model(model, 0, ctx)
    try:
        long["window_only"] = stream_perplexity(model, test_ids[:4 * ctx], no_sinks, chunk=1).perplexity
    finally:
        no_sinks.patch.remove()

    print(f"\n## Patched after training (test perplexity at context {ctx})\n")
    print("| pattern | density | perplexity | vs full |")
    print("|---|---|---|---|")
    for name, ppl in patched.items():
        d = 1.0 if name == "full" else density[name]
        print(f"| {name} | {d:.3f} | {ppl:.3f} | {ppl / patched['full']:.3f}x |")
    if trained:
        print(f"\n## Trained with the pattern ({args.train_steps} steps each, same seed and data)\n")
        print("| trained with | perplexity | vs full | final train loss |")
        print("|---|---|---|---|")
    for name, r in trained.items():
        print(f"| {name} | {r['perplexity']:.3f} | {r['perplexity'] / trained['full']['perplexity']:.3f}x | "
              f"{r['final_loss']:.3f} |")
    print(f"\n## Text of 4x the context ({long['tokens']} test tokens)\n")
    print("| attention | perplexity |")
    print("|---|---|")
    print(f"| full, one pass (positions up to {long['tokens']}) | {long['full']:.3f} |")
    print(f"| sinks 4 + window {ctx - 4}, bounded cache | {long['sinks+window']:.3f} |")
    print(f"| window {ctx} only, bounded cache | {long['window_only']:.3f} |")
    print(f"| reference: full attention in windows of {ctx} | {long['in_context']:.3f} |")
    print(json.dumps({"bench": "attention_quality", "model": args.model, "context": ctx, "patched": patched,
                      "density": density, "trained": trained, "long_text": long,
                      "seconds": time.time() - started}, default=float))


if __name__ == "__main__":
    main()
