"""CPU sparse kernels: CSR, bitmask, N:M and activation-sparse products (C++/OpenMP with a
pure-PyTorch fallback)."""
from sparselm.kernels.extension import extension_status, load_extension
from sparselm.kernels.ops import act_sparse_gemv, bitmask_matmul, csr_matmul, dense_gemv, nm_matmul

__all__ = [
    "act_sparse_gemv", "bitmask_matmul", "csr_matmul", "dense_gemv", "nm_matmul",
    "extension_status", "load_extension",
]
