"""Sparse + quantized weights: perplexity and bytes per parameter on the built-in "small" model.

Variants, all from the same dense model, calibrated on the same seeded rows and scored on the
same held-out test windows (`perplexity(model, test_ids, 256, max_windows=64)`):

    dense                    fp32 weights (counted at bf16, 2 bytes per parameter)
    sparsegpt 50%            SparseGPT, stored as bitmask + bf16 non-zeros
    int4 rtn                 round-to-nearest, groups of 128, packed two codes per byte
    int4 gptq                GPTQ, groups of 128
    sparsegpt 50% -> rtn     prune, then round the kept weights (no joint compensation)
    sparsegpt 50% + int4     SparseGPT's joint pass (prune and quantize in one loop), packed
                             as QuantSparseLinear (bitmask + non-zero int4 codes + fp16 scales)

Bytes per parameter cover the linear layers of the decoder blocks (the embedding and LM head
stay dense in every variant); `vs bf16` is the ratio to 2 bytes per parameter.
Target: sparse + int4 at 50% sparsity <= 0.35 of bf16 dense.

Usage: nice python benchmarks/bench_quant.py [--samples 32 --seq-len 256]
Prints a Markdown table, then one JSON line last.
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from sparselm.adapters import get_adapter, linear_weight
from sparselm.data import calibration, corpus_token_ids
from sparselm.evaluate import perplexity
from sparselm.prune import SparseGPT, sparsify
from sparselm.quant import GPTQ, RTN, SparseGPTQ, bytes_per_parameter, pack_quantized, quantize
from sparselm.zoo import load_builtin


def sparse_bf16_bytes(model) -> float:
    """Bytes per parameter of the block linears as bitmask + bf16 non-zeros (sparse-only storage)."""
    total, params = 0, 0
    for block in get_adapter(model).blocks(model):
        for mod in get_adapter(model).linear_layers(block).values():
            w = linear_weight(mod)
            total += (w.numel() + 7) // 8 + 2 * int((w != 0).sum())
            params += w.numel()
    return total / params


def block_sparsity(model) -> float:
    zeros, total = 0, 0
    for block in get_adapter(model).blocks(model):
        for mod in get_adapter(model).linear_layers(block).values():
            w = linear_weight(mod)
            zeros, total = zeros + int((w == 0).sum()), total + w.numel()
    return zeros / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    dense, tok = load_builtin("small")
    dense.eval()
    test_ids = corpus_token_ids(tok, None, "test")
    calib = calibration(tok, n=args.samples, seq_len=args.seq_len, seed=0)

    def ppl(model) -> float:
        return perplexity(model, test_ids, 256, max_windows=args.windows)

    rows = []

    def record(name, model, seconds, bpp, sparsity=None):
        p = ppl(model)
        rows.append({"variant": name, "perplexity": p,
                     "sparsity": block_sparsity(model) if sparsity is None else sparsity,
                     "bytes_per_param": bpp, "vs_bf16": bpp / 2, "seconds": seconds})
        print(f"  {name}: ppl {p:.3f}, {bpp:.3f} B/param, {seconds:.1f}s", flush=True)

    record("dense", dense, 0.0, 2.0)

    m = copy.deepcopy(dense)
    t0 = time.perf_counter()
    sparsify(m, SparseGPT(sparsity=0.5), calib, progress=False)
    sparse_seconds = time.perf_counter() - t0
    record("sparsegpt 50%", m, sparse_seconds, sparse_bf16_bytes(m))
    t0 = time.perf_counter()
    quantize(m, RTN(bits=4), progress=False)
    record("sparsegpt 50% -> int4 rtn", m, sparse_seconds + time.perf_counter() - t0,
           bytes_per_parameter(m)["bytes_per_parameter"])

    for name, config in (("int4 rtn", RTN(bits=4)), ("int4 gptq", GPTQ(bits=4)),
                         ("sparsegpt 50% + int4 (joint)", SparseGPTQ(sparsity=0.5, bits=4))):
        m = copy.deepcopy(dense)
        t0 = time.perf_counter()
        quantize(m, config, calib, progress=False)
        seconds = time.perf_counter() - t0
        sparsity = block_sparsity(m)
        if "joint" in name:
            with torch.no_grad():  # the packed model must give the same logits as the dequantized one
                probe = test_ids[:256].unsqueeze(0)
                before = m(probe).logits
                pack_quantized(m)
                assert torch.equal(m(probe).logits, before), "packed model differs from dequantized model"
        record(name, m, seconds, bytes_per_parameter(m)["bytes_per_parameter"], sparsity)

    base = rows[0]["perplexity"]
    print("\n## Sparse + quantized weights, built-in \"small\" model\n")
    print(f"calibration: {args.samples} x {args.seq_len} tokens; test: {args.windows} windows x 256 tokens; "
          f"bytes per parameter over the decoder blocks' linear layers\n")
    print("| variant | perplexity | ppl / dense | sparsity | bytes/param | vs bf16 dense | seconds |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['perplexity']:.3f} | {r['perplexity'] / base:.3f} | {r['sparsity']:.3f} | "
              f"{r['bytes_per_param']:.3f} | {r['vs_bf16']:.3f} | {r['seconds']:.1f} |")
    joint = rows[-1]
    print(f"\ntarget: sparse + int4 at 50% <= 0.35 of bf16 dense: {joint['vs_bf16']:.3f} "
          f"({'met' if joint['vs_bf16'] <= 0.35 else 'NOT met'})")
    print(json.dumps({"benchmark": "quant", "model": "small", "rows": rows,
                      "joint_vs_bf16": joint["vs_bf16"], "target_met": joint["vs_bf16"] <= 0.35}))


if __name__ == "__main__":
    main()
