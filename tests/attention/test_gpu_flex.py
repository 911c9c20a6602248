"""On a CUDA GPU, `sparse_attention` runs compiled FlexAttention and equals a dense masked
softmax, outputs and gradients of q, k, v, in fp32 and bf16, at lengths on and off its 128 block."""
import sys

import pytest
import torch

from sparselm.attention import BlockSparse, GlobalTokens, SlidingWindow, Strided, sparse_attention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

dispatch_module = sys.modules["sparselm.attention.backends.dispatch"]

DEVICE = "cuda"
BATCH, HEADS, HEAD_DIM = 2, 4, 64
GLOBAL = (0, 1, 2, 3, 100, 700)
BLOCK = 64


def _block_layout(blocks: int = 16) -> torch.Tensor:
    """A fixed block layout: the diagonal (every query has a key), block 0 and a seeded third of the rest."""
    gen = torch.Generator().manual_seed(0)
    layout = torch.rand(blocks, blocks, generator=gen) < 0.33
    layout |= torch.eye(blocks, dtype=torch.bool)
    layout[:, 0] = True
    return layout


# Each pattern with its rule written out by hand on query positions i [T, 1] and key positions j [1, T].
PATTERNS = {
    "window": (SlidingWindow(64), lambda i, j: (i - j) < 64),
    "strided": (Strided(32), lambda i, j: ((i - j) < 32) | ((i - j) % 32 == 0)),
    "global+window": (GlobalTokens(GLOBAL) | SlidingWindow(32),
                      lambda i, j: ((i - j) < 32) | torch.isin(i, torch.tensor(GLOBAL))
                      | torch.isin(j, torch.tensor(GLOBAL))),
    "blocks": (BlockSparse(_block_layout(), block=BLOCK), lambda i, j: _block_layout()[i // BLOCK, j // BLOCK]),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Largest error allowed, relative to the largest magnitude of the reference tensor. fp32 (TF32
# off): summation order only. bf16: inputs are exact, but the kernel's matmuls round the
# probabilities and its gradients' operands to bf16 (about 2^-8 relative) before summing.
REL_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def fp32_matmuls_and_room_to_recompile():
    """True fp32 matmuls (no TF32) for the fp32 cases, and every (pattern, length, dtype) its
    own compiled kernel: past dynamo's recompile limit (8 by default) it would quietly run
    flex_attention uncompiled; here that raises instead."""
    limits = {"recompile_limit": 64, "fail_on_recompile_limit_hit": True}
    limits = {key: value for key, value in limits.items() if hasattr(torch._dynamo.config, key)}
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch._dynamo.config.patch(limits):
        yield
    torch.backends.cuda.matmul.allow_tf32 = before


def _hand_mask(rule, length: int) -> torch.Tensor:
    i = torch.arange(length)[:, None]  # [T, 1] query positions
    j = torch.arange(length)[None, :]  # [1, T] key positions
    return (j <= i) & rule(i, j)  # [T, T], causal


def _dense_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(D) + mask) v in float64, [B, H, T, D]; every row has a key."""
    scores = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5  # [B, H, T, T]
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return probs @ v.double()


def _inputs(length: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    q, k, v = (torch.randn(BATCH, HEADS, length, HEAD_DIM, generator=gen, device=DEVICE).to(dtype).requires_grad_()
               for _ in range(3))
    grad_out = torch.randn(BATCH, HEADS, length, HEAD_DIM, generator=gen, device=DEVICE)
    return q, k, v, grad_out


def _assert_near(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    actual = actual.detach()
    assert actual.device.type == DEVICE and actual.dtype == dtype, what
    assert torch.isfinite(actual).all(), what
    tol = REL_TOL[dtype] * float(expected.abs().max())
    err = float((actual.double() - expected).abs().max())
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g} (tolerance relative to max |ref|)"


# Each pattern once, each (length, dtype) pair once; 1000 is not a multiple of flex's 128-token
# blocks. Every case is its own compiled forward and backward kernel: on a cold H200, 4-15 s of
# compile each (fp32 and the lookup-table patterns the slower), so the full 16-case product would
# take minutes.
CASES = [("window", 256, "fp32"), ("strided", 1000, "bf16"), ("global+window", 1000, "fp32"),
         ("blocks", 256, "bf16")]


@pytest.mark.parametrize("name,length,dtype_name", CASES, ids=["-".join(map(str, case)) for case in CASES])
def test_flex_matches_dense_masked_softmax(name, length, dtype_name):
    pattern, rule = PATTERNS[name]
    dtype = DTYPES[dtype_name]
    mask = _hand_mask(rule, length)
    assert torch.equal(pattern.mask(length), mask)  # the pattern's own rule says the same
    assert mask.diagonal().all() and not mask.all()  # every query has a key; the pattern is sparse
    q, k, v, grad_out = _inputs(length, dtype)

    out, ran = sparse_attention(q, k, v, pattern)
    assert ran == "flex"  # CUDA with gradients: the fused FlexAttention kernel
    assert out.shape == q.shape and out.dtype == dtype and out.device.type == DEVICE
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(dtype))

    ref = _dense_attention(q, k, v, mask.to(DEVICE))
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out.double())
    _assert_near(out, ref.detach(), dtype, "output")
    for what, got, want in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        _assert_near(got, want.double(), dtype, what)


def test_auto_backend_is_flex_on_cuda(monkeypatch):
    """The dispatcher hands CUDA inputs to `flex_sparse_attention`, compiled, with or without gradients."""
    calls = []
    real = dispatch_module.flex_sparse_attention

    def spy(q, k, v, pattern, **kwargs):
        calls.append((q.device.type, kwargs.get("compiled")))
        return real(q, k, v, pattern, **kwargs)

    monkeypatch.setattr(dispatch_module, "flex_sparse_attention", spy)
    pattern, rule = PATTERNS["strided"]
    q, k, v, grad_out = _inputs(1000, torch.bfloat16, seed=1)  # a case above: its kernel is compiled already
    out, ran = sparse_attention(q, k, v, pattern)
    out.backward(grad_out.to(out.dtype))
    assert ran == "flex" and calls == [(DEVICE, True)]
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
    with torch.no_grad():
        out_eval, ran_eval = sparse_attention(q, k, v, pattern)
    assert ran_eval == "flex" and calls == [(DEVICE, True)] * 2
    ref = _dense_attention(q.detach(), k.detach(), v.detach(), _hand_mask(rule, 1000).to(DEVICE))
    _assert_near(out_eval, ref, torch.bfloat16, "no-grad output")
