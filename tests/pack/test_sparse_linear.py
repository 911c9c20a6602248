"""SparseLinear is a drop-in nn.Linear: same outputs for any leading shape, dtype moves, state."""
import pytest
import torch
from torch import nn

from sparselm.errors import SparselmError
from sparselm.pack import SparseLinear


def sparse_linear_pair(in_f=50, out_f=33, bias=True, sparsity=0.6, seed=0):
    torch.manual_seed(seed)
    dense = nn.Linear(in_f, out_f, bias=bias)
    dense.weight.data[torch.rand(out_f, in_f) < sparsity] = 0
    return dense


@pytest.mark.parametrize("fmt", ["csr", "bitmask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_drop_in_for_linear(fmt, dtype):
    dense = sparse_linear_pair().to(dtype)
    packed = SparseLinear.from_dense(dense, fmt)
    for shape in [(50,), (1, 1, 50), (2, 7, 50), (128, 50), (0, 50), (2, 0, 50)]:
        x = torch.randn(*shape).to(dtype)
        torch.testing.assert_close(packed(x), dense(x))
    x = torch.randn(50, 3).to(dtype).t()  # a non-contiguous input
    torch.testing.assert_close(packed(x), dense(x))
    assert torch.equal(packed.dense_weight(), dense.weight.data)
    assert packed.nnz == int((dense.weight != 0).sum())


def test_nm_layer_and_error_naming_layer():
    dense = nn.Linear(16, 6)
    w = dense.weight.data.reshape(6, 4, 4)
    keep = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, w.abs().topk(2, -1).indices, True)
    dense.weight.data = (w * keep).reshape(6, 16)
    packed = SparseLinear.from_dense(dense, "nm", n=2, m=4)
    x = torch.randn(3, 16)
    torch.testing.assert_close(packed(x), dense(x))
    with pytest.raises(SparselmError, match="blocks.3.fc1"):
        SparseLinear.from_dense(nn.Linear(16, 6), "nm", name="blocks.3.fc1")


def test_moves_with_the_model_and_round_trips_state_dict():
    dense = sparse_linear_pair()
    packed = SparseLinear.from_dense(dense, "bitmask")
    packed_bf16 = packed.to(torch.bfloat16)
    assert packed_bf16.values.dtype == torch.bfloat16 and packed_bf16.mask.dtype == torch.uint8
    fresh = SparseLinear.from_dense(sparse_linear_pair(seed=1), "bitmask")
    state = SparseLinear.from_dense(dense, "bitmask").state_dict()
    assert set(state) == {"mask", "row_offsets", "values", "bias"}
    rebuilt = SparseLinear(50, 33, "bitmask", {k: v for k, v in state.items() if k != "bias"}, state["bias"])
    x = torch.randn(4, 50)
    torch.testing.assert_close(rebuilt(x), dense(x))
    assert not torch.equal(fresh(x), rebuilt(x))


def test_gpt2_conv1d_is_packed_with_its_transpose():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(nf=12, nx=20)  # weight [in=20, out=12]
    nn.init.normal_(conv.weight)
    conv.weight.data[torch.rand(20, 12) < 0.5] = 0
    packed = SparseLinear.from_dense(conv, "csr")
    x = torch.randn(2, 3, 20)
    torch.testing.assert_close(packed(x), conv(x))


def test_bad_input():
    packed = SparseLinear.from_dense(sparse_linear_pair(), "csr")
    with pytest.raises(SparselmError, match="expects inputs with 50 features"):
        packed(torch.randn(2, 49))
    with pytest.raises(SparselmError, match="expects inputs with 50 features"):
        packed(torch.tensor(1.0))  # a 0-d input: a clear error, not an IndexError
    with pytest.raises(SparselmError, match="unknown sparse format"):
        SparseLinear.from_dense(sparse_linear_pair(), "coo")

