"""Sparse attention benchmark: time and memory of each backend against dense causal SDPA.

    python benchmarks/bench_attention.py                 # full run, < 10 min on a 2-core CPU
    python benchmarks/bench_attention.py --quick         # 1k and 4k only

Sections (all measured in this run, same threads for every kernel):
1. forward, batch 1, 8 heads, head dim 64, window 256, at 1k/4k/16k/32k tokens:
   dense causal SDPA (PyTorch's fused flash kernel: O(n) memory, O(n^2) time) is the
   baseline; also the dense-mask SDPA (the naive way to impose a pattern) and eager
   attention that materialises the scores, where they fit. Peak memory = the rise of the
   process's resident set during the call (allocations above 64 KiB are mmapped, so freed
   memory leaves the resident set), output included.
2. fitted scaling exponent of time in n (least squares on log-log) for the window pattern.
3. forward + backward at 4k and 16k: dense causal SDPA vs the blocked backend.
4. generation with a built-in model: decode 4x its training context with the full cache
   and with the sinks + window cache (tokens/s, cache bytes over time), and perplexity on
   a text of 4x the context: full attention vs the sinks + window cache.
Prints Markdown tables, then one JSON line.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import time

import torch
import torch.nn.functional as F


def _malloc_returns_memory() -> None:
    """Make glibc mmap every allocation >= 64 KiB, so a free shrinks the resident set (honest peaks)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
    except OSError:
        pass


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_rise(fn) -> tuple[object, float | None]:
    """Run fn(); return (result, MiB the peak resident set rose above the level before the call)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark VmHWM to the current RSS
    except OSError:
        return fn(), None
    before = _status_bytes("VmRSS:")
    result = fn()
    peak = _status_bytes("VmHWM:")
    return result, (peak - before) / 2**20


def timed(fn, repeats: int, warmup: bool = True) -> float:
    """Best of `repeats` wall-clock seconds."""
    if warmup:
        fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def fit_exponent(lengths: list[int], seconds: list[float]) -> float:
    """Slope of log(time) against log(n), least squares."""
    xs, ys = [math.log(n) for n in lengths], [math.log(t) for t in seconds]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def forward_section(lengths, heads, dim, window, repeats) -> list[dict]:
    from sparselm.attention import SlidingWindow, blocked_attention
    from sparselm.attention.backends.flex import flex_sparse_attention, pattern_block_mask

    pattern = SlidingWindow(window)
    rows = []
    for n in lengths:
        gen = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, heads, n, dim, generator=gen) for _ in range(3))  # [B, H, T, D]
        reps = repeats if n <= 16384 else max(1, repeats - 1)
        with torch.no_grad():
            row = {"n": n}
            out_dense, row["dense_mib"] = peak_rise(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
            del out_dense
            row["dense_s"] = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), reps,
                                   warmup=n <= 16384)
            out_blocked, row["blocked_mib"] = peak_rise(lambda: blocked_attention(q, k, v, pattern))
            row["blocked_s"] = timed(lambda: blocked_attention(q, k, v, pattern), reps)
            t0 = time.perf_counter()
            pattern_block_mask(pattern, n, n, 0, q.device, compiled=True)
            row["flex_mask_build_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            flex_sparse_attention(q, k, v, pattern)  # first call compiles for this shape
            row["flex_first_call_s"] = time.perf_counter() - t0
            out_flex, row["flex_mib"] = peak_rise(lambda: flex_sparse_attention(q, k, v, pattern))
            row["flex_s"] = timed(lambda: flex_sparse_attention(q, k, v, pattern), reps, warmup=False)
            row["blocked_vs_flex_maxdiff"] = float((out_blocked - out_flex).abs().max())
            del out_flex
            if n <= 16384:  # the dense boolean mask alone is n^2 bytes (1 GiB at 32k)
                mask = pattern.mask(n)  # [T, T]
                out_mask, row["dense_mask_mib"] = peak_rise(
                    lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
                row["dense_mask_s"] = timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), 1,
                                            warmup=False)
                row["blocked_vs_mask_maxdiff"] = float((out_blocked - out_mask).abs().max())
                del mask, out_mask
            if n <= 4096:  # eager attention materialises [H, T, T] scores
                def eager():
                    scores = (q @ k.transpose(-1, -2)) * dim ** -0.5  # [B, H, T, T]
                    causal = torch.ones(n, n, dtype=torch.bool).tril()
                    return torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v

                _, row["eager_mib"] = peak_rise(eager)
                row["eager_s"] = timed(eager, 1, warmup=False)
            row["output_mib"] = q.numel() * 4 / 2**20
        rows.append(row)
        print(f"  forward n={n}: dense {row['dense_s']:.3f}s, blocked {row['blocked_s']:.3f}s, "
              f"flex {row['flex_s']:.3f}s", flush=True)
    return rows


def backward_section(lengths, heads, dim, window) -> list[dict]:
    from sparselm.attention import SlidingWindow, blocked_attention

    pattern = SlidingWindow(window)
    rows = []
    for n in lengths:
        gen = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, heads, n, dim, generator=gen).requires_grad_() for _ in range(3))
        grad = torch.randn(1, heads, n, dim, generator=gen)

        def dense():
            torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), grad)

        def blocked():
            torch.autograd.grad(blocked_attention(q, k, v, pattern), (q, k, v), grad)

        row = {"n": n}
        _, row["dense_mib"] = peak_rise(dense)
        row["dense_s"] = timed(dense, 1, warmup=False)
        _, row["blocked_mib"] = peak_rise(blocked)
        row["blocked_s"] = timed(blocked, 1, warmup=False)
        rows.append(row)
        print(f"  forward+backward n={n}: dense {row['dense_s']:.3f}s, blocked {row['blocked_s']:.3f}s", flush=True)
    return rows


def generation_section(model_name: str, sinks: int, factor: int) -> dict:
    from transformers import DynamicCache

    from sparselm.attention import SinkWindowCache, greedy_generate
    from sparselm.attention.quality import long_text_perplexities
    from sparselm.data.tokens import corpus_token_ids
    from sparselm.zoo import load_builtin

    model, tok = load_builtin(model_name, progress=True)
    context = model.config.max_position_embeddings
    window = context - sinks  # slot positions stay inside the trained context
    ids = corpus_token_ids(tok, None, "test")
    n_new = factor * context
    prompt = ids[:8]
    full_tokens, full = greedy_generate(model, prompt, n_new, DynamicCache(config=model.config))
    cache = SinkWindowCache.for_model(model, sinks, window)
    try:
        bounded_tokens, bounded = greedy_generate(model, prompt, n_new, cache)
    finally:
        cache.patch.remove()
    checkpoints = [context * i - 8 for i in range(1, factor + 1)]  # bytes after context, 2x, ... tokens in total
    quality = long_text_perplexities(model, ids, context, sinks, window, factor=factor)
    return {
        "model": model_name, "context": context, "sinks": sinks, "window": window, "generated": n_new,
        "full_tokens_per_s": full.tokens_per_s, "bounded_tokens_per_s": bounded.tokens_per_s,
        "full_cache_bytes": [full.cache_bytes[i] for i in checkpoints],
        "bounded_cache_bytes": [bounded.cache_bytes[i] for i in checkpoints],
        "same_tokens_within_window": int((full_tokens[:window - 8] == bounded_tokens[:window - 8]).all()),
        "perplexity": {k: quality[k] for k in ("in_context", "full", "sinks+window")},
        "tokens_in_text": quality["tokens"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,4096,16384,32768")
    parser.add_argument("--backward-lengths", default="4096,16384")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads for every kernel (default: torch's default)")
    parser.add_argument("--model", default="tiny", help="built-in model for the generation section (tiny, small)")
    parser.add_argument("--quick", action="store_true", help="1k and 4k only, backward at 4k")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _malloc_returns_memory()
    lengths = [1024, 4096] if args.quick else [int(x) for x in args.lengths.split(",")]
    back_lengths = [4096] if args.quick else [int(x) for x in args.backward_lengths.split(",")]
    started = time.time()
    print(f"# sparse attention benchmark ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} threads, load average {os.getloadavg()[0]:.1f})", flush=True)

    fwd = forward_section(lengths, args.heads, args.head_dim, args.window, repeats=3)
    bwd = backward_section(back_lengths, args.heads, args.head_dim, args.window)
    gen = generation_section(args.model, sinks=4, factor=4)

    exp_blocked = fit_exponent([r["n"] for r in fwd], [r["blocked_s"] for r in fwd])
    exp_flex = fit_exponent([r["n"] for r in fwd], [r["flex_s"] for r in fwd])
    exp_dense = fit_exponent([r["n"] for r in fwd], [r["dense_s"] for r in fwd])

    def cell(row, key, digits=3):
        return f"{row[key]:.{digits}f}" if key in row and row[key] is not None else "-"

    print(f"\n## Forward, batch 1, {args.heads} heads, head dim {args.head_dim}, window {args.window} "
          f"(time in s; memory = peak rise in MiB, output included)\n")
    print("| n | dense causal SDPA | blocked | flex (compiled) | dense-mask SDPA | eager | blocked speedup | "
          "flex speedup | dense MiB | blocked MiB | flex MiB | dense-mask MiB | eager MiB | output MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in fwd:
        print(f"| {r['n']} | {cell(r, 'dense_s')} | {cell(r, 'blocked_s')} | {cell(r, 'flex_s')} | "
              f"{cell(r, 'dense_mask_s')} | {cell(r, 'eager_s')} | {r['dense_s'] / r['blocked_s']:.1f}x | "
              f"{r['dense_s'] / r['flex_s']:.1f}x | {cell(r, 'dense_mib', 1)} | {cell(r, 'blocked_mib', 1)} | "
              f"{cell(r, 'flex_mib', 1)} | {cell(r, 'dense_mask_mib', 1)} | {cell(r, 'eager_mib', 1)} | "
              f"{r['output_mib']:.0f} |")
    print("\nFlex one-off costs per length (block mask build / first call incl. compile): "
          + ", ".join(f"{r['n']}: {r['flex_mask_build_s']:.2f}s / {r['flex_first_call_s']:.2f}s" for r in fwd))
    print(f"\nFitted time exponent in n: blocked {exp_blocked:.3f}, flex {exp_flex:.3f}, dense causal {exp_dense:.3f}")
    print("\n## Forward + backward (s; peak rise MiB)\n")
    print("| n | dense causal SDPA | blocked | speedup | dense MiB | blocked MiB |")
    print("|---|---|---|---|---|---|")
    for r in bwd:
        print(f"| {r['n']} | {r['dense_s']:.3f} | {r['blocked_s']:.3f} | {r['dense_s'] / r['blocked_s']:.1f}x | "
              f"{cell(r, 'dense_mib', 1)} | {cell(r, 'blocked_mib', 1)} |")
    print(f"\n## Generation: built-in {gen['model']!r} (context {gen['context']}), {gen['generated']} tokens "
          f"(4x context), sinks {gen['sinks']} + window {gen['window']}\n")
    print("| cache | tokens/s | bytes at 1x / 2x / 3x / 4x context |")
    print("|---|---|---|")
    print(f"| full | {gen['full_tokens_per_s']:.1f} | {' / '.join(str(b) for b in gen['full_cache_bytes'])} |")
    print(f"| sinks+window | {gen['bounded_tokens_per_s']:.1f} | "
          f"{' / '.join(str(b) for b in gen['bounded_cache_bytes'])} |")
    ppl = gen["perplexity"]
    print(f"\nPerplexity on {gen['tokens_in_text']} test tokens (4x context): full attention {ppl['full']:.3f}, "
          f"sinks+window cache {ppl['sinks+window']:.3f}; in-context windows {ppl['in_context']:.3f}")

    at16 = next((r for r in fwd if r["n"] == 16384), None)
    summary = {
        "bench": "attention", "threads": args.threads, "window": args.window, "forward": fwd, "forward_backward": bwd,
        "exponent": {"blocked": exp_blocked, "flex": exp_flex, "dense": exp_dense}, "generation": gen,
        "targets": {
            "speedup_16k_blocked": at16["dense_s"] / at16["blocked_s"] if at16 else None,
            "speedup_16k_flex": at16["dense_s"] / at16["flex_s"] if at16 else None,
            "memory_ratio_16k_blocked_vs_dense_sdpa": at16["blocked_mib"] / at16["dense_mib"]
            if at16 and at16.get("dense_mib") else None,
            "memory_ratio_16k_blocked_vs_dense_mask": at16["blocked_mib"] / at16["dense_mask_mib"]
            if at16 and at16.get("dense_mask_mib") else None,
            "exponent_blocked_le_1.15": exp_blocked <= 1.15,
            "cache_flat": len(set(gen["bounded_cache_bytes"])) == 1,
        },
        "seconds": time.time() - started,
    }
    print(json.dumps(summary, default=float))


if __name__ == "__main__":
    main()
