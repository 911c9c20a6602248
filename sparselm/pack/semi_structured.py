"""2:4 semi-structured sparsity on NVIDIA GPUs (cuSPARSELt / CUTLASS through PyTorch).

`to_semi_structured(model)` converts every decoder-block linear whose weight is exactly 2:4
sparse (at most 2 non-zeros in each group of 4 consecutive inputs) into a weight held as
`torch.sparse.SparseSemiStructuredTensor`, so `F.linear` runs the sparse tensor-core kernels.
Layers PyTorch does not take (dtype other than fp16/bf16/int8/fp32 where supported, shapes
below the kernels' minimum tile, odd sizes, not 2:4) stay dense; the report names each one and
why. A trial product against the dense layer checks every conversion before it is kept.

There is no CPU path for these tensors in PyTorch: on CPU this raises a SparselmError that
points to `sparselm.pack.pack` (the CPU kernels) instead.

What it buys (benchmarks/bench_semi_structured.py, H200, PyTorch 2.11, bf16): inside a CUDA
graph the cuSPARSELt product is 1.26-1.47x faster than dense at 1024 tokens and more per
product (prefill), and 2-3.5x slower at 1-128 tokens (decode). Called eagerly, every 2:4
product also costs 0.7-0.9 ms of CPU before its kernel is queued (cuSPARSELt's descriptors and
plan are set up per call), against about 25 us for a dense product, so a model run eagerly is
several times slower end to end: capture it in a CUDA graph (`torch.cuda.graphs`, as
`sparselm.bench.lean_decode.LeanDecoder` does on a GPU, or `torch.compile(mode="reduce-overhead")`).
Converted layers return row-major outputs (see `_contiguous_output`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from sparselm.errors import SparselmError
from sparselm.pack.formats import nm_violations

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.int8)


@dataclass
class SemiStructuredReport:
    converted: list[str] = field(default_factory=list)
    kept_dense: dict[str, str] = field(default_factory=dict)  # layer -> reason

    def table(self) -> str:
        lines = ["| layer | 2:4 sparse kernel | reason kept dense |", "| --- | --- | --- |"]
        lines += [f"| {name} | yes | |" for name in self.converted]
        lines += [f"| {name} | no | {why} |" for name, why in self.kept_dense.items()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def is_two_four(weight: torch.Tensor) -> bool:
    """True when every group of 4 consecutive inputs of every row has at most 2 non-zeros."""
    return weight.dim() == 2 and weight.shape[1] % 4 == 0 and nm_violations(weight, 2, 4) == 0


def unsupported_reason(weight: torch.Tensor) -> str | None:
    """Why this weight cannot use the semi-structured kernels, or None if it can be tried."""
    if weight.device.type != "cuda":
        return "not on a CUDA device"
    if weight.dtype not in SUPPORTED_DTYPES:
        return f"dtype {weight.dtype} is not supported (use fp16 or bf16)"
    rows, cols = weight.shape
    # The CUTLASS/cuSPARSELt kernels need both sizes to be multiples of the tile (64 for 16-bit
    # types here, 128 for int8 and fp32 is the conservative common bound).
    tile = 64 if weight.dtype in (torch.float16, torch.bfloat16) else 128
    if rows % tile or cols % tile:
        return f"shape {rows}x{cols} is not a multiple of {tile}"
    if not is_two_four(weight):
        return "weight is not 2:4 sparse (prune with pattern '2:4' first)"
    return None


def to_semi_structured(model: nn.Module, check_batch: int = 8) -> SemiStructuredReport:
    """Convert the 2:4-sparse decoder-block linears of a CUDA model in place (see module doc).

    Each converted layer is checked once: its output on a random batch of `check_batch` rows
    must match the dense layer (fp16/bf16 tolerance) or the layer stays dense.
    """
    if not torch.cuda.is_available():
        raise SparselmError("2:4 semi-structured kernels need a CUDA GPU and none is available; "
                            "on CPU use sparselm.pack.pack(model, format='nm') instead")
    from torch.sparse import to_sparse_semi_structured

    from sparselm.pack.auto import packable_layers

    report = SemiStructuredReport()
    for name, module in packable_layers(model).items():
        if not isinstance(module, nn.Linear):
            report.kept_dense[name] = f"{type(module).__name__} layers are not converted (only nn.Linear)"
            continue
        weight = module.weight.detach()
        reason = unsupported_reason(weight)
        if reason is not None:
            report.kept_dense[name] = reason
            continue
        x = torch.randn(check_batch, weight.shape[1], device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            expected = module(x)
            try:
                sparse = to_sparse_semi_structured(weight)
                got = nn.functional.linear(x, sparse, module.bias)
            except (RuntimeError, NotImplementedError, ValueError) as err:
                report.kept_dense[name] = f"PyTorch refused it: {str(err).splitlines()[0][:120]}"
                continue
        tol = 1e-2 if weight.dtype in (torch.float16, torch.bfloat16) else 1e-4
        if not torch.allclose(got.float(), expected.float(), rtol=tol, atol=tol * 10):
            report.kept_dense[name] = "sparse kernel output did not match the dense layer"
            continue
        module.weight = nn.Parameter(sparse, requires_grad=False)
        module.register_forward_hook(_contiguous_output)
        report.converted.append(name)
    return report


def _contiguous_output(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of converted layers: a row-major [..., tokens, out] output.

    PyTorch's semi-structured product computes W x^T and returns its transpose as a view, so
    for more than one token the output's last dimension is strided. Attention over q/k/v taken
    from such a view cannot use the flash or memory-efficient kernels (their last dimension must
    be contiguous): SDPA falls back to its math path, which materialises every [tokens, tokens]
    score matrix. Measured on an H200 (PyTorch 2.11, Llama 4096x8, bf16, CUDA graphs): prefill
    of the 2:4 model at 0.60x, 0.34x and 0.21x of dense for 512, 2048 and 4000 tokens while each
    of its products alone ran 0.8-1.5x of dense. The copy costs one pass over the output; a
    single token's output is contiguous already and is returned as it is."""
    return output.contiguous()
