"""Every backend equals the dense-mask reference: outputs and gradients, odd lengths, GQA, decoding."""
import warnings

import pytest
import torch

from sparselm.attention import (
    Causal, DilatedWindow, Fixed, GlobalTokens, RandomBlocks, Sinks, SlidingWindow, Strided, blocked_attention,
    choose_backend, reference_attention, sparse_attention,
)
from sparselm.errors import SparselmError

PATTERNS = [
    Causal(), SlidingWindow(5), Sinks(2) | SlidingWindow(7), Strided(4), Fixed(8, 2), DilatedWindow(3, 3),
    GlobalTokens((0, 9)) | SlidingWindow(3), RandomBlocks(8, 1, seed=0), RandomBlocks(8, 2, seed=1) | SlidingWindow(8),
    SlidingWindow(6) & Strided(2),
]


def _inputs(tq, tk, heads=4, kv_heads=2, dim=8, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda h, t: torch.randn(2, h, t, dim, generator=gen, dtype=dtype).requires_grad_()  # noqa: E731
    return make(heads, tq), make(kv_heads, tk), make(kv_heads, tk)


def _grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.spec())
@pytest.mark.parametrize("length", [37, 61])
def test_blocked_equals_reference_forward_and_backward(pattern, length):
    q, k, v = _inputs(length, length)
    ref = reference_attention(q, k, v, pattern)
    out = blocked_attention(q, k, v, pattern, chunk=16)  # several chunks, the last one partial
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("tq,tk", [(1, 29), (5, 29), (29, 29)])
def test_blocked_queries_at_the_end_of_the_keys(tq, tk):
    pattern = Sinks(2) | SlidingWindow(6)
    q, k, v = _inputs(tq, tk)
    ref = reference_attention(q, k, v, pattern)
    torch.testing.assert_close(blocked_attention(q, k, v, pattern, chunk=4), ref, rtol=1e-10, atol=1e-10)
    # and the reference itself agrees with the last rows of the full-length computation
    q_full, _, _ = _inputs(tk, tk, seed=3)
    q_full = q_full.detach().clone()
    q_full[:, :, tk - tq:] = q.detach()
    full = reference_attention(q_full, k.detach(), v.detach(), pattern)
    torch.testing.assert_close(ref.detach(), full[:, :, tk - tq:], rtol=1e-10, atol=1e-10)


def test_reference_is_softmax_attention_by_hand():
    # one head, 3 tokens, window 2: row 2 attends keys 1 and 2 only
    q = torch.tensor([[[[1.0], [0.0], [2.0]]]], dtype=torch.float64)
    k = torch.tensor([[[[1.0], [1.0], [-1.0]]]], dtype=torch.float64)
    v = torch.tensor([[[[10.0], [20.0], [30.0]]]], dtype=torch.float64)
    out = reference_attention(q, k, v, SlidingWindow(2), scale=1.0)
    w = torch.softmax(torch.tensor([2.0 * 1, 2.0 * -1], dtype=torch.float64), 0)
    expected = torch.tensor([10.0, 15.0, float(w[0] * 20 + w[1] * 30)], dtype=torch.float64)
    torch.testing.assert_close(out.flatten(), expected)


def test_queries_without_keys_give_zeros_and_finite_grads():
    pattern = RandomBlocks(8, 1)  # the first block has no earlier block to attend
    q, k, v = _inputs(24, 24)
    for out in (blocked_attention(q, k, v, pattern, chunk=8), reference_attention(q, k, v, pattern)):
        assert torch.equal(out[:, :, :8], torch.zeros_like(out[:, :, :8]))
        assert all(torch.isfinite(g).all() for g in _grads(out, (q, k, v)))


def test_key_padding_mask():
    pattern = Sinks(1) | SlidingWindow(4)
    q, k, v = _inputs(19, 19)
    valid = torch.ones(2, 19, dtype=torch.bool)
    valid[1, :3] = False  # left padding in the second row
    ref = reference_attention(q, k, v, pattern, key_valid=valid)
    out = blocked_attention(q, k, v, pattern, key_valid=valid, chunk=8)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(ref[1], reference_attention(q, k, v, pattern)[1])


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.spec())
def test_flex_eager_equals_reference_forward(pattern):
    q, k, v = (t.detach().float() for t in _inputs(37, 37))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, ran = sparse_attention(q, k, v, pattern, backend="flex-eager")
    assert ran == "flex-eager"
    torch.testing.assert_close(out, reference_attention(q, k, v, pattern), rtol=1e-5, atol=1e-5)


def test_backend_choice_and_errors():
    q, k, v = _inputs(8, 8, dtype=torch.float32)
    assert choose_backend(q, k, v) == "blocked"  # CPU: blocked, also for training
    with pytest.warns(UserWarning, match="no backward on CPU"):
        out, ran = sparse_attention(q, k, v, SlidingWindow(2), backend="flex")  # needs grad: falls back
    assert ran == "blocked"
    torch.testing.assert_close(out, reference_attention(q, k, v, SlidingWindow(2)))
    with pytest.raises(SparselmError, match="unknown attention backend"):
        sparse_attention(q, k, v, SlidingWindow(2), backend="fast")
    with pytest.raises(SparselmError, match="multiple"):
        reference_attention(q[:, :3], k, v, SlidingWindow(2))
    out, ran = sparse_attention(q, k, v, SlidingWindow(2))
    assert ran == "blocked" and out.shape == q.shape


def test_block_mask_builder_follows_the_pytorch_api(monkeypatch):
    """Compiled masks go through create_block_mask's `_compile` flag where PyTorch has it, and
    through torch.compile where a later PyTorch has dropped the flag."""
    from sparselm.attention.backends import flex

    monkeypatch.setattr(flex, "_COMPILED", {})
    monkeypatch.setattr(flex.torch, "compile", lambda fn: ("compiled", fn))

    def without_flag(mask_mod, B, H, q_len, kv_len, device=None):
        return "mask"

    def with_flag(mask_mod, B, H, q_len, kv_len, device=None, _compile=False):
        return _compile

    assert flex._block_mask_builder(without_flag, False) is without_flag
    assert flex._block_mask_builder(without_flag, True) == ("compiled", without_flag)
    assert flex._block_mask_builder(with_flag, True)(None, None, None, 1, 1) is True
    assert flex._block_mask_builder(with_flag, False)(None, None, None, 1, 1) is False
