"""Encoders of the packed weight formats (the decoders live in `sparselm.kernels.reference`).

All encoders take a dense weight W [N, K] (N = out_features, K = in_features) whose zeros
are the pruned entries, and return a dict of tensors on W's device; values keep W's dtype.
The formats and their layouts are documented in `sparselm.kernels.reference`. Guarantee for
every format: decoding the result gives back W exactly (zeros stay zeros, every other entry
bit-identical).
"""
from __future__ import annotations

import torch

from sparselm.errors import SparselmError

FORMATS = ("csr", "bitmask", "nm")
_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.int16)


CSR_INT16_MAX_IN_FEATURES = 32768


def csr_index_dtype(in_features: int) -> torch.dtype:
    """int16 column indices up to 32768 inputs (every common LLM width), else int32.

    The decode kernel is bound by the bytes it streams: int16 columns make a stored fp32
    weight 6 bytes instead of 8 (bf16: 4 instead of 6). int64 columns were measured up to 3.6x
    slower than int32."""
    if in_features >= 2**31:
        raise SparselmError(f"csr: in_features {in_features} does not fit int32 column indices")
    return torch.int16 if in_features <= CSR_INT16_MAX_IN_FEATURES else torch.int32


def pack_csr(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """CSR with int64 row pointers and int16/int32 column indices (see `csr_index_dtype`)."""
    keep = weight != 0  # [N, K]
    index_dtype = csr_index_dtype(weight.shape[1])
    counts = keep.sum(dim=1)  # [N]
    crow = torch.zeros(weight.shape[0] + 1, dtype=torch.int64, device=weight.device)
    crow[1:] = torch.cumsum(counts, dim=0)
    cols = torch.nonzero(keep, as_tuple=True)[1].to(index_dtype)  # [nnz], row-major order
    return {"crow_indices": crow, "col_indices": cols.contiguous(), "values": weight[keep].contiguous()}


def pack_bitmask(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """One bit per weight (rows padded to 64 columns) plus the non-zero values in row order."""
    n_out, k_in = weight.shape
    keep = weight != 0  # [N, K]
    k_pad = 64 * ((k_in + 63) // 64)  # whole 64-bit words: the kernel reads the mask a word at a time
    padded = torch.zeros(n_out, k_pad, dtype=torch.bool, device=weight.device)
    padded[:, :k_in] = keep
    bits = padded.reshape(n_out, k_pad // 8, 8).to(torch.int16)  # [N, R, 8]
    mask = (bits * _BIT_WEIGHTS.to(weight.device)).sum(dim=-1).to(torch.uint8)  # [N, R]
    offsets = torch.zeros(n_out + 1, dtype=torch.int64, device=weight.device)
    offsets[1:] = torch.cumsum(keep.sum(dim=1), dim=0)
    return {"mask": mask.contiguous(), "row_offsets": offsets, "values": weight[keep].contiguous()}


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """Number of groups of m consecutive inputs (per row) holding more than n non-zeros."""
    n_out, k_in = weight.shape
    k_pad = m * ((k_in + m - 1) // m)
    keep = torch.zeros(n_out, k_pad, dtype=torch.bool, device=weight.device)
    keep[:, :k_in] = weight != 0
    return int((keep.reshape(n_out, -1, m).sum(dim=-1) > n).sum())


def pack_nm(weight: torch.Tensor, n: int = 2, m: int = 4, name: str = "layer") -> dict[str, torch.Tensor]:
    """N:M compressed: per group of m inputs, n values and their in-group indices (uint8).

    Raises SparselmError naming `name` when a group has more than n non-zeros.
    """
    if not (0 < n <= m <= 256):
        raise SparselmError(f"{name}: invalid N:M pattern {n}:{m}; need 0 < n <= m <= 256")
    bad = nm_violations(weight, n, m)
    if bad:
        raise SparselmError(
            f"{name}: the weight is not {n}:{m} sparse ({bad} groups of {m} hold more than {n} "
            f"non-zeros); prune it with pattern '{n}:{m}' first or pack it as 'csr' or 'bitmask'")
    n_out, k_in = weight.shape
    groups = (k_in + m - 1) // m
    padded = torch.zeros(n_out, groups * m, dtype=weight.dtype, device=weight.device)
    padded[:, :k_in] = weight
    grouped = padded.reshape(n_out, groups, m)  # [N, G, m]
    keep = grouped != 0
    # Rank non-zeros first, in increasing column order; zeros after them.
    position_key = keep.to(torch.int32) * (m - torch.arange(m, device=weight.device, dtype=torch.int32))
    order = torch.topk(position_key, n, dim=-1, sorted=True).indices  # [N, G, n]
    chosen_kept = torch.gather(keep, -1, order)
    # Padding slots point at column 0 of their group, which always exists (also in a partial
    # last group), and carry the value 0.
    order = torch.where(chosen_kept, order, torch.zeros_like(order))
    values = torch.where(chosen_kept, torch.gather(grouped, -1, order), torch.zeros((), dtype=weight.dtype))
    return {
        "indices": order.reshape(n_out, groups * n).to(torch.uint8).contiguous(),
        "values": values.reshape(n_out, groups * n).contiguous(),
    }


def packed_nbytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes the packed tensors occupy (what a decode step streams from memory)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())
