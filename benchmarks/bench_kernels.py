"""Sparse x dense kernels vs dense, single layers of LLM shapes, cold caches.

For each shape (out x in: 4096x4096, 11008x4096, 4096x11008), batch (1, 8, 128) and
unstructured sparsity (50, 70, 90%), times in the same run:
- dense baselines: torch `x @ W.T` (fp32 by default, `--dtype bf16`; MKL on x86 CPU builds; what nn.Linear runs) and
  `W @ x.T` (MKL's other orientation), both with the sparse kernels' thread count; the faster
  one is "best torch dense" and the targets are judged against it; at batch 1 also the
  extension's own dense GEMV (same threads, same code style), since PyTorch's fp32 GEMV may
  use fewer threads than it is given;
- each packed format (csr, bitmask) through SparseLinear.
Every timed call starts with cold caches: a buffer of twice the last-level cache is read
first, so the weights come from memory as in the decode of a model larger than the cache.
Reports the speedup over each dense baseline and the achieved fraction of the byte-ratio
ceiling (dense weight bytes / packed weight bytes). The full sweep uses all cores; batch 1 is
also swept with one thread, the setting ALGORITHMS.md measured and the reproducible one when
other processes share the cores. Timings are the best of N cold calls. Prints a Markdown
table, then one JSON line. Runs in about 4-6 minutes on 2 cores.

    python benchmarks/bench_kernels.py            # full run (< 10 min on 2 cores)
    python benchmarks/bench_kernels.py --quick    # small shapes, seconds
    python benchmarks/bench_kernels.py --dtype bf16 --batches 1   # bf16 weights and inputs
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # before torch starts OpenMP: see ALGORITHMS.md

import argparse
import json
import time

import torch

from sparselm.bench.timing import l3_cache_bytes
from sparselm.kernels import dense_gemv, extension_status
from sparselm.pack import SparseLinear

TARGETS_BATCH1 = {0.5: 1.3, 0.7: 2.0, 0.9: 4.0}


def random_sparse(out_f, in_f, sparsity, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) / in_f ** 0.5
    w[torch.rand(out_f, in_f, generator=g) < sparsity] = 0
    return w


class CacheFlusher:
    def __init__(self, nbytes):
        self.buffer = torch.ones(max(1, nbytes // 4))

    def __call__(self):
        self.buffer.sum()  # streams 2x the LLC through the cache hierarchy


def cold_ms(fn, flush, repeats):
    """Best-of-`repeats` cold-cache time in ms (as `timeit` advises: on cores shared with other
    processes, slower samples measure the other processes, not the kernel)."""
    samples = []
    fn()  # warm-up (allocations, lazy init), not timed
    for _ in range(repeats):
        flush()
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return 1e3 * min(samples)


def sweep(shapes, batches, sparsities, threads, repeats, flush, dtype=torch.float32):
    """Time every (shape, sparsity, batch) for dense and each format with `threads` threads."""
    torch.set_num_threads(threads)
    rows = []
    with torch.inference_mode():
        for si, (out_f, in_f) in enumerate(shapes):
            for sparsity in sparsities:
                w = random_sparse(out_f, in_f, sparsity, seed=si * 10 + int(sparsity * 10)).to(dtype)
                dense_bytes = w.numel() * w.element_size()
                packed = {fmt: SparseLinear.from_dense(w, fmt) for fmt in ("csr", "bitmask")}
                for batch in batches:
                    # Calls of 100+ ms at prefill sizes vary little: fewer repeats keep the run short.
                    reps = repeats if batch <= 16 else max(2, repeats // 2)
                    x = torch.randn(batch, in_f).to(dtype)
                    t_linear = cold_ms(lambda: x @ w.t(), flush, reps)  # what nn.Linear runs
                    t_alt = cold_ms(lambda: w @ x.t(), flush, reps)  # MKL's other orientation
                    t_torch = min(t_linear, t_alt)
                    t_same = cold_ms(lambda: dense_gemv(x, w), flush, reps) \
                        if batch == 1 and dtype == torch.float32 else None  # the extension's GEMV is fp32
                    for fmt, module in packed.items():
                        t = cold_ms(lambda: module(x), flush, reps)
                        ceiling = dense_bytes / module.packed_nbytes()
                        speedup = t_torch / t
                        rows.append({
                            "threads": threads, "shape": f"{out_f}x{in_f}", "batch": batch, "sparsity": sparsity,
                            "format": fmt, "ms": round(t, 4), "dense_torch_ms": round(t_torch, 4),
                            "dense_x_wt_ms": round(t_linear, 4), "dense_w_xt_ms": round(t_alt, 4),
                            "speedup_vs_linear": round(t_linear / t, 3),
                            "dense_same_threads_ms": round(t_same, 4) if t_same else None,
                            "speedup_vs_torch": round(speedup, 3),
                            "speedup_vs_same_threads": round(t_same / t, 3) if t_same else None,
                            "byte_ceiling": round(ceiling, 3), "fraction_of_ceiling": round(speedup / ceiling, 3),
                        })
                        print(f"threads={threads} {out_f}x{in_f} b={batch} s={sparsity} {fmt}: {t:.3f} ms, "
                              f"best torch dense {t_torch:.3f} ms -> {speedup:.2f}x", flush=True)
                del w, packed
    return rows


def print_table(rows):
    print("| threads | shape (out x in) | batch | sparsity | format | ms | x@W.T ms | W@x.T ms | speedup vs x@W.T | "
          "speedup vs best torch dense | same-thread dense ms | speedup vs same-thread | byte ceiling | "
          "fraction of ceiling |")
    print("| ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        same = f"{r['dense_same_threads_ms']:.3f}" if r["dense_same_threads_ms"] else "-"
        same_x = f"{r['speedup_vs_same_threads']:.2f}x" if r["speedup_vs_same_threads"] else "-"
        print(f"| {r['threads']} | {r['shape']} | {r['batch']} | {r['sparsity']:.0%} | {r['format']} | {r['ms']:.3f} | "
              f"{r['dense_x_wt_ms']:.3f} | {r['dense_w_xt_ms']:.3f} | {r['speedup_vs_linear']:.2f}x | "
              f"{r['speedup_vs_torch']:.2f}x | {same} | {same_x} | "
              f"{r['byte_ceiling']:.2f}x | {r['fraction_of_ceiling']:.2f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes for a smoke test")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="threads of the full sweep (default: torch's, i.e. all cores)")
    parser.add_argument("--no-single-thread", action="store_true",
                        help="skip the extra 1-thread sweep at batch 1 (the comparison ALGORITHMS.md made; "
                             "on shared cores it is the reproducible one)")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8,128)")
    parser.add_argument("--shapes", default=None, help="comma-separated OUTxIN shapes (default: the three LLM shapes)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="weights and inputs, dense and packed alike (the targets are stated for fp32)")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    shapes = [(512, 512), (1024, 512)] if args.quick else [(4096, 4096), (11008, 4096), (4096, 11008)]
    batches = [1, 8] if args.quick else [1, 8, 128]
    if args.batches:
        batches = [int(b) for b in args.batches.split(",")]
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    sweeps = [(args.threads, batches)]
    if args.threads > 1 and not args.no_single_thread and 1 in batches:
        sweeps.append((1, [1]))
    thread_counts = [t for t, _ in sweeps]
    sparsities = [0.5, 0.7, 0.9]
    l3 = l3_cache_bytes()
    flush = CacheFlusher(2 * l3)
    rows = []
    for threads, sweep_batches in sweeps:
        rows += sweep(shapes, sweep_batches, sparsities, threads, args.repeats, flush, dtype)

    mkl = "MKL" if torch.backends.mkl.is_available() else "default BLAS"
    print()
    print(f"best of {args.repeats} cold-cache calls (batch > 16: best of {max(2, args.repeats // 2)}); load average "
          f"during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"kernels: {extension_status()}; LLC {l3 / 2**20:.0f} MiB (flushed with {2 * l3 / 2**20:.0f} MiB before "
          f"every call); dtype {args.dtype}; dense baselines, in that dtype with the same thread count as the sparse kernels: torch ({mkl}) "
          f"`x @ W.T` (what nn.Linear runs) and `W @ x.T` (MKL's other orientation, much faster at batch 8 here), "
          f"the faster of the two is 'best torch dense'; at batch 1 also the extension's dense GEMV")
    print()
    print_table(rows)
    # Targets: at batch 1, the best format per (shape, sparsity) against the best torch dense.
    verdicts = {}
    for threads in thread_counts:
        for sparsity, target in TARGETS_BATCH1.items():
            best = [max(r["speedup_vs_torch"] for r in rows if r["threads"] == threads and r["batch"] == 1
                        and r["sparsity"] == sparsity and r["shape"] == f"{o}x{i}")
                    for o, i in shapes] if 1 in batches else []
            verdicts[f"threads={threads}, {sparsity:.0%}"] = {"target": target, "best_per_shape": best,
                                                              "met": bool(best) and min(best) >= target}
    print()
    for key, v in verdicts.items():
        print(f"batch 1, {key} sparsity: best format per shape {v['best_per_shape']} vs target {v['target']}x: "
              f"{'met' if v['met'] else 'NOT met'}")
    print(json.dumps({"benchmark": "kernels", "kernels": extension_status(), "threads": thread_counts,
                      "dtype": args.dtype, "dense_baseline": f"best of torch {args.dtype} x @ W.T and W @ x.T ({mkl})", "llc_bytes": l3,
                      "load_average": os.getloadavg()[0], "timing": f"best of {args.repeats}",
                      "targets_batch1": verdicts, "results": rows}))


if __name__ == "__main__":
    main()
