"""`sparselm attention MODEL --pattern window:256+sinks:4 [--eval] [--bench]`.

Reports the pattern's density at the model's context and which backend runs; with
`--eval`, held-out perplexity patched vs full attention and StreamingLLM-style perplexity
on text of 4x the context; with `--bench`, attention time against dense causal SDPA and
decode tokens/s and cache bytes of the bounded cache against the full cache.
"""
from __future__ import annotations

import json


def register(subparsers) -> None:
    p = subparsers.add_parser("attention", help="sparse attention: patterns, quality, speed, bounded KV cache")
    p.add_argument("model", help="local Hugging Face model folder, or a built-in name (tiny, small)")
    p.add_argument("--pattern", default="window:256+sinks:4",
                   help="pattern string, e.g. window:256+sinks:4, strided:64, fixed:64:8, random:64:2 "
                        "(default: %(default)s)")
    p.add_argument("--backend", default="auto", help="auto, blocked, flex, flex-eager or reference (default: auto)")
    p.add_argument("--eval", action="store_true", help="perplexity patched vs full, and on 4x-context text")
    p.add_argument("--bench", action="store_true", help="attention time vs dense SDPA; decode speed and cache bytes")
    p.add_argument("--data", default=None, help="text file or folder to evaluate on (default: the built-in corpus)")
    p.add_argument("--max-windows", type=int, default=16, help="evaluation windows (default: %(default)s)")
    p.add_argument("--render", default=None, metavar="PNG", help="save a picture of the mask")
    p.add_argument("--render-length", type=int, default=128, help="length of the rendered mask (default: 128)")
    p.add_argument("--json", action="store_true", help="print one JSON line at the end")
    p.set_defaults(func=run)


def _sinks_and_window(pattern):
    """(sinks, window) if the pattern is a window, optionally with sinks; else None."""
    from sparselm.attention import Sinks, SlidingWindow, Union

    parts = pattern.parts if isinstance(pattern, Union) else (pattern,)
    windows = [p.window for p in parts if isinstance(p, SlidingWindow)]
    sinks = [p.count for p in parts if isinstance(p, Sinks)]
    if len(windows) == 1 and len(sinks) <= 1 and len(windows) + len(sinks) == len(parts):
        return (sinks[0] if sinks else 0), windows[0]
    return None


def _bench_kernel(heads: int, kv_heads: int, head_dim: int, length: int, pattern, backend: str) -> dict:
    import time

    import torch
    import torch.nn.functional as F

    from sparselm.attention import sparse_attention

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, length, head_dim, generator=gen)  # [B, H, T, D]
    k = torch.randn(1, kv_heads, length, head_dim, generator=gen)
    v = torch.randn(1, kv_heads, length, head_dim, generator=gen)

    def best(fn, repeats=3):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    with torch.no_grad():
        dense = best(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=heads != kv_heads))
        ran = {}

        def sparse():
            ran["backend"] = sparse_attention(q, k, v, pattern, backend=backend)[1]

        t = best(sparse)
    return {"length": length, "dense_sdpa_ms": 1e3 * dense, "sparse_ms": 1e3 * t, "speedup": dense / t,
            "backend": ran["backend"]}


def run(args) -> int:
    import torch

    from sparselm.attention import apply, choose_backend, parse_pattern
    from sparselm.io import load

    pattern = parse_pattern(args.pattern)
    model, tok = load(args.model)
    config = model.config
    context = int(getattr(config, "max_position_embeddings", 0) or 512)
    result: dict = {"model": str(args.model), "pattern": pattern.spec(), "context": context,
                    "density_at_context": pattern.density(context)}
    print(f"pattern {pattern.spec()}: density {result['density_at_context']:.4f} of causal attention "
          f"at the model's context of {context} tokens")
    if args.render:
        path = pattern.render(args.render, n=args.render_length)
        print(f"mask picture: {path}")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", heads) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    probe = torch.zeros(1, heads, 2, head_dim)
    result["backend"] = choose_backend(probe, probe[:, :kv_heads], probe[:, :kv_heads], args.backend)
    patch = apply(model, pattern, backend=args.backend)
    with torch.no_grad():
        model(torch.zeros(1, min(context, 64), dtype=torch.long))
    patch.remove()
    print(f"backend: requested {args.backend}, ran {dict(patch.backends_used)}")
    result["backends_used"] = dict(patch.backends_used)

    if args.eval:
        from sparselm.attention.quality import long_text_perplexities, patched_perplexities
        from sparselm.data.tokens import corpus_token_ids

        ids = corpus_token_ids(tok, args.data, "test")
        ppl = patched_perplexities(model, ids, context, [pattern], max_windows=args.max_windows, backend=args.backend)
        result["perplexity"] = ppl
        print(f"test perplexity (context {context}, {args.max_windows} windows): full {ppl['full']:.3f}, "
              f"{pattern.spec()} {ppl[pattern.spec()]:.3f} ({ppl[pattern.spec()] / ppl['full']:.3f}x)")
        sw = _sinks_and_window(pattern)
        if sw is None:
            print("long-text streaming: skipped (needs a window:W[+sinks:S] pattern)")
        else:
            sinks, window = sw
            window = min(window, context - sinks)  # slot positions must stay inside the trained context
            long = long_text_perplexities(model, ids, context, sinks, window, factor=4)
            result["long_text"] = long
            print(f"text of 4x context ({long['tokens']} tokens): full attention {long['full']:.3f}, "
                  f"sinks:{sinks}+window:{window} cache {long['sinks+window']:.3f} "
                  f"(in-context windows {long['in_context']:.3f}); cache bytes flat at "
                  f"{long['sinks+window_cache_bytes']['peak']} vs full cache {long['full_cache_bytes_final']}")

    if args.bench:
        from transformers import DynamicCache

        from sparselm.attention import SinkWindowCache, greedy_generate

        rows = [_bench_kernel(heads, kv_heads, head_dim, n, pattern, args.backend) for n in (1024, 4096)]
        result["kernel"] = rows
        for r in rows:
            print(f"attention forward, {r['length']} tokens: dense causal SDPA {r['dense_sdpa_ms']:.1f} ms, "
                  f"{pattern.spec()} ({r['backend']}) {r['sparse_ms']:.1f} ms, {r['speedup']:.2f}x")
        sw = _sinks_and_window(pattern)
        if sw is not None:
            sinks, window = sw
            window = min(window, context - sinks)
            prompt = torch.zeros(4, dtype=torch.long)
            n_new = 4 * context
            _, full = greedy_generate(model, prompt, n_new, DynamicCache(config=config))
            cache = SinkWindowCache.for_model(model, sinks, window, backend=args.backend)
            try:
                _, bounded = greedy_generate(model, prompt, n_new, cache)
            finally:
                cache.patch.remove()
            result["decode"] = {"full": full.to_dict(), "sinks+window": bounded.to_dict()}
            print(f"decode {n_new} tokens: full cache {full.tokens_per_s:.1f} tok/s, {full.peak_cache_bytes} bytes; "
                  f"sinks+window {bounded.tokens_per_s:.1f} tok/s, {bounded.peak_cache_bytes} bytes "
                  f"({bounded.peak_cache_bytes / max(1, full.peak_cache_bytes):.3f}x)")
    if args.json:
        print(json.dumps(result, default=float))
    return 0
