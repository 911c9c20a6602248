"""`pack(model, format="auto")`: swap each sparse linear layer for the fastest packed format.

For every prunable linear of the decoder blocks (never the embeddings or the LM head), "auto"
times dense and each packed format that applies (csr, bitmask, and nm when the layer is
already N:M sparse) on random inputs of the expected batch size, on this machine (interleaved
rounds, best of N), and keeps the fastest; dense wins unless a packed format is at least `margin` faster, so noise does not
swap layers for nothing. Choices are cached by (shape, sparsity bucket of 5%, dtype, batch,
threads, CPU, kernel sources) in memory and in `<sparselm cache>/pack/auto_choices.json`.

Before each timed call every core's L2 is flushed (a buffer of twice its size is written), so
the layer's weights come from the last-level cache, as in a decode step, where the other layers'
weights have evicted them from L1/L2 since the layer last ran. Timed hot (weights in L2), small
layers favour dense; that misjudged the small built-in model, whose packed decode is faster with
every layer packed. Models larger than the last-level cache stream their weights from memory,
where packing gains more (`benchmarks/bench_kernels.py` measures that case): the choice errs
towards dense there.
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from sparselm.cache import cache_dir
from sparselm.errors import SparselmError
from sparselm.pack import formats
from sparselm.pack.sparse_linear import SparseLinear, dense_weight_of

CHOICES = ("auto", "dense", "csr", "bitmask", "nm")
_memory_cache: dict[str, str] = {}


@dataclass
class LayerChoice:
    name: str
    shape: tuple[int, int]   # (out_features, in_features)
    sparsity: float
    dtype: str
    chosen: str              # "dense", "csr", "bitmask" or "nm"
    dense_bytes: int
    packed_bytes: int        # bytes of the chosen representation (dense_bytes if dense)
    ms: dict[str, float] = field(default_factory=dict)  # measured time per format (empty if cached/forced)


@dataclass
class PackReport:
    batch_size: int
    layers: list[LayerChoice]
    kernels: str

    @property
    def dense_bytes(self) -> int:
        return sum(layer.dense_bytes for layer in self.layers)

    @property
    def packed_bytes(self) -> int:
        return sum(layer.packed_bytes for layer in self.layers)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for layer in self.layers:
            out[layer.chosen] = out.get(layer.chosen, 0) + 1
        return out

    def table(self) -> str:
        """Markdown: one row per layer, with the timings that decided the choice."""
        lines = [f"pack: batch size {self.batch_size}, kernels: {self.kernels}", "",
                 "| layer | shape | sparsity | dtype | chosen | ms per format | bytes vs dense |",
                 "| --- | --- | --- | --- | --- | --- | --- |"]
        for layer in self.layers:
            ms = ", ".join(f"{k} {v:.3f}" for k, v in layer.ms.items()) or "(cached or forced)"
            lines.append(f"| {layer.name} | {layer.shape[0]}x{layer.shape[1]} | {layer.sparsity:.3f} | "
                         f"{layer.dtype} | {layer.chosen} | {ms} | "
                         f"{layer.packed_bytes / max(1, layer.dense_bytes):.3f} |")
        lines.append("")
        lines.append(f"weights of packed-eligible layers: {self.dense_bytes / 2**20:.2f} MiB dense -> "
                     f"{self.packed_bytes / 2**20:.2f} MiB ({self.packed_bytes / max(1, self.dense_bytes):.3f}x); "
                     f"choices: {self.counts()}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"batch_size": self.batch_size, "kernels": self.kernels, "dense_bytes": self.dense_bytes,
                "packed_bytes": self.packed_bytes, "counts": self.counts(),
                "layers": [layer.__dict__ | {"shape": list(layer.shape)} for layer in self.layers]}

    def __str__(self) -> str:
        return self.table()


LM_HEAD_MIN_ZEROS = 0.1  # fraction of zeros that marks the LM head as pruned


def packable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Fully qualified name -> linear module: the decoder blocks' linears, and the LM head when
    it was pruned (`lm_head=True`: at least `LM_HEAD_MIN_ZEROS` of it is zero; a dense head with
    a few stray zeros stays out) and is not tied to the input embedding."""
    from sparselm.adapters import get_adapter
    from sparselm.adapters.base import LINEAR_TYPES, linear_weight

    names = {id(mod): name for name, mod in model.named_modules()}
    adapter = get_adapter(model)
    found: dict[str, nn.Module] = {}
    for block in adapter.blocks(model):
        for module in adapter.linear_layers(block).values():
            if isinstance(module, LINEAR_TYPES) and id(module) in names:
                found[names[id(module)]] = module
    try:
        head = adapter.lm_head(model)
        sparse_head = isinstance(head, LINEAR_TYPES) and id(head) in names and not adapter.lm_head_tied(model) \
            and (linear_weight(head) == 0).float().mean().item() >= LM_HEAD_MIN_ZEROS
    except (AttributeError, SparselmError):  # an adapter that does not know them: blocks only
        sparse_head = False
    if sparse_head:
        found[names[id(head)]] = head
    return found


_TIMING = "l2-flushed"  # how candidates are timed: choices timed otherwise are not reused


def _choice_key(shape, sparsity: float, dtype: torch.dtype, batch: int, nm_ok: bool) -> str:
    bucket = round(sparsity * 20) / 20  # 5% buckets
    from sparselm.kernels.extension import extension_status, kernel_fingerprint

    return "|".join(str(p) for p in (shape[0], shape[1], f"{bucket:.2f}", str(dtype), batch, nm_ok,
                                     torch.get_num_threads(), platform.processor() or platform.machine(),
                                     extension_status(), kernel_fingerprint(), _TIMING))


def _disk_cache_path():
    return cache_dir("pack") / "auto_choices.json"


def _load_disk_cache() -> dict[str, str]:
    try:
        return json.loads(_disk_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _store_choice(key: str, choice: str) -> None:
    _memory_cache[key] = choice
    path = _disk_cache_path()
    data = _load_disk_cache()
    data[key] = choice
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".auto_choices.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=0, sort_keys=True)
    os.replace(tmp, path)  # atomic: concurrent readers see the old or the new file


def _time_candidates(modules: dict[str, nn.Module], x: torch.Tensor, budget_s: float = 0.05) -> dict[str, float]:
    """Best-of-N seconds per call for each module, timed in interleaved rounds, L2 flushed first.

    Interleaving makes a burst of load from another process hit every candidate alike, and the
    best of N is what the layer costs when it is not interrupted (as `timeit` advises). The
    flush (a write over twice each core's L2, split across the threads by PyTorch) is not timed.
    """
    from sparselm.bench.timing import cache_bytes

    flush = None
    if x.device.type == "cpu":
        flush = torch.zeros(2 * cache_bytes(2, 2 * 2**20) * max(1, torch.get_num_threads()) // 4)
    best = {name: float("inf") for name in modules}
    with torch.inference_mode():
        for module in modules.values():  # warm-up: lazy init, allocator
            module(x)
        rounds, started = 0, time.perf_counter()
        while rounds < 5 or (time.perf_counter() - started < budget_s and rounds < 100):
            for name, module in modules.items():
                if flush is not None:
                    flush.add_(1.0)
                start = time.perf_counter()
                module(x)
                best[name] = min(best[name], time.perf_counter() - start)
            rounds += 1
    return best


def pack(model: nn.Module, format: str = "auto", batch_size: int = 1, *, n: int = 2, m: int = 4,
         margin: float = 0.05, use_cache: bool = True, progress: bool = True) -> PackReport:
    """Replace the decoder blocks' linear layers of `model` (and a pruned, untied LM head) in
    place by packed SparseLinear.

    format: "auto" (fastest measured per layer), "dense" (change nothing), "csr", "bitmask" or
    "nm" (n:m, default 2:4; a layer that is not n:m sparse is an error naming it). Layers with
    no zeros stay dense under "auto". Returns a PackReport (`print(report)` shows the table).
    Outputs are unchanged up to fp32 summation order (each format equals the dense layer).
    """
    if format not in CHOICES:
        raise SparselmError(f"unknown pack format {format!r}; choose one of {', '.join(CHOICES)}")
    if batch_size < 1:
        raise SparselmError(f"batch_size must be >= 1, got {batch_size}")
    from tqdm.auto import tqdm

    from sparselm.kernels.extension import extension_status

    layers = packable_layers(model)
    disk = _load_disk_cache() if (use_cache and format == "auto") else {}
    report = PackReport(batch_size=batch_size, layers=[], kernels=extension_status())
    for name, module in tqdm(layers.items(), desc=f"pack ({format})", disable=not progress):
        weight = dense_weight_of(module)  # [N, K]
        shape = (weight.shape[0], weight.shape[1])
        sparsity = float((weight == 0).sum()) / weight.numel()
        dense_bytes = weight.numel() * weight.element_size()
        nm_ok = formats.nm_violations(weight, n, m) == 0
        candidates: dict[str, nn.Module] = {}
        timings: dict[str, float] = {}
        if format == "dense":
            chosen = "dense"
        elif format != "auto":
            chosen = format
            candidates[format] = SparseLinear.from_dense(module, format, n=n, m=m, name=name)
        elif sparsity == 0.0:
            chosen = "dense"
        else:
            key = _choice_key(shape, sparsity, weight.dtype, batch_size, nm_ok)
            chosen = _memory_cache.get(key) or disk.get(key)
            if chosen is None:
                fmts = ["csr", "bitmask"] + (["nm"] if nm_ok else [])
                for fmt in fmts:
                    candidates[fmt] = SparseLinear.from_dense(module, fmt, n=n, m=m, name=name)
                # [batch, 1, in]: the shape a decoder layer sees at a decode step.
                x = torch.randn(batch_size, 1, shape[1], dtype=weight.dtype, device=weight.device)
                timings = {k: v * 1e3 for k, v in _time_candidates({"dense": module, **candidates}, x).items()}
                best = min(candidates, key=lambda f: timings[f])
                chosen = best if timings[best] < (1.0 - margin) * timings["dense"] else "dense"
                if use_cache:
                    _store_choice(key, chosen)
            elif chosen != "dense":
                candidates[chosen] = SparseLinear.from_dense(module, chosen, n=n, m=m, name=name)
        packed_bytes = dense_bytes
        if chosen != "dense":
            new = candidates[chosen]
            packed_bytes = new.packed_nbytes()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        report.layers.append(LayerChoice(name, shape, sparsity, str(weight.dtype).replace("torch.", ""),
                                         chosen, dense_bytes, packed_bytes, timings))
    return report
