"""`sparselm bench MODEL`: prefill/decode speed, memory, bandwidth, FLOPs, energy; dense vs packed."""
from __future__ import annotations

import argparse
import os


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="measure generation speed and memory, dense vs packed variants")
    p.add_argument("model", help="a local HF model folder, a packed folder, or a built-in name (tiny, small)")
    p.add_argument("--variants", default=None,
                   help="comma-separated: dense, auto, csr, bitmask, nm, 2:4 (default on CPU: dense and the CPU "
                        "formats, nm only if 2:4; on CUDA: dense and 2:4, PyTorch's semi-structured kernels)")
    p.add_argument("--device", default="cpu",
                   help="where the model runs: cpu (default; sparselm's kernels) or cuda (dense vs 2:4)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="cast the model first (default: as loaded; the 2:4 kernels want bf16 or fp16)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens to decode (default 64)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; the best is reported, the median too (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--runtime", choices=("transformers", "lean"), default="transformers",
                   help="decode through the model's own forward (default) or sparselm's lean loop "
                        "(same modules, preallocated cache; Llama-family models; on a GPU every step a CUDA graph)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON line")
    p.set_defaults(func=run)


def _restart_with_passive_openmp() -> None:
    """Re-run this command with OMP_WAIT_POLICY=passive unless it is set.

    OpenMP reads the variable once, at start-up. With busy-waiting threads, any other process
    on the same cores makes every parallel region wait for a descheduled spinner: timings of
    dense and sparse kernels alike were 5-10x slower on a shared 2-core machine.
    """
    import os
    import sys

    if "OMP_WAIT_POLICY" in os.environ:
        return
    launched_from_cli = os.path.basename(sys.argv[0]) in ("sparselm", "__main__.py") and "bench" in sys.argv[1:]
    if not launched_from_cli:  # called as a function (tests, notebooks): cannot restart
        return
    os.environ["OMP_WAIT_POLICY"] = "passive"
    os.execv(sys.executable, [sys.executable, "-m", "sparselm", *sys.argv[1:]])


def run(args: argparse.Namespace) -> int:
    _restart_with_passive_openmp()
    import torch

    from sparselm.bench.generation import compare_generation, generation_table
    from sparselm.cli.common import resolve_device
    from sparselm.io import load

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model, _ = load(args.model)
    if args.dtype:
        model = model.to({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype])
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    summary = compare_generation(model, variants, batch_size=args.batch_size, prompt_len=args.prompt_len,
                                 new_tokens=args.new_tokens, repeats=args.repeats, progress=not args.json,
                                 runtime=args.runtime, device=device)
    summary["model"] = str(args.model)
    summary["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    if args.json:
        from sparselm.cli.common import print_json

        print_json(summary)
    else:
        print(generation_table(summary))
        two_four = any(r["variant"] == "2:4" for r in summary["results"])
        if two_four and args.runtime != "lean":
            print("The 2:4 variant runs eagerly here: PyTorch sets cuSPARSELt up on every sparse product (measured "
                  "0.5-0.9 ms of CPU per call on an H200 with PyTorch 2.11), so its decode is launch-bound. "
                  "--runtime lean runs every prefill and decode step as a CUDA graph.")
        elif two_four:
            print("Under CUDA graphs the 2:4 products pay from about 1000 tokens per product; at decode sizes "
                  "cuSPARSELt is 2-3.5x slower than dense per product (H200, PyTorch 2.11; "
                  "benchmarks/bench_semi_structured.py), so 2:4 decodes slower and buys memory there.")
        if (summary["omp_wait_policy"] or "").lower() == "passive" and torch.get_num_threads() > 1:
            print("OpenMP threads sleep between parallel regions here (OMP_WAIT_POLICY=passive, robust on "
                  "shared cores), so multi-threaded decoding pays a wake-up per parallel region at small batch "
                  "(per layer; per token in the lean runtime's one-region step for dense, bitmask and CSR layers); "
                  "on a dedicated machine also run with OMP_WAIT_POLICY=active, or --threads 1, before comparing.")
    return 0
