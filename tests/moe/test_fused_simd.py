"""Edge cases of the vector paths of the fused MoE kernels (8 lanes with AVX2, 16 with AVX-512):
row lengths that leave a partial vector, ranges split across threads mid-row, bf16 rounding
(ties included) against torch's own, NaN / inf and very large gates through the exp."""
import pytest
import torch
import torch.nn.functional as F

from sparselm.moe.fused import fused_kernels
from tests.conftest import with_threads

EXT = fused_kernels(torch.empty(1))
pytestmark = pytest.mark.skipif(EXT is None, reason="needs the C++ kernels built with AVX-512 or AVX2")

# Every length up to four 8-lane vectors and a few past 16-lane ones: each tail length of both paths.
TAIL_WIDTHS = list(range(1, 34)) + [47, 63, 65]


def _swiglu_ref64(h, grad_act):
    """Forward and backward in float64 by autograd."""
    h64 = h.double().requires_grad_(True)
    hidden = h.shape[1] // 2
    act = F.silu(h64[:, :hidden]) * h64[:, hidden:]
    act.backward(grad_act.double())
    return act.detach(), h64.grad


def _swiglu_torch_fp32(h, grad_act):
    """PyTorch's own fp32 ops (the fallback's formulas), NaN and inf as PyTorch gives them."""
    hidden = h.shape[1] // 2
    g, u = h[:, :hidden].float(), h[:, hidden:].float()
    s = torch.sigmoid(g)
    da = grad_act.float()
    return g * s * u, torch.cat([da * u * s * (1.0 + g * (1.0 - s)), da * (g * s)], dim=1)


@pytest.mark.parametrize("hidden", TAIL_WIDTHS)
def test_swiglu_tails_fp32(hidden):
    torch.manual_seed(hidden)
    h = torch.randn(5, 2 * hidden) * 4
    grad_act = torch.randn(5, hidden)
    act_ref, grad_ref = _swiglu_ref64(h, grad_act)
    torch.testing.assert_close(EXT.swiglu_forward(h).double(), act_ref, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(EXT.swiglu_backward(h, grad_act).double(), grad_ref, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("hidden", TAIL_WIDTHS)
def test_swiglu_bf16_rounds_once_like_torch(hidden):
    """bf16 in, bf16 out: the kernel widens exactly, computes in fp32 and rounds once to nearest
    even, so it equals its own fp32 result rounded by torch, bit for bit."""
    torch.manual_seed(100 + hidden)
    h = (torch.randn(7, 2 * hidden) * 4).bfloat16()
    grad_act = torch.randn(7, hidden).bfloat16()
    want_act = EXT.swiglu_forward(h.float()).bfloat16()
    want_grad = EXT.swiglu_backward(h.float(), grad_act.float()).bfloat16()
    assert torch.equal(EXT.swiglu_forward(h).view(torch.int16), want_act.view(torch.int16))
    assert torch.equal(EXT.swiglu_backward(h, grad_act).view(torch.int16), want_grad.view(torch.int16))


def test_swiglu_bf16_ties_against_torch_rounding():
    """Gates of 20 and more have sigmoid exactly 1 in fp32, so act = g * u and the gradients are
    exact fp32 products of two bf16 values (16 significant bits): rounding them to bf16 hits
    many exact ties, which must go to the even neighbour as torch's conversion does."""
    torch.manual_seed(0)
    rows, hidden = 64, 45
    # All 128 mantissas of [20, 40) (bf16 spacing there is 0.125) and random ups.
    g = (20 + torch.randint(0, 160, (rows, hidden)) * 0.125).bfloat16()
    u = torch.randn(rows, hidden).bfloat16()
    da = torch.randn(rows, hidden).bfloat16()
    h = torch.cat([g, u], dim=1)
    act = EXT.swiglu_forward(h)
    grad = EXT.swiglu_backward(h, da)
    gf, uf, daf = g.float(), u.float(), da.float()
    assert torch.equal(act.view(torch.int16), (gf * uf).bfloat16().view(torch.int16))
    assert torch.equal(grad[:, hidden:].view(torch.int16), (daf * gf).bfloat16().view(torch.int16))
    assert torch.equal(grad[:, :hidden].view(torch.int16), (daf * uf).bfloat16().view(torch.int16))
    ties = ((gf * uf).view(torch.int32) & 0xFFFF) == 0x8000
    assert ties.sum() > 20  # the test does exercise the tie rule


def test_swiglu_split_across_threads_mid_row():
    """Two threads split the flat range in multiples of 16 elements, so a row of 37 is cut
    mid-row and mid-vector: the same values as one thread."""
    torch.manual_seed(1)
    h = torch.randn(700, 74) * 3
    grad_act = torch.randn(700, 37)
    for dtype in (torch.float32, torch.bfloat16):
        hd, gd = h.to(dtype), grad_act.to(dtype)
        one = with_threads(1, lambda: (EXT.swiglu_forward(hd), EXT.swiglu_backward(hd, gd)))
        two = with_threads(2, lambda: (EXT.swiglu_forward(hd), EXT.swiglu_backward(hd, gd)))
        assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@pytest.mark.parametrize("layout", ["one_row", "one_column"])
def test_swiglu_large_gates_through_the_exp(layout):
    """Gates out to +-120: the exp saturates (e^-g overflows fp32 below about -88.7) without
    overflow or NaN; silu(g) -> g above, -> -0 below, as in float64. One row of 967 (full
    vectors and a tail) or 967 rows of 1 (tails only)."""
    g = torch.cat([torch.linspace(-120, 120, 961), torch.tensor([-88.8, -88.7, -88.6, -87.5, 87.5, 88.8])])
    u = torch.linspace(-2, 2, g.numel())
    da = torch.linspace(1, -1, g.numel())
    if layout == "one_row":
        h, da = torch.cat([g, u]).view(1, -1), da.view(1, -1)
    else:
        h, da = torch.stack([g, u], dim=1), da.view(-1, 1)
    act_ref, grad_ref = _swiglu_ref64(h, da)
    act, grad = EXT.swiglu_forward(h), EXT.swiglu_backward(h, da)
    assert torch.isfinite(act).all() and torch.isfinite(grad).all()
    # Tiny values (sigmoid below ~1e-38 is subnormal in fp32) need an absolute tolerance, and
    # d gate one of fp32 size where s + g s (1 - s) cancels (g near -1.28).
    torch.testing.assert_close(act.double(), act_ref, rtol=2e-6, atol=1e-35)
    torch.testing.assert_close(grad.double(), grad_ref, rtol=2e-6, atol=1e-6)
    act, g, u = act.view(-1), g.view(-1), u.view(-1)
    assert (act[g < -89].abs() < 1e-35).all() and torch.equal(act[g > 89], (g * u)[g > 89])


# Gates down to -30 (sigmoid 1e-13); the saturated range below -88.7 is the next test's.
GATES = [float("nan"), float("inf"), 0.0, -0.0, 1.5, -3.0, 30.0, -30.0, 100.0, 1e30]
OTHERS = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1.5, -3.0, 1e30, -1e30]


def _special_case(gates, dtype):
    """Every (gate, up, grad) combination of the special values, as one row of 8k + 3."""
    g, u, da = (t.reshape(-1) for t in torch.meshgrid(torch.tensor(gates), torch.tensor(OTHERS),
                                                       torch.tensor(OTHERS), indexing="ij"))
    pad = (3 - g.numel()) % 8  # a tail for both the 8- and the 16-lane loops
    g, u, da = (torch.cat([t, t[:pad]]) for t in (g, u, da))
    return torch.cat([g, u]).view(1, -1).to(dtype), da.view(1, -1).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_nan_inf_like_torch(dtype):
    """NaN where PyTorch's fp32 ops give NaN, inf where they give inf, the values otherwise."""
    h, da = _special_case(GATES, dtype)
    act_ref, grad_ref = _swiglu_torch_fp32(h, da)
    act, grad = EXT.swiglu_forward(h).float(), EXT.swiglu_backward(h, da).float()
    tol = dict(rtol=1e-5, atol=1e-30) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-30)
    torch.testing.assert_close(act, act_ref.to(dtype).float(), equal_nan=True, **tol)
    torch.testing.assert_close(grad, grad_ref.to(dtype).float(), equal_nan=True, **tol)
    assert act.isnan().any() and act.isinf().any() and grad.isnan().any() and grad.isinf().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_saturated_negative_gates_like_torch(dtype):
    """Gates below -88.7, where e^-g overflows fp32 and PyTorch's sigmoid is exactly 0:
    silu(-inf) = -inf * 0 = NaN, silu(-100) = -0 (times an infinite up: NaN), as in PyTorch
    and the scalar path."""
    h, da = _special_case([float("-inf"), -1e30, -100.0, -89.0], dtype)
    act_ref, grad_ref = _swiglu_torch_fp32(h, da)
    act, grad = EXT.swiglu_forward(h).float(), EXT.swiglu_backward(h, da).float()
    torch.testing.assert_close(act, act_ref.to(dtype).float(), equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(grad, grad_ref.to(dtype).float(), equal_nan=True, rtol=0, atol=0)


def _rows_case(tokens, k, dim, dtype, seed, spare=3):
    gen = torch.Generator().manual_seed(seed)
    src = torch.randn(tokens * k + spare, dim, generator=gen).to(dtype)
    rows = torch.randperm(src.shape[0], generator=gen)[: tokens * k].view(tokens, k)
    weights = torch.randn(tokens, k, generator=gen)
    grad = torch.randn(tokens, dim, generator=gen).to(dtype)
    return src, rows, weights, grad


@pytest.mark.parametrize("dim", [1, 7, 8, 9, 15, 16, 17, 24, 31, 33, 65])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_rows_sum_tails_fp32(dim, k):
    src, rows, weights, grad = _rows_case(29, k, dim, torch.float32, dim * 10 + k)
    for w in (weights, None):
        ref = (src.double()[rows] * (w.double()[..., None] if w is not None else 1.0)).sum(1)
        torch.testing.assert_close(EXT.rows_sum(src, rows, w).double(), ref, rtol=1e-6, atol=1e-6)
        grad_src, grad_w = EXT.rows_sum_backward(src, rows, w, grad, w is not None)
        # grad_src is one fp32 product per element: exactly torch's.
        want = torch.zeros_like(src)
        picked = grad[:, None, :].expand(-1, k, -1)
        want[rows.reshape(-1)] = (picked * w[..., None] if w is not None else picked).reshape(-1, dim)
        assert torch.equal(grad_src, want)  # unused rows (and the columns past each row's end) are 0
        if w is not None:
            ref_w = (src.double()[rows] * grad.double()[:, None, :]).sum(-1)
            torch.testing.assert_close(grad_w.double(), ref_w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dim", [1, 7, 8, 9, 15, 16, 17, 33])
@pytest.mark.parametrize("k", [1, 2])
def test_rows_sum_bf16_rounds_once_like_torch(dim, k):
    """bf16: the fp32 result of the same kernel, rounded by torch, bit for bit."""
    src, rows, weights, grad = _rows_case(31, k, dim, torch.bfloat16, dim + 7 * k)
    for w in (weights, None):
        out = EXT.rows_sum(src, rows, w)
        assert torch.equal(out.view(torch.int16), EXT.rows_sum(src.float(), rows, w).bfloat16().view(torch.int16))
        grad_src, grad_w = EXT.rows_sum_backward(src, rows, w, grad, w is not None)
        ref_src, ref_w = EXT.rows_sum_backward(src.float(), rows, w, grad.float(), w is not None)
        assert torch.equal(grad_src.view(torch.int16), ref_src.bfloat16().view(torch.int16))
        if w is not None:
            torch.testing.assert_close(grad_w, ref_w, rtol=1e-6, atol=1e-6)


def test_rows_sum_bf16_every_value_and_ties():
    """All 65536 bf16 bit patterns times 1.5 (a product with one bit below bf16's precision: a tie
    whenever the value's last mantissa bit is set), rounded by the kernel and by torch; NaN stays
    NaN, products past fp32's range are inf, row length 13 leaves a tail in every row. The sum
    starts from +0, so -0 * 1.5 sums to +0 (as torch's -0 + 0 does); the gradient keeps -0."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    src = bits.view(torch.bfloat16)[: 13 * 5041].view(5041, 13)
    rows = torch.arange(5041).view(-1, 1)
    weights = torch.full((5041, 1), 1.5)
    got = EXT.rows_sum(src, rows, weights)
    grad_src, _ = EXT.rows_sum_backward(torch.zeros_like(src), rows, weights, src, False)
    for out, want in ((got, (src.float() * 1.5 + 0.0).bfloat16()), (grad_src, (src.float() * 1.5).bfloat16())):
        nan = want.isnan()
        assert torch.equal(out.isnan(), nan)
        assert torch.equal(out.view(torch.int16)[~nan], want.view(torch.int16)[~nan])
