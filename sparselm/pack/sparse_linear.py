"""SparseLinear: a drop-in `nn.Linear` whose weight is stored in a packed sparse format.

`forward(x)` equals `F.linear(x, W, bias)` for the dense masked weight W it was packed from,
for any leading shape of x and for fp32 and bf16 (the product accumulates in fp32 and rounds
once, like PyTorch's CPU linear; `torch.testing.assert_close` holds). Inference only: no
gradient flows through the packed weight.

Formats: "csr" (int16 or int32 column indices), "bitmask" (1 bit per weight + packed values), "nm"
(N:M compressed: values + in-group indices; the layer must already be N:M sparse).
"""
from __future__ import annotations

import torch
from torch import nn

from sparselm.errors import SparselmError
from sparselm.kernels import ops, reference
from sparselm.kernels.extension import load_extension
from sparselm.pack import formats

_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
_BUFFERS = {
    "csr": ("crow_indices", "col_indices", "values"),
    "bitmask": ("mask", "row_offsets", "values"),
    "nm": ("indices", "values"),
}


def dense_weight_of(module: nn.Module) -> torch.Tensor:
    """The [out_features, in_features] weight of an nn.Linear or a transformers Conv1D (GPT-2)."""
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.detach().t()  # Conv1D stores [in, out]
    raise SparselmError(f"cannot pack a {type(module).__name__}: only nn.Linear and Conv1D layers are supported")


class SparseLinear(nn.Module):
    """y = x @ W.T + b with W held packed (see module docstring for the formats).

    Every batch size runs the sparse kernels. (Decoding the weight to dense and running the
    dense GEMM at prefill sizes was measured slower than the kernels at batch 128, see
    benchmarks/bench_kernels.py; `pack(format="auto")` keeps such layers dense instead.)
    """

    def __init__(self, in_features: int, out_features: int, format: str,
                 tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None,
                 n: int | None = None, m: int | None = None):
        super().__init__()
        if format not in _BUFFERS:
            raise SparselmError(f"unknown sparse format {format!r}; choose one of {sorted(_BUFFERS)}")
        missing = [k for k in _BUFFERS[format] if k not in tensors]
        if missing:
            raise SparselmError(f"{format} layer is missing packed tensor(s) {missing}")
        if format == "nm" and (n is None or m is None):
            raise SparselmError("an 'nm' SparseLinear needs its n and m (e.g. n=2, m=4)")
        self.in_features, self.out_features, self.format = int(in_features), int(out_features), format
        self.n, self.m = (int(n), int(m)) if format == "nm" else (None, None)
        for key in _BUFFERS[format]:
            self.register_buffer(key, tensors[key])
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_dense(cls, module_or_weight, format: str, bias: torch.Tensor | None = None,
                   n: int = 2, m: int = 4, name: str = "layer") -> "SparseLinear":
        """Pack an nn.Linear / Conv1D (or a bare [out, in] weight plus optional bias)."""
        if isinstance(module_or_weight, torch.Tensor):
            weight = module_or_weight.detach()
        else:
            weight = dense_weight_of(module_or_weight)
            bias = module_or_weight.bias.detach() if module_or_weight.bias is not None else None
        if weight.dim() != 2:
            raise SparselmError(f"{name}: expected a 2-D weight, got shape {list(weight.shape)}")
        if format == "csr":
            tensors = formats.pack_csr(weight)
        elif format == "bitmask":
            tensors = formats.pack_bitmask(weight)
        elif format == "nm":
            tensors = formats.pack_nm(weight, n, m, name=name)
        else:
            raise SparselmError(f"{name}: unknown sparse format {format!r}; choose csr, bitmask or nm")
        return cls(weight.shape[1], weight.shape[0], format, tensors, bias, n=n, m=m)

    def packed_tensors(self) -> dict[str, torch.Tensor]:
        return {key: getattr(self, key) for key in _BUFFERS[self.format]}

    @property
    def nnz(self) -> int:
        if self.format == "nm":
            return int((self.values != 0).sum())
        return int(self.values.numel())

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / max(1, self.in_features * self.out_features)

    def packed_nbytes(self) -> int:
        """Bytes of the packed weight (bias excluded): what one decode step reads."""
        return formats.packed_nbytes(self.packed_tensors())

    def dense_weight(self) -> torch.Tensor:
        """Decode back to the dense [out, in] weight (exactly the weight it was packed from).

        Uses the C++ decoders when the extension is built (CPU, fp32/bf16), else PyTorch ops.
        """
        ext = load_extension()
        buf = self._buffers
        if ext is not None and buf["values"].is_cpu and buf["values"].dtype in _KERNEL_DTYPES:
            if self.format == "bitmask":
                return ext.bitmask_to_dense(buf["mask"], buf["row_offsets"], buf["values"],
                                            self.in_features, self.out_features)
            if self.format == "csr":
                return ext.csr_to_dense(buf["crow_indices"], buf["col_indices"], buf["values"],
                                        self.in_features, self.out_features)
            return ext.nm_to_dense(buf["indices"], buf["values"], self.n, self.m, self.in_features)
        if self.format == "csr":
            return reference.dense_from_csr(self.crow_indices, self.col_indices, self.values,
                                            self.in_features, self.out_features)
        if self.format == "bitmask":
            return reference.dense_from_bitmask(self.mask, self.row_offsets, self.values,
                                                self.in_features, self.out_features)
        return reference.dense_from_nm(self.indices, self.values, self.n, self.m, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_f, out_f = self.in_features, self.out_features
        if x.dim() == 0 or x.shape[-1] != in_f:
            raise SparselmError(f"SparseLinear expects inputs with {in_f} features, got shape {list(x.shape)}")
        # At decode sizes the Python around the kernel costs as much as the kernel itself: read
        # the buffers straight from their dict (nn.Module.__getattr__ is slow) and call the
        # extension directly when it can run this input; it takes [..., K] and returns [..., N]
        # itself (each Python-side reshape is an ATen call: a few us, and 25-35 us each right after
        # the cache flush bench_kernels.py applies, as in a decode step of a model larger than the
        # caches; measured A/B in one process, see benchmarks/RESULTS.md).
        buf = self._buffers
        values, bias = buf["values"], self._parameters.get("bias")
        ext = load_extension()
        if (ext is not None and x.is_cpu and values.is_cpu and x.dtype in _KERNEL_DTYPES
                and values.dtype in _KERNEL_DTYPES):
            if self.format == "bitmask":
                return ext.bitmask_linear(x, buf["mask"], buf["row_offsets"], values, bias, in_f, out_f)
            if self.format == "csr":
                return ext.csr_linear(x, buf["crow_indices"], buf["col_indices"], values, bias, in_f, out_f)
            return ext.nm_linear(x, buf["indices"], values, bias, self.n, self.m, in_f)
        x2 = x.reshape(-1, in_f)  # [T, K]
        if self.format == "csr":
            y = ops.csr_matmul(x2, buf["crow_indices"], buf["col_indices"], values, in_f, out_f, bias)
        elif self.format == "bitmask":
            y = ops.bitmask_matmul(x2, buf["mask"], buf["row_offsets"], values, in_f, out_f, bias)
        else:
            y = ops.nm_matmul(x2, buf["indices"], values, self.n, self.m, in_f, bias)
        return y.reshape(*x.shape[:-1], out_f)  # [..., N]

    def extra_repr(self) -> str:
        nm = f", n={self.n}, m={self.m}" if self.format == "nm" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"
                f"{nm}, sparsity={self.sparsity:.3f}, dtype={self.values.dtype}, bias={self.bias is not None}")
