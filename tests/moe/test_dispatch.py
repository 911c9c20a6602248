"""Sort-based dispatch equals the naive every-expert reference, outputs and gradients."""
import pytest
import torch

from sparselm.moe.dispatch import dispatch_sorted
from sparselm.moe.experts import SwiGLUExperts, grouped_mm_available
from sparselm.moe.layer import MoEConfig, MoELayer

ROUTER_SETTINGS = {
    "topk_renorm": dict(router="top_k", renormalize=True),
    "topk_raw": dict(router="top_k", renormalize=False),
    "topk_unit": dict(router="top_k", unit_gates=True),
    "topk_bias": dict(router="top_k", bias_update_rate=0.1),
    "topk_scaled": dict(router="top_k", gate_scale=2.0),
    "expert_choice": dict(router="expert_choice"),
}


def _layer(settings, capacity_factor, dispatch="sorted", shared=0, seed=0, hidden=12, expert_hidden=10):
    torch.manual_seed(seed)
    cfg = MoEConfig(hidden_size=hidden, expert_hidden=expert_hidden, num_experts=5, top_k=2, capacity_factor=capacity_factor,
                    shared_experts=shared, dispatch=dispatch, **settings)
    layer = MoELayer(cfg, dtype=torch.float64).double()
    if settings.get("bias_update_rate"):
        layer.router.selection_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1, -0.4]))
    return layer


def _grads(layer, x, method):
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    layer.dispatch_method = method
    out = layer(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in layer.named_parameters()}
    return out.detach(), x.grad.clone(), grads


@pytest.mark.parametrize("router", sorted(ROUTER_SETTINGS))
@pytest.mark.parametrize("capacity_factor", [None, 0.6])
def test_sorted_dispatch_matches_naive(router, capacity_factor):
    if router == "expert_choice" and capacity_factor is None:
        capacity_factor = 1.0  # expert choice always has a capacity
    layer = _layer(ROUTER_SETTINGS[router], capacity_factor, shared=1 if router == "topk_raw" else 0)
    x = torch.randn(3, 11, 12, dtype=torch.float64)
    out_ref, gx_ref, gw_ref = _grads(layer, x, "naive")
    out, gx, gw = _grads(layer, x, "sorted")
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-10)
    for name in gw_ref:
        torch.testing.assert_close(gw[name], gw_ref[name], rtol=1e-10, atol=1e-10, msg=name)
    if router != "topk_unit":  # unit gates are constant: that router is fitted apart (MoEfication)
        assert gw["router.weight"].abs().sum() > 0  # gates carry gradient into the router
    if capacity_factor is not None and capacity_factor < 1 and router != "expert_choice":
        assert layer.metrics()["dropped_fraction"] > 0  # the dropping path was exercised


def test_dropped_tokens_get_zero_output():
    layer = _layer(ROUTER_SETTINGS["topk_renorm"], capacity_factor=0.3)
    x = torch.randn(40, 12, dtype=torch.float64)
    routing = layer.router(x)
    routed = torch.zeros(40, dtype=torch.bool)
    routed[routing.token_index] = True
    assert (~routed).any()
    out = dispatch_sorted(x, routing, layer.experts)
    assert torch.all(out[~routed] == 0)


@pytest.mark.skipif(not grouped_mm_available("cpu", torch.float32), reason="torch._grouped_mm unavailable")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_matches_slices(dtype):
    torch.manual_seed(0)
    layer = _layer(ROUTER_SETTINGS["topk_renorm"], None, hidden=16, expert_hidden=24).to(dtype)
    assert layer.experts.grouped_mm_aligned(dtype)
    x = torch.randn(64, 16, dtype=dtype)
    out_ref, gx_ref, gw_ref = _grads(layer, x, "sorted")
    out, gx, gw = _grads(layer, x, "grouped_mm")
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, out_ref, **tol)
    torch.testing.assert_close(gx, gx_ref, **tol)
    for name in gw_ref:
        torch.testing.assert_close(gw[name], gw_ref[name], **tol, msg=name)


def test_expert_forward_by_hand():
    # One expert, D=1, F=1: out = w_down * silu(w_gate x) * (w_up x).
    experts = SwiGLUExperts(1, 1, 1, dtype=torch.float64)
    with torch.no_grad():
        experts.gate_up_E2FD.copy_(torch.tensor([[[2.0], [3.0]]]))
        experts.down_EDF.copy_(torch.tensor([[[0.5]]]))
    x = torch.tensor([[1.0]], dtype=torch.float64)
    silu2 = 2.0 / (1.0 + torch.exp(torch.tensor(-2.0, dtype=torch.float64)))
    assert torch.allclose(experts.expert(0, x), 0.5 * silu2 * 3.0)
    assert torch.allclose(experts.forward_every_expert(x)[0], 0.5 * silu2 * 3.0)


def test_grouped_mm_where_it_cannot_run_is_a_clear_error(monkeypatch):
    import importlib

    from sparselm.errors import SparselmError

    dispatch_module = importlib.import_module("sparselm.moe.dispatch")  # the package exports a function of that name

    monkeypatch.setattr(dispatch_module, "_grouped_mm_works", lambda device_type, dtype: False)
    layer = _layer(ROUTER_SETTINGS["topk_renorm"], None)
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    with pytest.raises(SparselmError, match="use dispatch method 'auto' or 'sorted'"):
        _grads(layer, x, "grouped_mm")
    _grads(layer, x, "auto")  # auto falls back to the per-expert slices
