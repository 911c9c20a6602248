"""Reused CPU buffers for the MoE layer's large tensors.

PyTorch's CPU allocator takes large tensors from malloc and gives them back on free, and
glibc returns blocks of tens of MB to the OS, so every fresh one is paged in again and
zero-filled by the kernel. On a 2-core VM a fresh 46 MB tensor took 13 ms to fill against
0.5 ms for a reused one, and a bf16 MoE training step at the issue's dispatch shapes
(benchmarks/bench_moe_dispatch.py) took ~25,000 page faults (~100 MB) a step; with its large
tensors reused, ~2,300, and the step 0.91x the time (same process, alternating). Two kinds
of reuse:

- `reusable(name, shape, like)`: a tensor that may leave the caller (saved for backward,
  returned as an output or a gradient). It reuses the storage of an earlier tensor of the
  same name and dtype only when nothing else holds that storage any more (PyTorch's storage
  use count: no view, no saved tensor, no gradient, no user reference), so a kept graph, a
  retained graph or two forwards before one backward each get their own storage. Up to
  `KEEP` storages per name and dtype, per thread.
- `workspace(numel, dtype, device)`: scratch memory for one call that never escapes it
  (the no-grad expert loop), one growing buffer per thread, dtype and device.

Both allocate normally off the CPU (caching allocators) and `release_buffers()` frees what
this thread keeps.
"""
from __future__ import annotations

import math
import threading

import torch

KEEP = 8  # storages kept per (name, dtype): e.g. one per MoE layer of a small model
WORKSPACE_MAX_BYTES = 64 << 20

_use_count_fn = getattr(torch._C, "_storage_Use_Count", None)
_local = threading.local()


def _use_count(t: torch.Tensor) -> int:
    return _use_count_fn(t.untyped_storage()._cdata)


def _unshared_count() -> int | None:
    """The use count this module reads for a storage held by one tensor alone (None: the
    private PyTorch function is missing, and nothing is reused)."""
    if _use_count_fn is None:
        return None
    try:
        alone = torch.empty(1)
        count = _use_count(alone)
        view = alone.view(1)
        if _use_count(alone) != count + 1:  # the count must see views, or reuse is unsafe
            return None
        del view
        return count
    except Exception:  # noqa: BLE001 - a changed private API disables reuse, nothing more
        return None


_UNSHARED = _unshared_count()


def _pools() -> dict:
    pools = getattr(_local, "pools", None)
    if pools is None:
        pools = _local.pools = {}
    return pools


def reusable(name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of `shape` with `like`'s dtype and device; on the CPU, in the
    storage of an earlier one of the same name and dtype whose every user is gone (see the module
    docstring). Row counts change from step to step (padded expert groups), so a storage serves
    any request that fits it, and the tensor may sit at the start of a larger storage; a free
    storage too small for the request is replaced by one that fits."""
    shape = tuple(shape)
    if like.device.type != "cpu" or _UNSHARED is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    numel = math.prod(shape)
    kept = _pools().setdefault((name, like.dtype), [])
    free = [i for i, base in enumerate(kept) if _use_count(base) == _UNSHARED]
    fitting = [i for i in free if kept[i].numel() >= numel]
    if fitting:  # the smallest that fits (an exact fit for fixed shapes, e.g. weight gradients)
        base = kept[min(fitting, key=lambda i: kept[i].numel())]
        return base[:numel].view(shape)  # a new tensor on the storage: while it lives, the count is up
    with torch.inference_mode(False):  # usable inside and outside inference mode alike
        base = torch.empty(numel, dtype=like.dtype)
    if free:
        kept[free[0]] = base  # free, and too small: drop it for the new one
    elif len(kept) < KEEP:
        kept.append(base)
    return base.view(shape)


def workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A scratch buffer of `numel` elements, reused across calls on CPU up to 64 MiB.

    For memory that never leaves one call (nothing checks who else uses it). Buffers of a few
    MB freed by one forward are often returned to the OS and paged back in by the next:
    measured up to ~2400 faults (~10 MB) per call of the small Llama's MoE layer, which cost
    more than its whole routing. Kept per thread, dtype and device, grown to the largest
    request; larger requests (big batches, where the faults are small next to the matmuls) and
    other devices allocate normally. Made outside inference mode so that a buffer first used
    under `torch.inference_mode()` can still be written under `torch.no_grad()`.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or numel * itemsize > WORKSPACE_MAX_BYTES:
        return torch.empty(numel, dtype=dtype, device=device)
    cache = getattr(_local, "workspaces", None)
    if cache is None:
        cache = _local.workspaces = {}
    buf = cache.get((dtype, device))
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):
            buf = cache[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def release_buffers() -> None:
    """Free the buffers this thread keeps (they are allocated again on next use)."""
    _local.pools = {}
    _local.workspaces = {}
