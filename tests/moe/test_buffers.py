"""Reused CPU buffers (sparselm/moe/buffers.py): a storage comes back only when nothing holds
it, so kept graphs, retained graphs and outputs the caller keeps never see their memory
overwritten; and the MoE layer's gradients are the same with reuse as without."""
import pytest
import torch

from sparselm.moe import buffers
from sparselm.moe.buffers import release_buffers, reusable
from sparselm.moe.fused import fused_kernels, swiglu, swiglu_backward
from sparselm.moe.layer import MoEConfig, MoELayer

needs_reuse = pytest.mark.skipif(buffers._UNSHARED is None, reason="this PyTorch has no storage use count")


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.fixture(autouse=True)
def _fresh_pools():
    release_buffers()
    yield
    release_buffers()


@needs_reuse
def test_storage_comes_back_only_when_unused():
    like = torch.empty(0)
    a = reusable("t", (64, 32), like)
    first = _ptr(a)
    b = reusable("t", (64, 32), like)
    assert _ptr(b) != first  # `a` still lives
    view = a[3:5]
    del a
    c = reusable("t", (64, 32), like)
    assert _ptr(c) not in (first, _ptr(b))  # a view of the first one still lives
    del view, c
    d = reusable("t", (64, 32), like)
    assert _ptr(d) == first  # now nothing holds it
    assert d.shape == (64, 32) and d.dtype == like.dtype and d.is_contiguous()
    del d
    assert _ptr(reusable("t", (64, 32), torch.empty(0, dtype=torch.bfloat16))) != first  # dtypes apart
    assert _ptr(reusable("u", (64, 32), like)) != first  # names apart
    smaller = reusable("t", (10, 7), like)  # fewer rows (the next step's padded groups): same storage
    assert _ptr(smaller) == first and smaller.shape == (10, 7)


@needs_reuse
def test_changing_shapes_keep_the_pool_bounded():
    """Row counts that change every step neither grow the pool nor keep outgrown storages."""
    like = torch.empty(0)
    for rows in range(1, 3 * buffers.KEEP):
        a, b = reusable("g", (rows, 16), like), reusable("g", (rows + 1, 16), like)  # two live at once
        assert a.shape == (rows, 16) and b.shape == (rows + 1, 16)
        assert _ptr(a) != _ptr(b)
        del a, b
    kept = buffers._local.pools[("g", like.dtype)]
    assert len(kept) == 2  # two live at once at most: two storages, each replaced when outgrown
    assert sorted(t.numel() for t in kept)[-1] >= 3 * buffers.KEEP * 16


@needs_reuse
def test_a_saved_tensor_keeps_its_storage():
    """A tensor autograd saved for backward is never handed out again before the graph is freed."""
    x = torch.randn(8, 6, requires_grad=True)
    h = reusable("h", (8, 6), x)
    h.copy_(x.detach())
    saved = (x * h).sum()  # mul saves h
    del h
    assert _ptr(reusable("h", (8, 6), x)) != _ptr(saved.grad_fn.next_functions[0][0]._saved_other)
    saved.backward()
    torch.testing.assert_close(x.grad, x.detach())


@needs_reuse
def test_release_frees_what_the_thread_keeps():
    like = torch.empty(0)
    reusable("r", (4,), like)
    assert len(buffers._local.pools) == 1
    release_buffers()
    assert len(buffers._local.pools) == 0
    assert reusable("r", (4,), like).shape == (4,)


def test_other_devices_allocate_normally():
    meta = torch.empty(0, device="meta")
    t = reusable("m", (2, 3), meta)
    assert t.device.type == "meta" and t.shape == (2, 3)
    assert all(key[0] != "m" for key in getattr(buffers._local, "pools", {}))


def test_made_in_inference_mode_usable_outside():
    """A storage first made under inference mode is a normal tensor: autograd can save it later."""
    with torch.inference_mode():
        t = reusable("inf", (3, 3), torch.empty(0))
        t.fill_(1.0)
        assert not t.is_inference()
    del t
    u = reusable("inf", (3, 3), torch.empty(0))
    assert not u.is_inference()
    u.fill_(2.0)
    w = torch.ones(3, 3, requires_grad=True)
    (u * w).sum().backward()  # mul saves u for w's gradient
    assert torch.equal(w.grad, torch.full((3, 3), 2.0))


@pytest.mark.skipif(fused_kernels(torch.empty(1)) is None, reason="needs the C++ kernels")
def test_swiglu_into_out_equals_fresh():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        h = torch.randn(37, 2 * 19).to(dtype)
        g = torch.randn(37, 19).to(dtype)
        act_out, grad_out = torch.empty(37, 19, dtype=dtype), torch.empty(37, 38, dtype=dtype)
        assert swiglu(h, out=act_out) is not None
        swiglu_backward(h, g, out=grad_out)
        assert torch.equal(act_out, swiglu(h))
        assert torch.equal(grad_out, swiglu_backward(h, g))
    with pytest.raises(RuntimeError, match="out must be a contiguous CPU"):
        swiglu(h, out=torch.empty(37, 20, dtype=h.dtype))
    with pytest.raises(RuntimeError, match="out must be a contiguous CPU"):
        swiglu_backward(h, g, out=torch.empty(38, 37, dtype=h.dtype).t())


def _layer_and_inputs(dtype, dispatch="sorted"):
    torch.manual_seed(3)
    layer = MoELayer(MoEConfig(hidden_size=32, expert_hidden=48, num_experts=4, top_k=2, dispatch=dispatch)).to(dtype)
    xs = [torch.randn(2, 40, 32).to(dtype) for _ in range(3)]
    grads = [torch.randn(2, 40, 32).to(dtype) for _ in range(3)]
    return layer, xs, grads


def _grads(layer, x, grad):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    layer(x).backward(grad)
    return [x.grad.clone()] + [p.grad.clone() for p in layer.parameters() if p.grad is not None]


@pytest.mark.parametrize("dispatch", ["sorted", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_forwards_then_two_backwards(dtype, dispatch, monkeypatch):
    """Gradient accumulation's order (forward, forward, backward, backward) and a retained graph
    run twice give the gradients of fresh buffers, bit for bit."""
    layer, xs, grads = _layer_and_inputs(dtype, dispatch)
    reference = [_grads(layer, x, g) for x, g in zip(xs, grads)]

    # forward, forward, backward, backward: the second forward must not reuse the first's storages
    layer.zero_grad(set_to_none=True)
    inputs = [x.clone().requires_grad_(True) for x in xs[:2]]
    outs = [layer(x) for x in inputs]
    outs[1].backward(grads[1])
    second = inputs[1].grad.clone()
    outs[0].backward(grads[0])
    assert torch.equal(second, reference[1][0])
    assert torch.equal(inputs[0].grad, reference[0][0])
    # the parameters' .grad (the first backward's gradient buffers) accumulated the second's
    accumulated = [p.grad for p in layer.parameters() if p.grad is not None]
    for got, first, then in zip(accumulated, reference[1][1:], reference[0][1:]):
        torch.testing.assert_close(got, first + then)

    # a retained graph, backward twice: the same gradient both times
    x = xs[2].clone().requires_grad_(True)
    out = layer(x)
    out.backward(grads[2], retain_graph=True)
    once = x.grad.clone()
    layer(xs[0])  # another forward in between may not take the retained graph's storages
    out.backward(grads[2])
    torch.testing.assert_close(x.grad, 2 * once, rtol=0, atol=0)
    assert torch.equal(once, reference[2][0])

    # and with every buffer fresh, the same numbers
    monkeypatch.setattr(buffers, "_UNSHARED", None)
    fresh = [_grads(layer, x, g) for x, g in zip(xs, grads)]
    for got, want in zip(fresh, reference):
        for a, b in zip(got, want):
            assert torch.equal(a, b)


@needs_reuse
def test_training_steps_reuse_storages():
    """Steady state: a training step's large tensors come from the same storages each step."""
    layer, xs, grads = _layer_and_inputs(torch.float32)
    _grads(layer, xs[0], grads[0])
    pools = buffers._local.pools
    ptrs = {key: [_ptr(t) for t in kept] for key, kept in pools.items()}
    assert any(name.startswith("grouped_swiglu.") for name, _ in ptrs)
    _grads(layer, xs[1], grads[1])
    assert {key: [_ptr(t) for t in kept] for key, kept in buffers._local.pools.items()} == ptrs
