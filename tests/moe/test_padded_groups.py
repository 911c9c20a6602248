"""Expert groups padded with zero rows (bf16 on CPU, see `matmul_rows`) give the unpadded result."""
import sys

import pytest
import torch

from sparselm.moe.dispatch import _padded_groups, matmul_rows, pads_expert_rows
from sparselm.moe.experts import SwiGLUExperts, grouped_mm_available
from sparselm.moe.fused import fused_kernels
from sparselm.moe.layer import MoEConfig, MoELayer

dispatch_module = sys.modules["sparselm.moe.dispatch"]  # the package exports a function of that name
needs_ext = pytest.mark.skipif(fused_kernels(torch.zeros(1)) is None,
                               reason="needs the C++ kernels built with AVX-512 or AVX2")


def test_matmul_rows_bounds_and_reuse():
    assert [matmul_rows(n) for n in range(65)] == list(range(65))  # small groups: exact
    for n in range(65, 5000):
        m = matmul_rows(n)
        assert m >= n and m % 16 == 0 and matmul_rows(m) == m  # a padded size is its own padding
        if n <= 512:
            assert m - n < 16
        else:
            assert m % 32 == 0 and m - n < max(32, n / 32)  # at most ~6% extra rows
    assert len({matmul_rows(n) for n in range(1025, 2049)}) == 32  # 32 shapes per power of two


def test_only_bf16_and_fp16_on_cpu_pad():
    assert pads_expert_rows(torch.zeros(1, dtype=torch.bfloat16))
    assert pads_expert_rows(torch.zeros(1, dtype=torch.float16))
    assert not pads_expert_rows(torch.zeros(1))
    assert not pads_expert_rows(torch.zeros(1, dtype=torch.float64))


def test_padded_layout_keeps_every_assignment():
    torch.manual_seed(0)
    tokens, slots, experts = 200, 2, 3
    expert_index = torch.randint(experts, (slots * tokens,))
    order = torch.argsort(expert_index, stable=True)
    counts = torch.bincount(expert_index, minlength=experts).tolist()
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    src_A = order % tokens
    src_P, inverse_P, pad_rows, padded = _padded_groups(src_A, inverse, counts)
    assert padded == [matmul_rows(n) for n in counts] and padded != counts
    assert src_P.numel() == sum(padded)
    assert torch.equal(src_P[inverse_P], src_A[inverse])  # each (slot, token) finds its token
    assert pad_rows.numel() == sum(padded) - sum(counts)
    assert not set(pad_rows.tolist()) & set(inverse_P.tolist())  # no assignment lands on a pad row
    starts = torch.tensor([0] + padded).cumsum(0)
    group_of_row = torch.bucketize(inverse_P, starts[1:], right=True)  # padded group of each assignment
    assert torch.equal(group_of_row, expert_index)


def _layer(dtype, dim=32, hidden=24):
    torch.manual_seed(3)
    cfg = MoEConfig(hidden_size=dim, expert_hidden=hidden, num_experts=4, top_k=2, dispatch="sorted")
    return MoELayer(cfg).to(dtype)


def _run(layer, x):
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    out = layer(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in layer.named_parameters()}


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_padded_dispatch_equals_unpadded(dtype, monkeypatch):
    """Training and no-grad paths, with every group padded by a few rows (fp32 padded too, so
    the comparison is tight there), against the same layer without padding."""
    layer = _layer(dtype)
    x = torch.randn(150, 32).to(dtype)  # ~75 rows per expert: bf16 pads these for real
    monkeypatch.setattr(dispatch_module, "pads_expert_rows", lambda x: False)
    out_ref, gx_ref, gw_ref = _run(layer, x)
    with torch.no_grad():
        inf_ref = layer(x)
    monkeypatch.setattr(dispatch_module, "pads_expert_rows", lambda x: True)
    monkeypatch.setattr(dispatch_module, "matmul_rows", lambda n: n + 5 if n else 0)
    calls = []
    original = dispatch_module._padded_groups
    monkeypatch.setattr(dispatch_module, "_padded_groups", lambda *a: calls.append(1) or original(*a))
    out, gx, gw = _run(layer, x)
    with torch.no_grad():
        inf = layer(x)
    assert calls  # the padded layout was used
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, out_ref, **tol)
    torch.testing.assert_close(inf, inf_ref, **tol)
    torch.testing.assert_close(gx, gx_ref, **tol)
    for name in gw_ref:
        torch.testing.assert_close(gw[name], gw_ref[name], **tol, msg=name)
        assert torch.isfinite(gw[name]).all()


@needs_ext
def test_bf16_pads_by_default(monkeypatch):
    layer = _layer(torch.bfloat16)
    x = torch.randn(301, 32).to(torch.bfloat16)  # ~150 rows per expert: above the exact-size range
    calls = []
    original = dispatch_module._padded_groups
    monkeypatch.setattr(dispatch_module, "_padded_groups", lambda *a: calls.append(a[2]) or original(*a))
    out, gx, gw = _run(layer, x)
    assert calls and [matmul_rows(n) for n in calls[0]] != calls[0]  # some group was padded
    monkeypatch.setattr(dispatch_module, "pads_expert_rows", lambda x: False)
    out_ref, gx_ref, gw_ref = _run(layer, x)
    tol = dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, out_ref, **tol)
    torch.testing.assert_close(gx, gx_ref, **tol)
    for name in gw_ref:
        torch.testing.assert_close(gw[name], gw_ref[name], **tol, msg=name)


experts_module = sys.modules["sparselm.moe.experts"]


@pytest.mark.parametrize("use_grouped_mm", [False, True], ids=["slices", "grouped_mm"])
def test_forward_grouped_pads_any_caller(use_grouped_mm, monkeypatch):
    """Callers other than dropless dispatch (capacity routing, expert parallelism) hand
    unpadded groups to forward_grouped, which pads them itself in bf16 on CPU."""
    if use_grouped_mm and not grouped_mm_available("cpu", torch.bfloat16):
        pytest.skip("torch._grouped_mm unavailable")
    torch.manual_seed(4)
    experts = SwiGLUExperts(3, 32, 24, dtype=torch.bfloat16)
    counts = [80, 0, 131]  # 80 stays, 131 becomes 144
    assert [matmul_rows(n) for n in counts] == [80, 0, 144]

    def run():
        experts.zero_grad()
        x = torch.randn(sum(counts), 32, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
        x.requires_grad_(True)
        y = experts.forward_grouped(x, counts, use_grouped_mm=use_grouped_mm)
        (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return y.detach(), x.grad, experts.gate_up_E2FD.grad.clone(), experts.down_EDF.grad.clone()

    calls = []
    original = experts_module.SwiGLUExperts._forward_padded
    monkeypatch.setattr(experts_module.SwiGLUExperts, "_forward_padded",
                        lambda self, *a: calls.append(a[2]) or original(self, *a))
    padded = run()
    assert calls == [[80, 0, 144]]
    monkeypatch.setattr(experts_module, "pads_expert_rows", lambda x: False)
    plain = run()
    for got, ref in zip(padded, plain):
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
