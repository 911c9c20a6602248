"""Edge cases of the vector paths of the dense-weight GEMV kernels (8 lanes with AVX2, 16 with
AVX-512): row and column counts that leave partial vectors and partial row groups, column
ranges split across threads, and the activation-sparse kernel's 2048-column chunks."""
import pytest
import torch

from tests.conftest import with_threads

# Every tail of an 8- and a 16-lane loop (and of two 8-lane vectors per step), and longer rows.
WIDTHS = list(range(1, 34)) + [63, 100, 513]


@pytest.fixture
def ext(sparse_kernels):
    if sparse_kernels is None:
        pytest.skip("C++ extension unavailable on this machine")
    return sparse_kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", WIDTHS)
def test_dense_gemv_column_tails(ext, dtype, k):
    """Rows 1-9 (4-row groups and leftover rows) by every column count."""
    gen = torch.Generator().manual_seed(k)
    for n in (1, 3, 4, 5, 8, 9):
        w = torch.randn(n, k, generator=gen).to(dtype)
        x = torch.randn(1, k, generator=gen)
        ref = x.double() @ w.double().t()
        torch.testing.assert_close(ext.dense_gemv(x, w).double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_dense_gemv_rows_split_across_threads(ext, dtype, threads):
    """Enough work for the threads, a row count that leaves 3 rows outside the 4-row groups; bf16
    input rounds once at the end."""
    gen = torch.Generator().manual_seed(threads)
    w = torch.randn(1031, 517, generator=gen).to(dtype)
    x = torch.randn(1, 517, generator=gen)
    ref = x.double() @ w.double().t()
    got = with_threads(threads, lambda: ext.dense_gemv(x, w))
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    got_bf16 = with_threads(threads, lambda: ext.dense_gemv(x.bfloat16(), w))
    assert got_bf16.dtype == torch.bfloat16
    assert torch.equal(got_bf16, with_threads(threads, lambda: ext.dense_gemv(x.bfloat16().float(), w)).bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", WIDTHS + [2047, 2048, 2049, 2063, 4100])
def test_act_sparse_gemv_column_tails(ext, dtype, n):
    """Each column count (partial vectors, 2048-column chunks and their ends): the sum of the
    selected rows in order, in fp32."""
    gen = torch.Generator().manual_seed(n)
    k = 37
    x = torch.randn(k, generator=gen)
    x[torch.rand(k, generator=gen) < 0.5] = 0
    w_t = torch.randn(k, n, generator=gen).to(dtype)
    got = ext.act_sparse_gemv(x, w_t)
    ref = x.double() @ w_t.double()
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_act_sparse_gemv_threads_agree(ext, dtype):
    """Two threads split the columns in blocks of 16: the same values as one thread, bit for bit
    (every column is summed in the same order either way)."""
    gen = torch.Generator().manual_seed(5)
    k, n = 300, 1000 + 13
    x = torch.randn(k, generator=gen)
    x[torch.rand(k, generator=gen) < 0.7] = 0
    w_t = torch.randn(k, n, generator=gen).to(dtype)
    one = with_threads(1, lambda: ext.act_sparse_gemv(x, w_t))
    two = with_threads(2, lambda: ext.act_sparse_gemv(x, w_t))
    assert torch.equal(one, two)
    torch.testing.assert_close(two.double(), x.double() @ w_t.double(), rtol=1e-5, atol=1e-5)


def test_act_sparse_gemv_special_values(ext):
    """inf and NaN weights in selected rows reach the output; those of skipped rows do not."""
    x = torch.tensor([0.0, 1.0, 0.0, 2.0])
    w_t = torch.full((4, 21), float("nan"))
    w_t[1] = torch.linspace(-1, 1, 21)
    w_t[3] = 0.5
    w_t[3, 4], w_t[3, 17], w_t[3, 20] = float("inf"), float("-inf"), float("nan")
    got = ext.act_sparse_gemv(x, w_t)
    ref = w_t[1] + 2.0 * w_t[3]
    torch.testing.assert_close(got, ref, equal_nan=True)
