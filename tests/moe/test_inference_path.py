"""The no-grad inference path of MoELayer equals the autograd dispatch, and is taken."""
import sys

import pytest
import torch

from sparselm.moe.experts import grouped_mm_available
from sparselm.moe.layer import MoEConfig, MoELayer
from sparselm.moe.routing import top_k_groups, top_k_routing

# The package re-exports a function named `dispatch`, which hides the submodule attribute.
dispatch_module = sys.modules["sparselm.moe.dispatch"]
layer_module = sys.modules["sparselm.moe.layer"]

ROUTER_SETTINGS = {
    "topk_renorm": dict(router="top_k", renormalize=True),
    "topk_raw": dict(router="top_k", renormalize=False, shared_experts=1),
    "topk_unit": dict(router="top_k", unit_gates=True, renormalize=False),
    "topk_unit_scaled": dict(router="top_k", unit_gates=True, gate_scale=0.5),
    "topk_bias": dict(router="top_k", bias_update_rate=0.1),
    "topk_scaled": dict(router="top_k", gate_scale=2.0),
    "topk_3": dict(router="top_k", top_k=3),
    "expert_choice": dict(router="expert_choice"),
}
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _layer(settings, capacity_factor=None, dtype=torch.float32, hidden=12, expert_hidden=10, seed=0):
    torch.manual_seed(seed)
    fields = dict(top_k=2, dispatch="sorted")
    fields.update(settings)
    cfg = MoEConfig(hidden_size=hidden, expert_hidden=expert_hidden, num_experts=5, capacity_factor=capacity_factor,
                    **fields)
    layer = MoELayer(cfg).to(dtype).eval()
    if settings.get("bias_update_rate"):
        layer.router.selection_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1, -0.4]))
    return layer


def _both_paths(layer, x):
    """(fast output, reference output, fast metrics, reference metrics), both without grad."""
    with torch.no_grad():
        layer.inference_fast_path = False
        layer.stats.reset()
        ref = layer(x)
        ref_metrics = layer.metrics()
        layer.inference_fast_path = True
        layer.stats.reset()
        out = layer(x)
        metrics = layer.metrics()
    return out, ref, metrics, ref_metrics


def _assignments(routing) -> list[tuple[int, int]]:
    """Sorted (expert, token) pairs of a Routing or an ExpertGroups."""
    if hasattr(routing, "counts"):
        experts = torch.repeat_interleave(torch.arange(len(routing.counts)), torch.tensor(routing.counts))
    else:
        experts = routing.expert_index
    with torch.no_grad():
        return sorted(zip(experts.tolist(), routing.token_index.tolist()))


def _assert_same_metrics(metrics, ref_metrics):
    assert metrics["tokens_per_expert"] == ref_metrics["tokens_per_expert"]
    assert metrics["dropped_fraction"] == pytest.approx(ref_metrics["dropped_fraction"])
    assert metrics["router_entropy"] == pytest.approx(ref_metrics["router_entropy"], rel=1e-5)


@pytest.fixture(params=["loop", "grouped_mm", "loop_unaligned"])
def expert_rows(request, monkeypatch):
    """Which way dispatch_inference runs the experts; returns the layer's (D, F).
    grouped_mm needs 16-byte aligned rows (D, F = 16, 24 are, in fp32 and bf16); with
    D, F = 12, 10 the loop is the only way."""
    if request.param == "grouped_mm":
        if not grouped_mm_available("cpu", torch.float32) or not grouped_mm_available("cpu", torch.bfloat16):
            pytest.skip("torch._grouped_mm unavailable")
        monkeypatch.setattr(dispatch_module, "_GROUPED_MM_MAX_ROWS", 1 << 30)
        monkeypatch.setattr(dispatch_module, "_c_loop", lambda x, experts: None)  # as without the C++ loop
    else:
        monkeypatch.setattr(dispatch_module, "_GROUPED_MM_MAX_ROWS", 0)
    calls = []
    for name in ("_expert_rows_loop", "_expert_rows_grouped_mm"):
        original = getattr(dispatch_module, name)
        monkeypatch.setattr(dispatch_module, name,
                            lambda *args, _f=original, _n=name: calls.append(_n) or _f(*args))
    yield (12, 10) if request.param == "loop_unaligned" else (16, 24)
    assert calls and set(calls) == {"_expert_rows_" + request.param.replace("_unaligned", "")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("capacity_factor", [None, 0.6], ids=["dropless", "capacity"])
@pytest.mark.parametrize("router", sorted(ROUTER_SETTINGS))
def test_inference_path_matches_dispatch(router, capacity_factor, dtype, expert_rows):
    if router == "expert_choice" and capacity_factor is None:
        capacity_factor = 1.0  # expert choice always has a capacity
    dim, hidden = expert_rows
    layer = _layer(ROUTER_SETTINGS[router], capacity_factor, dtype, hidden=dim, expert_hidden=hidden)
    x = torch.randn(3, 13, dim).to(dtype)  # 39 tokens: odd, not a multiple of the experts
    out, ref, metrics, ref_metrics = _both_paths(layer, x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, **TOLERANCE[dtype])
    _assert_same_metrics(metrics, ref_metrics)
    x_TD = x.reshape(-1, dim)
    assert _assignments(layer.router.route_grouped(x_TD)) == _assignments(layer.router(x_TD))
    if capacity_factor is not None and capacity_factor < 1 and router != "expert_choice":
        assert metrics["dropped_fraction"] > 0  # the dropping path was exercised


@pytest.mark.parametrize("dispatch", ["sorted", "grouped_mm", "auto"])
def test_inference_path_matches_each_dispatch_method(dispatch):
    if dispatch == "grouped_mm" and not grouped_mm_available("cpu", torch.float32):
        pytest.skip("torch._grouped_mm unavailable")
    layer = _layer(dict(dispatch=dispatch), hidden=16, expert_hidden=24)  # grouped_mm needs aligned rows
    x = torch.randn(101, 16)
    out, ref, _, _ = _both_paths(layer, x)
    torch.testing.assert_close(out, ref, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("router", ["topk_unit", "topk_renorm", "expert_choice"])
def test_expert_without_tokens(router, dtype, expert_rows):
    dim, hidden = expert_rows
    layer = _layer(ROUTER_SETTINGS[router], 1.0 if router == "expert_choice" else None, dtype, dim, hidden)
    x = torch.randn(31, dim)
    x[:, 0] = 3.0 + torch.rand(31)
    with torch.no_grad():
        layer.router.weight.mul_(0.1)
        layer.router.weight[2] = 0.0
        layer.router.weight[2, 0] = -10.0  # expert 2's logit is always far below the others
    out, ref, metrics, ref_metrics = _both_paths(layer, x.to(dtype))
    if router != "expert_choice":  # expert choice gives every expert its C tokens
        assert metrics["tokens_per_expert"][2] == 0
    torch.testing.assert_close(out, ref, **TOLERANCE[dtype])
    _assert_same_metrics(metrics, ref_metrics)


def test_inference_path_taken_without_grad(monkeypatch):
    layer = _layer(ROUTER_SETTINGS["topk_unit"])
    x = torch.randn(20, 12)

    def refuse(*args, **kwargs):
        raise AssertionError("the autograd dispatch ran without grad")

    monkeypatch.setattr(layer_module, "dispatch", refuse)
    with torch.no_grad():
        layer(x)
    assert layer.aux_loss is None
    with torch.inference_mode():
        layer(x)
    with torch.no_grad():  # a workspace first made under inference mode is still writable here
        layer(x)


def test_autograd_path_taken_with_grad(monkeypatch):
    layer = _layer(ROUTER_SETTINGS["topk_renorm"])

    def refuse(*args, **kwargs):
        raise AssertionError("the inference path ran with grad enabled")

    monkeypatch.setattr(layer_module, "dispatch_inference", refuse)
    out = layer(torch.randn(20, 12))
    out.sum().backward()
    assert layer.aux_loss is not None and layer.aux_loss.requires_grad
    assert layer.experts.gate_up_E2FD.grad is not None


def test_naive_dispatch_and_disabled_flag_keep_the_configured_dispatch(monkeypatch):
    calls = []
    monkeypatch.setattr(layer_module, "dispatch_inference", lambda *a, **k: calls.append(1))
    x = torch.randn(9, 12)
    with torch.no_grad():
        _layer(dict(dispatch="naive"))(x)
        layer = _layer({})
        layer.inference_fast_path = False
        layer(x)
    assert not calls


def test_subclass_with_its_own_dispatch_keeps_it():
    # Expert parallelism overrides _dispatch; the inference path must not bypass it.
    class OwnDispatch(MoELayer):
        def _dispatch(self, x_TD, routing):
            return torch.full_like(x_TD, 7.0)

    torch.manual_seed(0)
    layer = OwnDispatch(MoEConfig(hidden_size=12, expert_hidden=10, num_experts=5, top_k=2))
    with torch.no_grad():
        assert torch.all(layer(torch.randn(9, 12)) == 7.0)


def test_balance_bookkeeping_matches_in_training_mode():
    loads = []
    for fast in (False, True):
        layer = _layer(ROUTER_SETTINGS["topk_bias"]).train()
        layer.inference_fast_path = fast
        with torch.no_grad():
            layer(torch.randn(2, 17, 12, generator=torch.Generator().manual_seed(3)))
        loads.append(layer._load_since_bias_update.clone())
    torch.testing.assert_close(loads[1], loads[0])
    assert loads[0].sum() == 2 * 17 * 2


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_top_k_groups_choose_like_top_k_routing_with_ties(top_k):
    # bf16-rounded logits on a coarse grid: many exact ties, also at the k-th place.
    logits = (torch.randn(257, 6, generator=torch.Generator().manual_seed(0)) * 2).round() / 2
    ref = top_k_routing(logits.clone(), top_k, unit_gates=True)
    groups = top_k_groups(logits.clone(), top_k, unit_gates=True)
    chosen_ref = sorted(zip(ref.expert_index.tolist(), ref.token_index.tolist()))
    expert_A = torch.repeat_interleave(torch.arange(6), torch.tensor(groups.counts))
    assert sorted(zip(expert_A.tolist(), groups.token_index.tolist())) == chosen_ref
    # slot_rows point at the right rows, in top_k_routing's slot order
    rows_KT = groups.slot_rows.t().reshape(-1)
    assert groups.token_index[rows_KT].tolist() == ref.token_index.tolist()
    assert expert_A[rows_KT].tolist() == ref.expert_index.tolist()
    assert groups.selected_counts.tolist() == ref.selected_counts.tolist()
    # and the tie rule is the documented one: equal scores go to the lower expert index
    want_TK = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :top_k]
    assert ref.expert_index.view(top_k, -1).t().tolist() == want_TK.tolist()


def test_grouped_mm_probe_ignores_grad_mode():
    with torch.no_grad():
        without_grad = grouped_mm_available("cpu", torch.float32)
    with torch.inference_mode():
        in_inference = grouped_mm_available("cpu", torch.float32)
    assert without_grad == in_inference == grouped_mm_available("cpu", torch.float32)


def test_no_tokens():
    layer = _layer(ROUTER_SETTINGS["topk_renorm"], hidden=16, expert_hidden=24)
    with torch.no_grad():
        out = layer(torch.randn(0, 16))
    assert out.shape == (0, 16)
    assert layer.metrics()["tokens_per_expert"] == [0] * 5
