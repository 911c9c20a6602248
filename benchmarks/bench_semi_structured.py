"""2:4 semi-structured sparsity on an NVIDIA GPU: single linear layers, then a Llama end to end.

Layers: the three Llama-7B linear shapes (4096x4096, 11008x4096, 4096x11008, OUTxIN) with a
2:4 magnitude mask, in bf16 and fp16, at token counts from decode (1, 16) to prefill (16384).
Each row times, in the same process and interleaved round by round: dense `F.linear` on the
masked weight, and the same weight as PyTorch semi-structured tensors through cuSPARSELt and
through CUTLASS (whichever this PyTorch offers). Every product is captured in a CUDA graph
(eager launch costs tens of microseconds, as much as a batch-1 product itself) and replayed over
enough copies of the weight to exceed the L2 cache several times, as a model's layers do in a
decode step. Reported: microseconds per product, speedup over dense, dense TFLOP/s and GB/s,
and at batch 1 the fraction achieved of the bytes ceiling (dense bytes / compressed bytes: the
kept halves and their 2-bit indices, about 1.78x in 16-bit types). Every sparse product is
checked against the dense masked one first.

End to end: a randomly initialised Llama (default hidden 4096, 8 layers, MLP 11008; decode
speed does not depend on what the weights learned), every decoder linear pruned 2:4 by
magnitude, bf16, through `sparselm.bench.generation.compare_generation(device="cuda")`: prefill
and decode tokens/s, weight memory, peak allocated memory and energy (NVML) of dense vs 2:4,
in two runtimes (`--runtimes`): sparselm's lean loop, whose prefill and decode steps run as
CUDA graphs on a GPU (`LeanDecoder`), and the transformers forward, eager. Eagerly every 2:4
product pays a CPU set-up before its kernel is queued: the eager section times one 4096x4096
product per call (wall time, and the time to enqueue it alone) for dense, the semi-structured
`F.linear` and `torch._cslt_sparse_mm` called directly. Measured on an H200 with PyTorch 2.11: 0.7-0.9 ms per 2:4 call against about 25 us
dense, so end to end the 2:4 model was 0.16x dense at batch 1: the kernels only pay inside CUDA
graphs, at prefill-sized products (see benchmarks/RESULTS.md).

    python benchmarks/bench_semi_structured.py              # layers + end to end (GPU, ~3 min)
    python benchmarks/bench_semi_structured.py --quick      # one shape, fewer batches, small model
    python benchmarks/bench_semi_structured.py --no-e2e
    python benchmarks/bench_semi_structured.py --no-layers --runtimes lean   # end to end in CUDA graphs only

Prints Markdown tables, then one JSON line. Without a CUDA GPU it says so in that JSON line and
exits 0 (the CPU kernels are measured by bench_kernels.py and bench_generation.py).
"""
import argparse
import json
import math
import statistics
import sys

import torch
import torch.nn.functional as F

from sparselm.bench.generation import tensor_bytes

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
BATCHES = (1, 16, 128, 1024, 4096, 16384)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
L2_FLUSH_BYTES = 256 * 2**20  # H100/H200 L2 is 50-60 MB: cycle through >= 4x that


def two_four(weight: torch.Tensor) -> torch.Tensor:
    """The weight with the 2 smallest-magnitude entries of every 4 consecutive inputs zeroed."""
    from sparselm.prune.masks import nm_mask

    return weight * nm_mask(weight.abs().float(), 2, 4)


def sparse_backends() -> dict:
    """name -> function(dense 2:4 weight) -> semi-structured tensor, for the layouts available."""
    import torch.sparse as ts

    backends = {}
    if getattr(torch.backends, "cusparselt", None) is not None and torch.backends.cusparselt.is_available():
        backends["cusparselt"] = ts.SparseSemiStructuredTensorCUSPARSELT.from_dense
    if hasattr(ts, "SparseSemiStructuredTensorCUTLASS"):
        backends["cutlass"] = ts.SparseSemiStructuredTensorCUTLASS.from_dense
    return backends


class GraphTimer:
    """Time `fn(i)` for i over the weight copies: captured once in a CUDA graph that runs every
    copy `laps` times, replayed; microseconds per call. Falls back to eager if capture fails."""

    def __init__(self, fn, copies: int, laps: int):
        self.fn, self.copies, self.laps, self.mode = fn, copies, laps, "graph"
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for i in range(copies):  # warm-up outside capture: workspaces, lazy init
                fn(i)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        try:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._body()
            self.graph.replay()
            torch.cuda.synchronize()
        except (RuntimeError, TypeError) as err:
            self.graph, self.mode = None, f"eager ({str(err).splitlines()[0][:80]})"
            torch.cuda.synchronize()

    def _body(self):
        for _ in range(self.laps):
            for i in range(self.copies):
                self.fn(i)

    def time_us(self) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        if self.graph is not None:
            self.graph.replay()
        else:
            self._body()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3 / (self.laps * self.copies)


def bench_layer(out_f: int, in_f: int, batch: int, dtype: torch.dtype, backends: dict, rounds: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(out_f * 31 + in_f)
    dense_bytes = out_f * in_f * torch.finfo(dtype).bits // 8
    copies = max(1, math.ceil(L2_FLUSH_BYTES / dense_bytes))
    weights = [two_four(torch.randn(out_f, in_f, device="cuda", dtype=dtype, generator=gen) / in_f ** 0.5)
               for _ in range(copies)]
    x = torch.randn(batch, in_f, device="cuda", dtype=dtype, generator=gen)
    row = {"shape": f"{out_f}x{in_f}", "dtype": str(dtype).removeprefix("torch."), "batch": batch,
           "copies": copies, "dense_bytes": dense_bytes}
    timers = {"dense": GraphTimer(lambda i: F.linear(x, weights[i]), copies, laps=max(1, 16 // copies))}
    expected = F.linear(x, weights[0]).float()
    for name, make in backends.items():
        try:
            sparse = [make(w) for w in weights]
            got = F.linear(x, sparse[0]).float()
        except (RuntimeError, NotImplementedError, ValueError) as err:
            row[f"{name}_error"] = str(err).splitlines()[0][:160]
            continue
        err = ((got - expected).norm() / expected.norm()).item()
        row[f"{name}_rel_error"] = err
        if err > 2e-2:
            row[f"{name}_error"] = f"output differs from the dense masked product (relative error {err:.3g})"
            continue
        row[f"{name}_bytes"] = tensor_bytes(sparse[0])
        timers[name] = GraphTimer(lambda i, s=sparse: F.linear(x, s[i]), copies, laps=max(1, 16 // copies))
    times = {name: [] for name in timers}
    for _ in range(rounds):  # interleaved: clocks and neighbours drift alike for all
        for name, timer in timers.items():
            times[name].append(timer.time_us())
    for name, samples in times.items():
        row[f"{name}_us"] = statistics.median(samples)
        row[f"{name}_mode"] = timers[name].mode
    row["dense_tflops"] = 2 * batch * out_f * in_f / row["dense_us"] / 1e6
    row["dense_gb_s"] = (dense_bytes + 2 * batch * (in_f + out_f)) / row["dense_us"] / 1e3
    for name in backends:
        if f"{name}_us" in row:
            row[f"{name}_speedup"] = row["dense_us"] / row[f"{name}_us"]
            ceiling = dense_bytes / row[f"{name}_bytes"]
            row[f"{name}_bytes_ceiling"] = ceiling
            row[f"{name}_ceiling_fraction"] = row[f"{name}_speedup"] / ceiling
    del weights, timers
    torch.cuda.empty_cache()
    return row


def layer_table(rows: list, backends: list) -> str:
    head = "| shape | dtype | batch | dense us | dense TFLOP/s | dense GB/s | " + \
        " | ".join(f"{b} us | {b} vs dense" for b in backends) + " |"
    lines = [head, "|" + " --- |" * (6 + 2 * len(backends))]
    for r in rows:
        cells = [r["shape"], r["dtype"], str(r["batch"]), f"{r['dense_us']:.1f}", f"{r['dense_tflops']:.0f}",
                 f"{r['dense_gb_s']:.0f}"]
        for b in backends:
            if f"{b}_us" in r:
                cells += [f"{r[b + '_us']:.1f}", f"{r[b + '_speedup']:.2f}x"]
            else:
                cells += ["n/a", r.get(f"{b}_error", "-")[:40]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def eager_overhead(tokens=(1, 512, 8192), calls: int = 200) -> list:
    """Per-call wall time and enqueue time (no waiting for the GPU) of one eager 4096x4096 bf16
    product: dense, semi-structured F.linear, and torch._cslt_sparse_mm directly."""
    import time

    from torch.sparse import to_sparse_semi_structured

    def per_call(fn, wait: bool) -> float:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if wait:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        torch.cuda.synchronize()
        return elapsed / calls * 1e6

    torch.manual_seed(0)
    weight = two_four(torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16))
    sparse = to_sparse_semi_structured(weight)
    rows = []
    for t in tokens:
        x = torch.randn(t, 4096, device="cuda", dtype=torch.bfloat16)
        fns = {"dense": lambda: F.linear(x, weight), "2:4 F.linear": lambda: F.linear(x, sparse)}
        packed = getattr(sparse, "packed", None)
        if packed is not None and hasattr(torch, "_cslt_sparse_mm"):
            try:
                torch._cslt_sparse_mm(packed, x.t())
                fns["_cslt_sparse_mm"] = lambda: torch._cslt_sparse_mm(packed, x.t())
            except Exception:  # noqa: BLE001 - cuSPARSELt refuses some shapes (one token): leave it out
                pass
        for name, fn in fns.items():
            rows.append({"tokens": t, "call": name, "wall_us": per_call(fn, True), "enqueue_us": per_call(fn, False)})
    return rows


def random_llama_two_four(hidden: int, layers: int, intermediate: int, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, vocab_size=32000,
                      max_position_embeddings=4096)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():
        for module in model.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(two_four(module.weight))
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one shape, batches 1/128/4096, a 2-layer model")
    parser.add_argument("--no-e2e", action="store_true", help="layers only")
    parser.add_argument("--no-layers", action="store_true", help="end to end (and the eager-call costs) only")
    parser.add_argument("--runtimes", default="lean,transformers",
                        help="end-to-end runtimes, comma-separated: lean (sparselm's decode loop, every step a "
                             "CUDA graph) and/or transformers (the model's own forward, eager)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds per layer row (median)")
    parser.add_argument("--dtypes", default="bf16,fp16")
    parser.add_argument("--e2e-shape", default="4096x8", help="HIDDENxLAYERS of the end-to-end Llama")
    parser.add_argument("--e2e-batches", default="1,16", help="decode batch sizes end to end")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    try:
        hidden, layers = (int(v) for v in ("1024x2" if args.quick else args.e2e_shape).lower().split("x"))
        e2e_batches = [int(b) for b in args.e2e_batches.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--e2e-shape takes HIDDENxLAYERS (e.g. 4096x8) and --e2e-batches comma-separated integers; "
                     f"got {args.e2e_shape!r} and {args.e2e_batches!r}")
    if hidden % 128 or layers < 1 or not e2e_batches or min(e2e_batches) < 1:
        parser.error(f"--e2e-shape {args.e2e_shape}: hidden must be a multiple of 128 (head dim) and layers >= 1; "
                     f"--e2e-batches must be >= 1")
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    if not runtimes or set(runtimes) - {"lean", "transformers"}:
        parser.error(f"--runtimes takes lean and/or transformers, comma-separated; got {args.runtimes!r}")
    if not torch.cuda.is_available():
        print("2:4 semi-structured kernels need a CUDA GPU and none is available here; the CPU sparse kernels "
              "are measured by bench_kernels.py and bench_generation.py")
        print(json.dumps({"benchmark": "semi_structured", "skipped": "no CUDA GPU"}))
        return 0
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        parser.error(f"--dtypes takes {', '.join(DTYPES)}; got {bad}")
    torch.backends.cuda.matmul.allow_tf32 = False
    backends = sparse_backends()
    shapes = [] if args.no_layers else SHAPES[:1] if args.quick else SHAPES
    batches = (1, 128, 4096) if args.quick else BATCHES
    print(f"# 2:4 semi-structured vs dense on {torch.cuda.get_device_name()} (PyTorch {torch.__version__}; "
          f"sparse layouts: {', '.join(backends) or 'none'})\n")
    rows = []
    for dtype_name in dtypes:
        for out_f, in_f in shapes:
            for batch in batches:
                rows.append(bench_layer(out_f, in_f, batch, DTYPES[dtype_name], backends, args.rounds))
                print(f"  {rows[-1]['shape']} {dtype_name} batch {batch}: dense {rows[-1]['dense_us']:.1f} us; " +
                      ", ".join(f"{b} {rows[-1][b + '_speedup']:.2f}x" for b in backends
                                if b + "_speedup" in rows[-1]), file=sys.stderr, flush=True)
    if rows:
        print(layer_table(rows, list(backends)))
        modes = sorted({r[k] for r in rows for k in r if k.endswith("_mode")})
        print(f"\ntiming: {', '.join(modes)}; median of {args.rounds} interleaved rounds; each row cycles through "
              f"enough weight copies to exceed {L2_FLUSH_BYTES >> 20} MiB (the L2 holds 50-60 MB)")
    best = {}
    for r in rows:
        for b in backends:
            if f"{b}_speedup" in r:
                key = f"{r['dtype']} batch {r['batch']}"
                best[key] = max(best.get(key, 0.0), r[f"{b}_speedup"])
    summary = {"benchmark": "semi_structured", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "backends": list(backends), "layers": rows, "best_speedup_by_dtype_batch": best}
    for b in backends:
        fractions = [r[f"{b}_ceiling_fraction"] for r in rows if r["batch"] == 1 and f"{b}_ceiling_fraction" in r]
        if fractions:
            summary[f"{b}_batch1_ceiling_fraction_median"] = statistics.median(fractions)
    if best:
        print("\nbest 2:4 speedup over dense per dtype and batch (over shapes and layouts: min..max):")
        for dtype_name in dtypes:
            dt = str(DTYPES[dtype_name]).removeprefix("torch.")
            for batch in batches:
                vals = [max(r.get(f"{b}_speedup", 0.0) for b in backends) for r in rows
                        if r["dtype"] == dt and r["batch"] == batch]
                print(f"  {dtype_name} batch {batch}: {min(vals):.2f}x..{max(vals):.2f}x")

    eager = eager_overhead((1, 512) if args.quick else (1, 512, 8192))
    summary["eager_per_call"] = eager
    print("\n# Eager calls (4096x4096 bf16): CPU cost per product before its kernel runs\n")
    print("| tokens | call | wall us per call | enqueue us per call |\n| --- | --- | ---: | ---: |")
    for r in eager:
        print(f"| {r['tokens']} | {r['call']} | {r['wall_us']:.1f} | {r['enqueue_us']:.1f} |")

    if not args.no_e2e:
        from sparselm.bench.generation import compare_generation, generation_table

        intermediate = 11008 if hidden == 4096 else int(hidden * 2.6875) // 64 * 64
        model = random_llama_two_four(hidden, layers, intermediate, torch.bfloat16)
        params = sum(p.numel() for p in model.parameters())
        summary["e2e"] = {"shape": f"{hidden}x{layers}", "intermediate": intermediate, "params": params, "runs": {}}
        for runtime, batch in ((r, b) for r in runtimes for b in e2e_batches):
            result = compare_generation(model, ("dense", "2:4"), batch_size=batch, prompt_len=args.prompt_len,
                                        new_tokens=args.new_tokens, repeats=args.repeats, progress=False,
                                        device="cuda", runtime=runtime)
            how = "CUDA graphs (lean loop)" if runtime == "lean" else "eager transformers forward"
            print(f"\n# End to end: random Llama {hidden}x{layers} ({params / 1e9:.2f}B params), bf16, 2:4 by "
                  f"magnitude, batch {batch}, {how}\n")
            print(generation_table(result))
            rows_e2e = {r["variant"]: r for r in result["results"]}
            if "2:4" in rows_e2e:
                d, s = rows_e2e["dense"], rows_e2e["2:4"]
                ratios = {"prefill": s["prefill_tokens_per_s"] / d["prefill_tokens_per_s"],
                          "decode": s["decode_tokens_per_s"] / d["decode_tokens_per_s"],
                          "weights": s["weight_bytes"] / d["weight_bytes"],
                          "gpu_peak": s["gpu_peak_allocated_mb"] / d["gpu_peak_allocated_mb"]}
                print(f"\n2:4 vs dense: prefill {ratios['prefill']:.2f}x, decode {ratios['decode']:.2f}x, "
                      f"weights {ratios['weights']:.2f}x, peak allocated {ratios['gpu_peak']:.2f}x")
                result["ratios"] = ratios
            summary["e2e"]["runs"][f"{runtime}/{batch}"] = result
        del model
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
