"""The C++ row-parallel SparseGPT loop equals the column-by-column reference loop."""
import pytest
import torch

from sparselm.kernels.extension import load_extension
from sparselm.prune import sparsegpt
from sparselm.prune.masks import Pattern

pytestmark = pytest.mark.skipif(load_extension() is None, reason="C++ extension not built on this machine")


def _problem(rows, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * cols, cols, generator=g) * torch.linspace(0.2, 3.0, cols)
    h = x.T @ x / x.shape[0]
    return torch.randn(rows, cols, generator=g), h


def _run(w, h, sparsity, pattern, blocksize, use_kernel, monkeypatch):
    if not use_kernel:
        monkeypatch.setattr(sparsegpt, "_row_kernel", lambda W, q: None)
    out = sparsegpt.sparsegpt_prune(w, h, sparsity, pattern, blocksize=blocksize)
    monkeypatch.undo()
    return out


@pytest.mark.parametrize("rows,cols,blocksize", [(37, 53, 16), (64, 128, 128), (5, 200, 64)])
@pytest.mark.parametrize("sparsity,pattern", [(0.5, Pattern()), (0.7, Pattern()), (0.5, Pattern(2, 4)),
                                              (0.25, Pattern(6, 8))])
def test_kernel_matches_column_loop(rows, cols, blocksize, sparsity, pattern, monkeypatch):
    if pattern.is_nm and cols % pattern.m:
        cols -= cols % pattern.m
    w, h = _problem(rows, cols)
    ref, keep_ref = _run(w, h, sparsity, pattern, blocksize, False, monkeypatch)
    out, keep = _run(w, h, sparsity, pattern, blocksize, True, monkeypatch)
    assert torch.equal(keep, keep_ref)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert torch.all(out[~keep] == 0)
    if pattern.is_nm:
        groups = keep.view(rows, -1, pattern.m).sum(-1)
        assert torch.all(groups == pattern.n)
    else:
        assert (~keep).sum().item() == sum(int(sparsity * rows * min(blocksize, cols - i))
                                           for i in range(0, cols, blocksize))


def test_kernel_handles_dead_inputs(monkeypatch):
    w, h = _problem(16, 32)
    h[3, :] = 0
    h[:, 3] = 0
    ref, keep_ref = _run(w, h, 0.5, Pattern(2, 4), 32, False, monkeypatch)
    out, keep = _run(w, h, 0.5, Pattern(2, 4), 32, True, monkeypatch)
    assert not keep[:, 3].any()
    assert torch.equal(keep, keep_ref)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
