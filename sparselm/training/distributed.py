"""The few torch.distributed pieces sparse training needs (DDP on gloo or NCCL).

Everything here is a no-op in a single process, so the same training code runs under
`python` and under `torchrun --nproc_per_node=2`.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialized process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel (or similar) wrapper."""
    return model.module if isinstance(getattr(model, "module", None), torch.nn.Module) else model


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Average `tensor` in place over all ranks (identity in a single process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


def broadcast_mask_(mask: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Make a bool mask identical on all ranks by copying rank `src`'s (in place)."""
    if is_distributed():
        as_bytes = mask.to(torch.uint8)  # gloo has no bool broadcast
        dist.broadcast(as_bytes, src=src)
        mask.copy_(as_bytes.bool())
    return mask


def init_from_environment() -> bool:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1).

    Uses NCCL when CUDA is available and gloo otherwise. Returns True if a group was joined.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True
