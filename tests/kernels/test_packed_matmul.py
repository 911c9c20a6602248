"""Every packed format equals the dense masked weight's output (fp32 and bf16, odd shapes,
empty rows, all-zero layers, decode and prefill batch sizes), with and without the extension."""
import pytest
import torch
import torch.nn.functional as F

from sparselm.kernels import ops, reference
from sparselm.pack import formats

SHAPES = [(1, 1), (7, 13), (33, 50), (130, 77), (5, 200), (64, 1024)]  # (out_features, in_features)
BATCHES = [1, 3, 8, 16, 17, 40, 128]


def masked_weight(out_f, in_f, sparsity, dtype, seed=0, nm=None):
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(out_f, in_f, generator=g) * 2 - 1) / in_f ** 0.5
    if nm is None:
        w[torch.rand(out_f, in_f, generator=g) < sparsity] = 0
        if out_f > 2:
            w[out_f // 2] = 0  # an empty row
    else:
        n, m = nm
        groups = (in_f + m - 1) // m
        padded = torch.zeros(out_f, groups * m)
        padded[:, :in_f] = w
        scores = torch.rand(out_f, groups, m, generator=g)
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(n, dim=-1).indices, True)
        w = (padded.reshape(out_f, groups, m) * keep).reshape(out_f, -1)[:, :in_f].contiguous()
    return w.to(dtype)


def run_format(fmt, x, w, bias, nm=(2, 4)):
    out_f, in_f = w.shape
    if fmt == "csr":
        t = formats.pack_csr(w)
        return ops.csr_matmul(x, t["crow_indices"], t["col_indices"], t["values"], in_f, out_f, bias)
    if fmt == "bitmask":
        t = formats.pack_bitmask(w)
        return ops.bitmask_matmul(x, t["mask"], t["row_offsets"], t["values"], in_f, out_f, bias)
    t = formats.pack_nm(w, *nm)
    return ops.nm_matmul(x, t["indices"], t["values"], nm[0], nm[1], in_f, bias)


@pytest.fixture(params=["extension", "fallback"])
def kernel_path(request, monkeypatch, sparse_kernels):
    if request.param == "extension":
        if sparse_kernels is None:
            pytest.skip("C++ extension unavailable on this machine")
    else:
        monkeypatch.setattr(ops, "load_extension", lambda: None)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["csr", "bitmask", "nm"])
@pytest.mark.parametrize("shape", SHAPES)
def test_packed_equals_dense_masked(kernel_path, fmt, shape, dtype):
    out_f, in_f = shape
    w = masked_weight(out_f, in_f, 0.7, dtype, nm=(2, 4) if fmt == "nm" else None)
    bias = (torch.rand(out_f) - 0.5).to(dtype)
    g = torch.Generator().manual_seed(1)
    for batch in BATCHES:
        x = torch.randn(batch, in_f, generator=g).to(dtype)
        expected = F.linear(x, w, bias)
        got = run_format(fmt, x, w, bias)
        assert got.dtype == dtype and got.shape == (batch, out_f)
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(run_format(fmt, x, w, None), F.linear(x, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["csr", "bitmask"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3])
def test_dense_and_half_dense_rows(kernel_path, fmt, sparsity, dtype):
    # At 70% a chunk of 8 columns is almost never full; here most are: the vector paths' full
    # chunks (every lane set), and the last row's values ending at the end of the tensor.
    for out_f, in_f in [(9, 64), (6, 72), (31, 1000), (2, 8)]:
        w = masked_weight(out_f, in_f, sparsity, dtype)
        w[-1] = torch.linspace(-1, 1, in_f).to(dtype)  # last row fully dense
        g = torch.Generator().manual_seed(2)
        for batch in (1, 2, 9):
            x = torch.randn(batch, in_f, generator=g).to(dtype)
            tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {}  # sums of up to 1000 terms
            torch.testing.assert_close(run_format(fmt, x, w, None), F.linear(x, w), **tol)


@pytest.mark.parametrize("fmt", ["csr", "bitmask", "nm"])
def test_all_zero_layer_and_empty_batch(kernel_path, fmt):
    w = torch.zeros(19, 40)
    bias = torch.arange(19, dtype=torch.float32)
    for batch in (0, 1, 5):
        x = torch.randn(batch, 40)
        got = run_format(fmt, x, w, bias)
        assert torch.equal(got, bias.expand(batch, 19))


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_large_layer_multithreaded(kernel_path, sparsity):
    """A layer big enough for the kernels to use every thread (fp32 summation-order tolerance)."""
    w = masked_weight(512, 1000, sparsity, torch.float32)
    x = torch.randn(4, 1000)
    for fmt in ("csr", "bitmask"):
        torch.testing.assert_close(run_format(fmt, x[:1], w, None), F.linear(x[:1], w), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(run_format(fmt, x, w, None), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_mixed_dtypes_follow_input():
    """fp32 input with bf16 weights returns fp32 (the product is computed in fp32)."""
    w = masked_weight(9, 21, 0.5, torch.bfloat16)
    x = torch.randn(2, 21)
    got = run_format("bitmask", x, w, None)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, x @ w.float().t())


def test_encoders_are_exact_and_decoders_invert_them():
    for dtype in (torch.float32, torch.bfloat16):
        w = masked_weight(33, 50, 0.6, dtype)
        t = formats.pack_csr(w)
        assert t["col_indices"].dtype == torch.int16  # in_features <= 32768
        assert torch.equal(reference.dense_from_csr(t["crow_indices"], t["col_indices"], t["values"], 50, 33), w)
        t = formats.pack_bitmask(w)
        assert torch.equal(reference.dense_from_bitmask(t["mask"], t["row_offsets"], t["values"], 50, 33), w)
        w24 = masked_weight(33, 50, 0.0, dtype, nm=(2, 4))
        t = formats.pack_nm(w24, 2, 4)
        assert t["values"].shape == (33, 26)  # ceil(50 / 4) groups x 2 slots
        assert torch.equal(reference.dense_from_nm(t["indices"], t["values"], 2, 4, 50), w24)


def test_bitmask_layout_by_hand():
    # Row 0 keeps columns 0, 3 and 9; row 1 is empty. Bytes: 0b00001001 = 9, 0b00000010 = 2.
    w = torch.zeros(2, 10)
    w[0, 0], w[0, 3], w[0, 9] = 1.5, -2.0, 4.0
    t = formats.pack_bitmask(w)
    assert t["mask"].tolist() == [[9, 2, 0, 0, 0, 0, 0, 0], [0] * 8]  # rows padded to 64 bits
    assert t["row_offsets"].tolist() == [0, 3, 3]
    assert t["values"].tolist() == [1.5, -2.0, 4.0]


def test_nm_layout_by_hand():
    # One row, 2:4: group 0 keeps columns 1 and 3, group 1 keeps only column 6 (padded slot -> index 0).
    w = torch.tensor([[0.0, 5.0, 0.0, 7.0, 0.0, 0.0, 9.0, 0.0]])
    t = formats.pack_nm(w, 2, 4)
    assert t["indices"].tolist() == [[1, 3, 2, 0]]
    assert t["values"].tolist() == [[5.0, 7.0, 9.0, 0.0]]


def test_pack_nm_refuses_non_nm_weight_with_layer_name():
    from sparselm.errors import SparselmError

    w = torch.ones(4, 8)
    with pytest.raises(SparselmError, match="model.layers.0.mlp.up_proj.*not 2:4"):
        formats.pack_nm(w, 2, 4, name="model.layers.0.mlp.up_proj")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_decoders_equal_reference(sparse_kernels, dtype):
    if sparse_kernels is None:
        pytest.skip("C++ extension unavailable on this machine")
    w = masked_weight(37, 130, 0.7, dtype)
    t = formats.pack_bitmask(w)
    assert torch.equal(sparse_kernels.bitmask_to_dense(t["mask"], t["row_offsets"], t["values"], 130, 37), w)
    t = formats.pack_csr(w)
    assert torch.equal(sparse_kernels.csr_to_dense(t["crow_indices"], t["col_indices"], t["values"], 130, 37), w)
    w24 = masked_weight(37, 130, 0.0, dtype, nm=(2, 4))
    t = formats.pack_nm(w24, 2, 4)
    assert torch.equal(sparse_kernels.nm_to_dense(t["indices"], t["values"], 2, 4, 130), w24)


@pytest.mark.parametrize("in_f", [32768, 32769, 40001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_csr_index_width_follows_in_features(kernel_path, in_f, dtype):
    """int16 columns up to 32768 inputs (the last column, 32767, must not turn negative), int32
    beyond; both decode and multiply exactly like the dense masked weight."""
    w = masked_weight(6, in_f, 0.9, dtype, seed=3)
    w[:, -1] = 0.5  # the highest column index is used in every row
    t = formats.pack_csr(w)
    assert t["col_indices"].dtype == (torch.int16 if in_f <= 32768 else torch.int32)
    assert int(t["col_indices"].max()) == in_f - 1
    x = torch.randn(3, in_f).to(dtype)
    got = ops.csr_matmul(x, t["crow_indices"], t["col_indices"], t["values"], in_f, 6)
    torch.testing.assert_close(got.float(), x.float() @ w.float().t(), rtol=2e-2 if dtype != torch.float32 else 1e-4,
                               atol=1e-3)
    got1 = ops.csr_matmul(x[:1], t["crow_indices"], t["col_indices"], t["values"], in_f, 6)
    torch.testing.assert_close(got1.float(), x[:1].float() @ w.float().t(),
                               rtol=2e-2 if dtype != torch.float32 else 1e-4, atol=1e-3)
    assert torch.equal(reference.dense_from_csr(t["crow_indices"], t["col_indices"], t["values"], in_f, 6), w)
    if kernel_path == "extension":
        from sparselm.kernels import load_extension

        assert torch.equal(load_extension().csr_to_dense(t["crow_indices"], t["col_indices"], t["values"], in_f, 6), w)


@pytest.mark.parametrize("in_f", [6144, 6145, 11008])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_csr_long_rows_and_unsorted_columns(kernel_path, in_f, dtype):
    """Batch 1 with inputs larger than the L1 cache (rows of up to 11008 columns), columns at
    every 4096-column edge, empty rows, and rows whose columns are not sorted (a file written by
    another tool) all give the dense masked product."""
    w = masked_weight(9, in_f, 0.9, dtype, seed=5)
    for edge in range(4096, in_f, 4096):
        w[:4, edge - 1: edge + 1] = 0.25  # both sides of every 4096-column edge
    w[5] = 0  # an empty row
    x = torch.randn(1, in_f).to(dtype)
    expected = x.float() @ w.float().t()
    tol = dict(rtol=2e-2, atol=1e-3) if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-4)
    t = formats.pack_csr(w)
    got = ops.csr_matmul(x, t["crow_indices"], t["col_indices"], t["values"], in_f, 9)
    torch.testing.assert_close(got.float(), expected, **tol)
    crow, cols, vals = t["crow_indices"], t["col_indices"].clone(), t["values"].clone()
    g = torch.Generator().manual_seed(0)
    for r in range(9):  # shuffle every row's slots (columns and values together)
        a, b = int(crow[r]), int(crow[r + 1])
        perm = torch.randperm(b - a, generator=g) + a
        cols[a:b], vals[a:b] = cols[perm].clone(), vals[perm].clone()
    got = ops.csr_matmul(x, crow, cols, vals, in_f, 9)
    torch.testing.assert_close(got.float(), expected, **tol)
