"""GPTQ (Frantar, Ashkboos, Hoefler & Alistarh 2022, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers"), and its joint sparse variant.

For a layer with weight W [R, C] and Hessian H = (2/n) X X^T [C, C] of its inputs, columns are
quantized left to right; the rounding error of column i, divided by [U]_ii where U is the upper
Cholesky factor of H^-1 (Alg. 1, "Cholesky reformulation"), is spread over the columns not yet
quantized with row i of U (the OBS update, eq. 3). Updates to later blocks of `blocksize`
columns are applied lazily once per block ("lazy batch updates"). With groups, the scale and
zero point of a group are computed from the *updated* weights when the loop reaches the
group's first column.

`sparse_gptq` is SparseGPT's joint mode (Frantar & Alistarh 2023, section 3.5): the same loop
prunes and quantizes, so the compensation covers both errors; it runs `sparsegpt_prune` with a
`GroupColumnQuantizer` in its quantizer hook.
"""
from __future__ import annotations

import torch

from sparselm.prune.masks import Pattern
from sparselm.prune.sparsegpt import inverse_hessian_factor, sparsegpt_prune
from sparselm.quant.groupwise import GroupColumnQuantizer, QuantizedWeight, aligned_blocksize


def _prepare(weight: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    W = weight.detach().clone().float()  # [R, C]
    H = hessian.detach().clone().float().to(W.device)  # [C, C]
    dead = H.diagonal() == 0  # inputs that are always zero: their weights never matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return W, H, dead


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int = 128,
                  symmetric: bool = True, blocksize: int = 128, percdamp: float = 0.01) -> QuantizedWeight:
    """Quantize weight [R, C] with GPTQ against hessian [C, C]; returns codes + group params.

    `result.dequantize()` is the quantized weight (float32). The weight is not modified.
    blocksize is rounded up to a multiple of group_size so that no group straddles two blocks.
    """
    W, H, dead = _prepare(weight, hessian)
    rows, cols = W.shape
    U, _ = inverse_hessian_factor(H, percdamp)  # [C, C] upper, U^T U = H^-1
    quantizer = GroupColumnQuantizer(rows, cols, bits, group_size, symmetric, device=W.device)
    blocksize = aligned_blocksize(blocksize, group_size)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()  # [R, b]
        Q1 = torch.zeros_like(W1)  # [R, b]
        Err1 = torch.zeros_like(W1)  # [R, b]
        U1 = U[i1:i2, i1:i2]  # [b, b]
        for i in range(i2 - i1):
            w = W1[:, i]  # [R]
            q = quantizer(w, i1 + i, W1[:, i:])  # [R]
            Q1[:, i] = q
            err = (w - q) / U1[i, i]  # [R]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)  # OBS update inside the block
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # lazy update of every later column at once
    return quantizer.result(W)


def sparse_gptq(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: Pattern = Pattern(),
                bits: int = 4, group_size: int = 128, symmetric: bool = True, blocksize: int = 128,
                percdamp: float = 0.01) -> QuantizedWeight:
    """Prune to `sparsity` (or N:M `pattern`) and quantize in one SparseGPT pass.

    Guarantees: `result.keep` is the mask SparseGPT chose; every weight outside it dequantizes
    to exactly 0 (its code is the zero point); kept weights lie on the group grid.
    """
    rows, cols = weight.shape
    quantizer = GroupColumnQuantizer(rows, cols, bits, group_size, symmetric, device=weight.device)
    blocksize = aligned_blocksize(blocksize, group_size)
    if pattern.is_nm and blocksize % pattern.m:
        blocksize *= pattern.m  # an N:M group must not straddle two blocks either
    w_hat, keep = sparsegpt_prune(weight.detach().float(), hessian, sparsity, pattern, blocksize, percdamp,
                                  quantizer=quantizer)
    return quantizer.result(w_hat, keep)


@torch.no_grad()
def layer_output_error(weight: torch.Tensor, approx: torch.Tensor, inputs: torch.Tensor) -> float:
    """||W X - W_hat X||_F for inputs X [T, C] (the objective GPTQ minimises, eq. 1)."""
    x = inputs.reshape(-1, inputs.shape[-1]).float()  # [T, C]
    return float(torch.linalg.norm(x @ (weight.float() - approx.float()).t()))
