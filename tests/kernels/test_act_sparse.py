"""act_sparse_gemv: equals x @ w_t and never reads the rows of w_t whose input is zero."""
import pytest
import torch

from sparselm.errors import SparselmError
from sparselm.kernels import act_sparse_gemv, ops


@pytest.fixture(params=["extension", "fallback"])
def kernel_path(request, monkeypatch, sparse_kernels):
    if request.param == "extension" and sparse_kernels is None:
        pytest.skip("C++ extension unavailable on this machine")
    if request.param == "fallback":
        monkeypatch.setattr(ops, "load_extension", lambda: None)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (100, 37), (1000, 4100)])
@pytest.mark.parametrize("zero_fraction", [0.0, 0.5, 0.9, 1.0])
def test_equals_dense_product(kernel_path, dtype, shape, zero_fraction):
    k, n = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(k, generator=g)
    x[torch.rand(k, generator=g) < zero_fraction] = 0
    x = x.to(dtype)
    w_t = (torch.randn(k, n, generator=g) / k ** 0.5).to(dtype)
    got = act_sparse_gemv(x, w_t)
    assert got.shape == (n,) and got.dtype == dtype
    torch.testing.assert_close(got, (x.float() @ w_t.float()).to(dtype))
    got2 = act_sparse_gemv(x.unsqueeze(0), w_t)
    assert got2.shape == (1, n)
    torch.testing.assert_close(got2[0], got, rtol=0, atol=0)


def test_skips_rows_of_zero_inputs(kernel_path):
    """NaN in every row whose input is zero: a dense product would be NaN, the kernel is not."""
    x = torch.tensor([0.0, 2.0, 0.0, -1.0, 0.0])
    w_t = torch.full((5, 40), float("nan"))
    w_t[1], w_t[3] = 1.0, 3.0
    got = act_sparse_gemv(x, w_t)
    assert torch.equal(got, torch.full((40,), 2.0 * 1.0 + (-1.0) * 3.0))


def test_bad_shapes_raise():
    with pytest.raises(SparselmError, match="in_features"):
        act_sparse_gemv(torch.ones(4), torch.ones(5, 3))
    with pytest.raises(SparselmError, match="batch-1"):
        act_sparse_gemv(torch.ones(2, 4), torch.ones(4, 3))
