"""MoE dispatch speed: forward + backward of one MoE layer on CPU (or a GPU), fp32 and bf16.

Shapes from the issue: 4096 tokens, d=512, 8 experts top-2, expert hidden 1408.
Compared in the same run against
- the naive reference (every expert on every token, masked by the gates): the floor,
- one dense SwiGLU MLP with the same active parameters (hidden 2 x 1408 = 2816): the
  practical ceiling (`dense_swiglu`: PyTorch ops; `dense_fused`: the same MLP with the fused
  SwiGLU kernel the MoE path uses, so the ratio shows what dispatch costs, not what fusing saves),
- the Mixtral sparse MoE block of `transformers` (random init from `MixtralConfig`, its
  default experts implementation), same shapes.
Every step gets a new input, so routing, and with it each expert's row count, changes from step
to step as in training; each method first runs `--warmup` untimed steps (default 30; the
methods whose shapes never change, the naive reference and the dense MLPs, at most 3). oneDNN (PyTorch's bf16
matmuls on CPU) sets up each new matmul shape on first use, which costs about as much as the
product: sparselm pads expert groups so that shapes repeat (`matmul_rows` in
sparselm/moe/dispatch.py), Mixtral's block does not. `--fixed-routing` reuses one input, which
pays every set-up once and hides it.
Methods are timed in alternating rounds; each ratio is the median over rounds of the ratio of
two methods' times within a round (robust to the machine's speed drifting during the run), the
ms column the median time, and the interval column a distribution-free confidence interval for
the median time / dense (95% from 6 rounds on; fewer rounds give the full range and say what it
covers): a target of <= 1.0 holds in a run only where the interval's top is below 1. Freed
buffers of these sizes go back to the OS and page-fault in again on the next step; run with
`MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000` (glibc) to keep them, which is what a
tuned allocator (jemalloc, tcmalloc) gives, and the setting the process reports.
Prints a Markdown table, then one JSON line.

    python benchmarks/bench_moe_dispatch.py [--tokens 4096] [--rounds 7] [--threads N] [--warmup 30] [--fixed-routing]
                                           [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from sparselm.bench.timing import alternating_rounds, median_ratio, ratio_interval
from sparselm.cli.common import resolve_device
from sparselm.errors import SparselmError
from sparselm.moe.experts import SharedSwiGLU, grouped_mm_available
from sparselm.moe.fused import SwiGLUFn
from sparselm.moe.layer import MoEConfig, MoELayer


class FusedDenseSwiGLU(torch.nn.Module):
    """The dense baseline with the MoE path's fused SwiGLU kernel (same weights): shows how
    much of the MoE's ratio comes from fusing the activation rather than from dispatch."""

    def __init__(self, dense: SharedSwiGLU):
        super().__init__()
        self.dense = dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense.down(SwiGLUFn.apply(self.dense.gate_up(x).flatten(0, -2))).view_as(x)


def build_candidates(dim: int, hidden: int, experts: int, top_k: int, dtype: torch.dtype,
                     device: str = "cpu") -> dict:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    candidates = {}
    for method in ("naive", "sorted", "grouped_mm"):
        if method == "grouped_mm" and not grouped_mm_available(device, dtype):
            continue
        cfg = MoEConfig(hidden_size=dim, expert_hidden=hidden, num_experts=experts, top_k=top_k, dispatch=method)
        candidates[f"moe_{method}"] = MoELayer(cfg).to(dtype)
    # Same weights for all three of ours, so they route identically.
    state = candidates["moe_sorted"].state_dict()
    for layer in candidates.values():
        layer.load_state_dict(state)
    candidates["dense_swiglu"] = SharedSwiGLU(dim, top_k * hidden).to(dtype)
    candidates["dense_fused"] = FusedDenseSwiGLU(candidates["dense_swiglu"])
    mixtral_cfg = MixtralConfig(hidden_size=dim, intermediate_size=hidden, num_local_experts=experts,
                                num_experts_per_tok=top_k, router_jitter_noise=0.0)
    mixtral = MixtralSparseMoeBlock(mixtral_cfg).to(dtype)
    with torch.no_grad():  # parameters start uninitialised (torch.empty): give them our weights
        mixtral.gate.weight.copy_(candidates["moe_sorted"].router.weight)
        mixtral.experts.gate_up_proj.copy_(candidates["moe_sorted"].experts.gate_up_E2FD)
        mixtral.experts.down_proj.copy_(candidates["moe_sorted"].experts.down_EDF)
    candidates["mixtral_hf"] = mixtral
    return {name: module.to(device) for name, module in candidates.items()}


def step(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = module(x)
    out.backward(grad)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FIXED_SHAPE_METHODS = ("moe_naive", "dense_swiglu", "dense_fused")  # same matmul shapes every step


def fresh_inputs(seed: int, tokens: int, dim: int, dtype: torch.dtype, device: str = "cpu"):
    """An endless stream of new [1, T, D] inputs (untimed): every step routes differently,
    as in training, so the experts' row counts change from step to step."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn(1, tokens, dim, generator=gen).to(device, dtype)


def bench_dtype(args, dtype: torch.dtype) -> dict[str, list[float]]:
    candidates = build_candidates(args.dim, args.hidden, args.experts, args.top_k, dtype, args.device)
    torch.manual_seed(1)
    grad = torch.randn(1, args.tokens, args.dim, dtype=dtype).to(args.device)
    streams = {}
    for i, (name, module) in enumerate(candidates.items()):  # warm-up (allocator, oneDNN primitives)
        streams[name] = fresh_inputs(1000 * i, args.tokens, args.dim, dtype, args.device)
        fixed_shapes = name in FIXED_SHAPE_METHODS
        for _ in range(min(args.warmup, 3) if fixed_shapes else args.warmup):
            step(module, next(streams[name]), grad)
    if args.fixed_routing:  # the same input every step: per-shape set-up costs paid once
        fixed = next(fresh_inputs(1, args.tokens, args.dim, dtype, args.device))
        streams = {name: iter(lambda: fixed, None) for name in candidates}
    samples = alternating_rounds({name: (lambda m=module, s=streams[name]: step(m, next(s), grad))
                                  for name, module in candidates.items()}, args.rounds)
    return {name: [v * 1e3 for v in t] for name, t in samples.items()}


def _where(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU, {torch.get_num_threads()} threads"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=1408)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--warmup", type=int, default=30,
                        help="untimed steps per method first (default 30: a training run's steady state, where "
                             "oneDNN has built its kernels for the row counts routing produces; at most 3 for the "
                             "methods of fixed shapes)")
    parser.add_argument("--dtypes", default="fp32,bf16",
                        help="comma-separated, of fp32 and bf16 (default both; bf16 matmuls are slow on CPUs "
                             "without native bf16 (AVX512-BF16 / AMX), where the bf16 run takes much longer)")
    parser.add_argument("--device", default="cpu",
                        help="cpu (the issue's target) or cuda: on a GPU each step ends in a synchronize")
    parser.add_argument("--fixed-routing", action="store_true",
                        help="time every step on the same input (default: a new input, so new routing, each step)")
    args = parser.parse_args(argv)
    unknown = [d for d in args.dtypes.split(",") if d not in DTYPES]
    if unknown:
        parser.error(f"unknown dtype(s) {unknown} in --dtypes; use fp32 and/or bf16")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:  # the CLI's device check: malformed names, CUDA without a GPU, GPU indices past the machine's
        args.device = resolve_device(args.device)
    except SparselmError as err:
        parser.error(str(err))

    results = {}
    print(f"MoE dispatch, forward+backward, T={args.tokens} D={args.dim} E={args.experts} "
          f"K={args.top_k} F={args.hidden}, dense F={args.top_k * args.hidden}, "
          f"{'fixed' if args.fixed_routing else 'new'} routing each step, {_where(args.device)}, torch {torch.__version__} (dense baseline: torch's default GEMM); "
          f"glibc MALLOC_MMAP_MAX_={os.environ.get('MALLOC_MMAP_MAX_', 'unset')}\n")
    print("| dtype | method | ms | speedup vs naive | time / dense | interval | time / dense_fused | time / mixtral_hf |")
    print("| --- | --- | ---: | ---: | ---: | --- | ---: | ---: |")
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        times = bench_dtype(args, dtype)
        results[dtype_name] = {}
        for name, ts in times.items():
            t = statistics.median(ts)
            low, high, coverage = ratio_interval(times, name, "dense_swiglu")
            row = {"ms": round(t, 2), "speedup_vs_naive": round(median_ratio(times, "moe_naive", name), 3),
                   "time_vs_dense": round(median_ratio(times, name, "dense_swiglu"), 3),
                   "time_vs_dense_interval": [round(low, 3), round(high, 3), round(coverage, 3)],
                   "time_vs_dense_fused": round(median_ratio(times, name, "dense_fused"), 3),
                   "time_vs_mixtral": round(median_ratio(times, name, "mixtral_hf"), 3)}
            results[dtype_name][name] = row
            print(f"| {dtype_name} | {name} | {t:.1f} | {row['speedup_vs_naive']:.2f}x | "
                  f"{row['time_vs_dense']:.2f} | {low:.2f}-{high:.2f} ({coverage:.0%}) | "
                  f"{row['time_vs_dense_fused']:.2f} | {row['time_vs_mixtral']:.2f} |")
    summary = {"benchmark": "moe_dispatch", "tokens": args.tokens, "dim": args.dim, "experts": args.experts,
               "top_k": args.top_k, "hidden": args.hidden, "threads": torch.get_num_threads(),
               "device": _where(args.device), "fixed_routing": args.fixed_routing, "warmup": args.warmup, "rounds": args.rounds,
               "malloc_mmap_max": os.environ.get("MALLOC_MMAP_MAX_"), "results": results}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
