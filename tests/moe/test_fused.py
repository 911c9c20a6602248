"""The fused MoE kernels (C++) against plain PyTorch, and the PyTorch fallbacks against autograd."""
import pytest
import torch
import torch.nn.functional as F

from sparselm.moe.fused import SwiGLUFn, fused_kernels, rows_sum, swiglu, swiglu_backward
from sparselm.moe.routing import _group_choices, top_k_experts

EXT = fused_kernels(torch.empty(1))
needs_ext = pytest.mark.skipif(EXT is None, reason="needs the C++ kernels built with AVX-512 or AVX2")
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


def _swiglu_ref(h):
    hidden = h.shape[1] // 2
    return F.silu(h[:, :hidden]) * h[:, hidden:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,hidden", [(1, 1), (3, 17), (64, 88), (1, 5000), (257, 33)])
def test_swiglu_forward_backward_match_autograd(dtype, rows, hidden):
    torch.manual_seed(rows * hidden)
    h = (torch.randn(rows, 2 * hidden) * 3).to(dtype)
    grad_act = torch.randn(rows, hidden).to(dtype)
    h64 = h.double().requires_grad_(True)
    ref = _swiglu_ref(h64)
    ref.backward(grad_act.double())
    torch.testing.assert_close(swiglu(h).double(), ref.detach(), **TOL[dtype])
    torch.testing.assert_close(swiglu_backward(h, grad_act).double(), h64.grad, **TOL[dtype])


def test_swiglu_extreme_values():
    h = torch.tensor([[-1e4, 1e4, float("inf"), -90.0, 0.0, 1.0, 1.0, 2.0, 3.0, 1.0]])
    got = swiglu(h)  # gate: -1e4, 1e4, inf, -90, 0
    assert abs(got[0, 0]) < 1e-30 and got[0, 1] == 1e4  # no overflow in exp
    assert got[0, 2] == float("inf")  # inf * sigmoid(inf) * 1
    assert abs(got[0, 3]) < 1e-30 and got[0, 4] == 0


def test_swiglu_fn_gradcheck_fallback():
    h = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)  # float64: the PyTorch path
    assert torch.autograd.gradcheck(SwiGLUFn.apply, (h,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("weighted", [True, False])
def test_rows_sum_forward_backward(dtype, weighted):
    torch.manual_seed(0)
    tokens, k, dim = 37, 3, 21
    src = torch.randn(tokens * k + 5, dim).to(dtype)  # 5 rows nobody uses: zero gradient
    rows = torch.randperm(src.shape[0])[: tokens * k].view(tokens, k)
    weights = torch.randn(tokens, k).to(dtype) if weighted else None
    grad = torch.randn(tokens, dim).to(dtype)

    src64 = src.detach().clone().double().requires_grad_(True)
    w64 = weights.detach().clone().double().requires_grad_(True) if weighted else None
    picked = src64[rows] * (w64[..., None] if weighted else 1.0)
    picked.sum(1).backward(grad.double())

    src_t = src.clone().requires_grad_(True)
    w_t = weights.clone().requires_grad_(True) if weighted else None
    out = rows_sum(src_t, rows, w_t)
    out.backward(grad)
    tol = TOL.get(dtype, dict(rtol=1e-10, atol=1e-10))
    torch.testing.assert_close(out.double(), picked.sum(1).detach(), **tol)
    torch.testing.assert_close(src_t.grad.double(), src64.grad, **tol)
    unused = torch.ones(src.shape[0], dtype=torch.bool)
    unused[rows.reshape(-1)] = False
    assert (src_t.grad[unused] == 0).all()
    if weighted:
        torch.testing.assert_close(w_t.grad.double(), w64.grad, **tol)


@needs_ext
def test_rows_sum_backward_refuses_repeated_rows():
    src = torch.randn(4, 3)
    rows = torch.tensor([[0, 1], [1, 2]])
    with pytest.raises(RuntimeError, match="used twice"):
        EXT.rows_sum_backward(src, rows, None, torch.randn(2, 3), False)
    with pytest.raises(RuntimeError, match="out of range"):
        EXT.rows_sum(src, torch.tensor([[0, 4]]), None)


def _tied_scores(tokens, experts, seed):
    torch.manual_seed(seed)
    scores = torch.randn(tokens, experts).to(torch.bfloat16).float()  # bf16 values: many ties
    scores[0, :] = 1.0  # a row of equal scores: the lowest indices win
    scores[1, -1] = float("nan")  # NaN counts as the highest
    scores[2, :] = 0.0
    scores[2, 0] = -0.0  # -0 == +0: index 0 still first
    return scores


@pytest.mark.parametrize("tokens,experts,k", [(300, 8, 2), (40, 5, 5), (64, 16, 3), (3, 3, 1)])
def test_top_k_experts_tie_rule(tokens, experts, k):
    scores = _tied_scores(tokens, experts, tokens)
    got = top_k_experts(scores, k)
    want = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    assert torch.equal(got, want)
    assert got[0].tolist() == list(range(k))
    assert got[1, 0] == experts - 1
    assert got[2].tolist() == list(range(k))


@needs_ext
@pytest.mark.parametrize("tokens,experts,k", [(300, 8, 2), (64, 16, 3), (1, 4, 4)])
def test_route_top_k_grouping_matches_python(tokens, experts, k):
    scores = _tied_scores(max(tokens, 3), experts, 7)
    choice, rows, token_a, counts = EXT.route_top_k(scores, k)
    rows_ref, token_ref, counts_ref = _group_choices(choice, experts)
    assert torch.equal(rows, rows_ref) and torch.equal(token_a, token_ref) and torch.equal(counts, counts_ref)
    assert sorted(rows.reshape(-1).tolist()) == list(range(scores.shape[0] * k))  # a permutation


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("padded", [False, True], ids=["exact", "padded"])
def test_moe_expert_rows_equals_per_expert_linear(dtype, threads, padded):
    torch.manual_seed(1)
    experts, dim, hidden, tokens = 5, 24, 20, 50
    x = torch.randn(tokens, dim).to(dtype)
    gate_up = (torch.randn(experts, 2 * hidden, dim) / 5).to(dtype)
    down = (torch.randn(experts, dim, hidden) / 5).to(dtype)
    counts = [13, 0, 30, 7, 50]  # one expert without rows, one with every token
    run_rows = [16, 3, 30, 11, 64] if padded else counts  # extra zero rows through the matmuls
    token_index = torch.cat([torch.randperm(tokens)[:n].sort().values for n in counts])
    y = torch.full((sum(counts), dim), float("nan"), dtype=dtype)
    most = max(run_rows)
    x_buf = torch.full((threads * most * dim,), float("nan"), dtype=dtype)  # stale garbage must not leak
    h_buf = torch.full((threads * most * 2 * hidden,), float("nan"), dtype=dtype)
    EXT.moe_expert_rows(x, token_index, counts, run_rows, gate_up, down, y, x_buf, h_buf, threads)
    start = 0
    for e, n in enumerate(counts):
        xe = x[token_index[start:start + n]].double()
        ref = F.linear(_swiglu_ref(F.linear(xe, gate_up[e].double())), down[e].double())
        torch.testing.assert_close(y[start:start + n].double(), ref, **TOL[dtype])
        start += n
    with pytest.raises(RuntimeError, match="too small"):
        EXT.moe_expert_rows(x, token_index, counts, run_rows, gate_up, down, y, x_buf[:10], h_buf, threads)
    with pytest.raises(RuntimeError, match="run_rows"):
        EXT.moe_expert_rows(x, token_index, counts, [12, 0, 30, 7, 50], gate_up, down, y, x_buf, h_buf, threads)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_mm_many_equals_mm(dtype, threads, mode):
    """Views (transposes, row slices into one output), an empty product, a weight that requires
    grad: the worker threads must take on the caller's grad / inference mode."""
    torch.manual_seed(threads)
    weight = torch.randn(3, 20, 12).to(dtype).requires_grad_(True)
    x = torch.randn(40, 12).to(dtype)
    out = torch.full((40, 20), float("nan"), dtype=dtype)
    grad_w = torch.full((3, 20, 12), float("nan"), dtype=dtype)
    splits = [(0, 13), (13, 13), (13, 40)]  # the middle product has no rows
    with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
        a = [x[s:e] for s, e in splits] + [out[s:e].t() for s, e in splits]
        b = [weight[i].t() for i in range(3)] + [x[s:e] for s, e in splits]
        outs = [out[s:e] for s, e in splits] + [grad_w[i] for i in range(3)]
        EXT.mm_many(a[:3], b[:3], outs[:3], threads)  # out = x @ W^T per group
        EXT.mm_many(a[3:], b[3:], outs[3:], threads)  # then [20, n] @ [n, 12] per group
        for i, (s, e) in enumerate(splits):
            ref = x[s:e].double() @ weight[i].detach().double().t()
            torch.testing.assert_close(out[s:e].double(), ref, **TOL[dtype])
            ref_w = out[s:e].double().t() @ x[s:e].double()
            torch.testing.assert_close(grad_w[i].double(), ref_w, **TOL[dtype])
    with pytest.raises(RuntimeError, match="shapes"):
        EXT.mm_many([x], [weight[0].detach()], [out], threads)


@needs_ext
def test_grouped_swiglu_on_threads_matches_serial(monkeypatch):
    """The per-expert products spread over threads (mm_many) give the serial loop's values."""
    from sparselm.moe.grouped_swiglu import grouped_swiglu
    torch.manual_seed(0)
    gate_up = (torch.randn(4, 128, 64) / 8).requires_grad_(True)
    down = (torch.randn(4, 64, 64) / 8).requires_grad_(True)
    counts = [300, 0, 450, 250]
    x = torch.randn(sum(counts), 64)

    def run():
        gate_up.grad = down.grad = None
        xr = x.clone().requires_grad_(True)
        y = grouped_swiglu(xr, gate_up, down, counts)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return y.detach(), xr.grad, gate_up.grad.clone(), down.grad.clone()

    threads_used = []
    real = EXT.mm_many
    monkeypatch.setattr(EXT, "mm_many", lambda *a: threads_used.append(a[3]) or real(*a))
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert EXT.moe_parallel_experts(counts, 64, 64) == 2  # enough work for two threads
        spread = run()
        torch.set_num_threads(1)
        serial = run()
    finally:
        torch.set_num_threads(old)
    assert threads_used == [2, 2, 2, 2]  # forward: two loops, backward: two
    for got, ref in zip(spread, serial):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.all(spread[3][1] == 0) and torch.all(spread[2][1] == 0)  # the expert without rows
