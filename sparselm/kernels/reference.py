"""Pure-PyTorch reference semantics of the packed formats, and the fallback when the C++
extension is unavailable.

The three formats (B = batch, K = in_features, N = out_features, S = stored slots per row):

- CSR: `crow_indices` int64 [N + 1], `col_indices` int16 or int32 [nnz], `values` [nnz]; row r holds
  the slots crow[r]..crow[r+1]-1 in increasing column order.
- bitmask: `mask` uint8 [N, R] with R = 8 * ceil(K / 64) (bit t of byte j marks column
  8j + t; padding bits are 0), `row_offsets` int64 [N + 1] and `values` [nnz]: the non-zeros
  of each row in column order, rows one after another.
- N:M: `values` [N, S] and `indices` uint8 [N, S] with S = ceil(K / m) * n; slot s belongs to
  group s // n and sits at column (s // n) * m + indices[s]. Groups with fewer than n
  non-zeros are padded with value 0 at in-group index 0.

Every `dense_from_*` returns the [N, K] weight in the dtype of the values; the fallbacks
compute in fp32 and return fp32, like the C++ kernels.
"""
from __future__ import annotations

import torch

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def unpack_bits(mask: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 [N, R] bitmask -> bool [N, in_features]."""
    bits = (mask.unsqueeze(-1) & _BIT_WEIGHTS.to(mask.device)) != 0  # [N, R, 8]
    return bits.reshape(mask.shape[0], -1)[:, :in_features]


def dense_from_csr(crow_indices, col_indices, values, in_features: int, out_features: int) -> torch.Tensor:
    counts = (crow_indices[1:] - crow_indices[:-1]).long()  # [N]
    rows = torch.repeat_interleave(torch.arange(out_features, device=values.device), counts)  # [nnz]
    dense = torch.zeros(out_features, in_features, dtype=values.dtype, device=values.device)
    dense[rows, col_indices.long()] = values
    return dense


def dense_from_bitmask(mask, row_offsets, values, in_features: int, out_features: int) -> torch.Tensor:
    keep = unpack_bits(mask, in_features)  # [N, K]
    dense = torch.zeros(out_features, in_features, dtype=values.dtype, device=values.device)
    # Row-major boolean indexing visits the kept entries in exactly the packed order.
    dense[keep] = values
    return dense


def dense_from_nm(indices, values, n: int, m: int, in_features: int) -> torch.Tensor:
    out_features, slots = values.shape
    group_start = (torch.arange(slots, device=values.device) // n) * m  # [S]
    cols = group_start.unsqueeze(0) + indices.long()  # [N, S]
    dense = torch.zeros(out_features, in_features, dtype=values.dtype, device=values.device)
    # Padding slots carry value 0; scatter_add keeps them from overwriting a real value.
    dense.scatter_add_(1, cols, values)
    return dense


def dense_linear_fp32(x: torch.Tensor, dense_weight: torch.Tensor) -> torch.Tensor:
    """x [B, K] @ W.T in fp32 (the fallback of every format)."""
    return x.float() @ dense_weight.float().t()  # [B, N]


def act_sparse_gemv_reference(x: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """x [K] @ w_t [K, N], touching only the rows of w_t where x is non-zero (fp32 result)."""
    nz = torch.nonzero(x, as_tuple=True)[0]  # [k]
    return x[nz].float() @ w_t[nz].float()  # [N]
