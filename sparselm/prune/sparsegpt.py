"""SparseGPT: one-shot pruning with OBS weight updates (Frantar & Alistarh 2023,
"SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot").

For a layer with weight W [R, C] and Hessian H = (2/n) X X^T [C, C], columns are processed
left to right in blocks of `blocksize`; pruning column i sets the chosen weights to zero and
spreads the error over the not-yet-processed columns with the row i of the upper Cholesky
factor of H^-1 (Alg. 1). Updates to later blocks are applied lazily once per block.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from sparselm.prune.masks import Pattern

# quantizer(column [R], column index, current weights of the block from that column on [R, k]) -> [R]
ColumnQuantizer = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]


class CholeskyError(RuntimeError):
    pass


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float = 0.01, max_tries: int = 6) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + damp*I)^-1 (U^T U = H^-1), and the dampening used.

    If the factorisation fails, the dampening is multiplied by 10 and retried, with a warning;
    after `max_tries` failures a CholeskyError is raised: never a silent fallback.
    """
    mean_diag = hessian.diagonal().mean().item()
    damp = percdamp
    for attempt in range(max_tries):
        h = hessian.clone()
        h.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(h)
        if info == 0:
            hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info == 0:
                if attempt:
                    warnings.warn(f"SparseGPT: Hessian not positive definite with dampening {percdamp}; "
                                  f"succeeded with {damp:g} x mean(diag H). Consider more calibration data.",
                                  RuntimeWarning, stacklevel=3)
                return U, damp
        damp *= 10
    raise CholeskyError(f"Cholesky factorisation of the Hessian failed even with dampening {damp / 10:g}; "
                        f"the calibration inputs are degenerate (too few samples?)")


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: Pattern = Pattern(),
                    blocksize: int = 128, percdamp: float = 0.01,
                    quantizer: ColumnQuantizer | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(updated weight, keep mask) for weight [R, C] (any float dtype; math in float32).

    - dead inputs (H_jj = 0) get H_jj = 1 and their weight column is zeroed (and pruned);
    - unstructured: the mask is chosen per `blocksize`-column block, removing the
      floor(sparsity * R * block) weights of lowest w^2 / [H^-1]_jj^2 across all rows;
    - N:M: at every column i with i % M == 0, the M - N lowest scores of each row among
      columns i..i+M-1 are removed, scored on the already-updated weights;
    - `quantizer` (optional) rounds each kept column inside the loop, so the error
      compensation covers quantization too (SparseGPT section 3.5, joint sparsification
      and quantization).
    """
    rows, cols = weight.shape
    W = weight.detach().clone().float()  # [R, C]
    H = hessian.detach().clone().float().to(W.device)  # [C, C]
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U, _ = inverse_hessian_factor(H, percdamp)  # [C, C] upper
    keep = torch.ones(rows, cols, dtype=torch.bool, device=W.device)
    keep[:, dead] = False

    threads = torch.get_num_threads()
    try:
        for i1 in range(0, cols, blocksize):
            _prune_block(W, U, keep, i1, min(i1 + blocksize, cols), sparsity, pattern, quantizer, threads)
    finally:
        torch.set_num_threads(threads)
    return W.to(weight.dtype), keep


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k lowest entries of `scores` (exactly k; ties: first in flat order).

    A k-th value selection plus a comparison: about 3x faster than topk on CPU at these sizes.
    """
    flat = scores.flatten()
    if k >= flat.numel():
        return torch.ones_like(scores, dtype=torch.bool)
    kth = torch.kthvalue(flat, k).values
    out = flat < kth
    short = k - int(out.sum())
    if short > 0:
        ties = torch.nonzero(flat == kth).flatten()[:short]
        out[ties] = True
    return out.view_as(scores)


def _row_kernel(W: torch.Tensor, quantizer):
    """The C++ row-parallel column loop, when it applies (CPU float32, no quantizer)."""
    if quantizer is not None or W.device.type != "cpu" or W.dtype != torch.float32:
        return None
    from sparselm.kernels.extension import load_extension

    module = load_extension()
    return module if module is not None and hasattr(module, "obs_prune_block") else None


def _prune_block(W, U, keep, i1, i2, sparsity, pattern, quantizer, threads) -> None:
    """Columns i1..i2 of W in place: choose the mask, prune column by column with OBS updates
    inside the block, then apply the block's accumulated error to all later columns at once.

    On CPU the column loop runs in the C++ extension, row by row (rows are independent within
    a block). Otherwise it runs here as column operations on one thread, since thread barriers
    cost more than they save at these sizes (and stall badly when another process shares the
    cores); the block-level matrix product afterwards uses all threads again.
    """
    count = i2 - i1
    W1 = W[:, i1:i2].clone(memory_format=torch.contiguous_format)  # [R, b]
    U1 = U[i1:i2, i1:i2]  # [b, b]
    d = U1.diagonal()  # [b]
    prune1 = ~keep[:, i1:i2]  # [R, b]; True = removed
    if not pattern.is_nm:
        scores = W1.pow(2) / d.pow(2).unsqueeze(0)  # [R, b]
        k = int(sparsity * scores.numel())
        if k:
            prune1 |= _lowest(scores, k)
    kernel = _row_kernel(W1, quantizer)
    if kernel is not None:
        Err1 = torch.empty_like(W1)
        prune1 = prune1.contiguous()
        kernel.obs_prune_block(W1, U1.contiguous(), prune1, Err1, pattern.n if pattern.is_nm else 0,
                               pattern.m if pattern.is_nm else 0)
        Q1 = W1
    else:
        Q1, Err1 = _column_loop(W1, U1, d, prune1, i1, count, pattern, quantizer)
    torch.set_num_threads(threads)
    W[:, i1:i2] = Q1
    keep[:, i1:i2] = ~prune1
    W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # lazy batch update of all later columns


def _column_loop(W1, U1, d, prune1, i1, count, pattern, quantizer):
    Q1 = torch.zeros_like(W1)
    Err1 = torch.zeros_like(W1)
    torch.set_num_threads(1)
    for i in range(count):
        w = W1[:, i]  # [R]
        if pattern.is_nm and i % pattern.m == 0:
            g = slice(i, i + pattern.m)
            scores = W1[:, g].pow(2) / d[g].pow(2).unsqueeze(0)  # [R, M]
            idx = torch.topk(scores, pattern.m - pattern.n, dim=1, largest=False).indices
            prune1[:, g] |= torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)
        q = w.masked_fill(prune1[:, i], 0.0)
        if quantizer is not None:
            q = torch.where(prune1[:, i], q, quantizer(q, i1 + i, W1[:, i:]))
        Q1[:, i] = q
        err = (w - q) / d[i]  # [R]
        W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)  # OBS update of the rest of the block
        Err1[:, i] = err
    return Q1, Err1
