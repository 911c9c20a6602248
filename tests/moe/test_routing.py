"""Routers, capacity, balancing losses and metrics against hand-computed values."""
import math

import pytest
import torch

from sparselm.errors import SparselmError
from sparselm.moe.layer import MoEConfig, MoELayer
from sparselm.moe.losses import load_balancing_loss, router_z_loss
from sparselm.moe.metrics import load_cv, max_violation, router_entropy
from sparselm.moe.router import TopKRouter
from sparselm.moe.routing import expert_capacity, expert_choice_routing, top_k_routing


def test_balance_loss_by_hand():
    # probs chosen directly through logits = log(p): token 0 -> [.75, .25], token 1 -> [.6, .4]
    probs = torch.tensor([[0.75, 0.25], [0.6, 0.4]])
    r = top_k_routing(probs.log(), top_k=1)
    assert r.selected_counts.tolist() == [2, 0]
    # f = [1, 0], P = [(0.75 + 0.6) / 2, ...] -> L = 2 * 0.675
    assert load_balancing_loss(r.probs, r.selected_counts).item() == pytest.approx(1.35, abs=1e-6)
    # balanced: f = [.5, .5], P = [.5, .5] -> L = 1
    probs = torch.tensor([[0.75, 0.25], [0.25, 0.75]])
    r = top_k_routing(probs.log(), top_k=1)
    assert load_balancing_loss(r.probs, r.selected_counts).item() == pytest.approx(1.0, abs=1e-6)


def test_balance_loss_gradient_only_through_probs():
    logits = torch.tensor([[2.0, 0.0, -1.0]], requires_grad=True)
    r = top_k_routing(logits, top_k=1)
    load_balancing_loss(r.probs, r.selected_counts).backward()
    p = torch.softmax(logits.detach(), -1)[0]
    f = torch.tensor([1.0, 0.0, 0.0])
    # d/dlogit_j of 3 * sum_i f_i p_i = 3 * p_j (f_j - sum_i f_i p_i)
    expected = 3 * p * (f - (f * p).sum())
    torch.testing.assert_close(logits.grad[0], expected)


def test_z_loss_by_hand():
    logits = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    lse0 = math.log(math.e ** 1 + math.e ** 2)
    lse1 = math.log(math.e ** 3 + 1.0)
    assert router_z_loss(logits).item() == pytest.approx((lse0 ** 2 + lse1 ** 2) / 2, rel=1e-6)


def test_layer_aux_loss_combines_coefficients():
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=8, expert_hidden=4, num_experts=4, top_k=2, balance_loss_coef=0.5, z_loss_coef=0.25)
    layer = MoELayer(cfg)
    x = torch.randn(10, 8)
    layer(x)
    r = layer.router(x)
    expected = 0.5 * load_balancing_loss(r.probs, r.selected_counts) + 0.25 * router_z_loss(r.logits)
    torch.testing.assert_close(layer.aux_loss, expected)


def test_top2_gates_renormalised_or_not():
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    r = top_k_routing(probs.log(), top_k=2, renormalize=False)
    assert r.expert_index.tolist() == [0, 1]
    torch.testing.assert_close(r.gates, torch.tensor([0.5, 0.3]))
    r = top_k_routing(probs.log(), top_k=2, renormalize=True)
    torch.testing.assert_close(r.gates, torch.tensor([0.625, 0.375]))
    r = top_k_routing(probs.log(), top_k=2, unit_gates=True)
    torch.testing.assert_close(r.gates, torch.tensor([1.0, 1.0]))


def test_capacity_drops_later_tokens_and_second_choices_first():
    # 4 tokens, 2 experts, top-1, all prefer expert 0; capacity factor 1 -> C = ceil(4/2) = 2
    logits = torch.tensor([[1.0, 0.0]] * 4)
    assert expert_capacity(4, 1, 2, 1.0) == 2
    r = top_k_routing(logits, top_k=1, capacity=2)
    assert r.token_index.tolist() == [0, 1]
    assert r.dropped_fraction == pytest.approx(0.5)
    assert r.kept_counts.tolist() == [2, 0] and r.selected_counts.tolist() == [4, 0]
    # top-2 with C = 2: token 2's first choice (expert 1) beats tokens 0/1's second choices
    logits = torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    r = top_k_routing(logits, top_k=2, capacity=2)
    kept = sorted(zip(r.token_index.tolist(), r.expert_index.tolist()))
    assert kept == [(0, 0), (0, 1), (1, 0), (2, 1), (2, 2)]  # (1, 1) dropped: expert 1 full


def test_expert_choice_each_expert_takes_top_tokens():
    probs = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.1, 0.9]])
    r = expert_choice_routing(probs.log(), capacity=1)
    assert sorted(zip(r.expert_index.tolist(), r.token_index.tolist())) == [(0, 0), (1, 2)]
    torch.testing.assert_close(r.gates.sort().values, torch.tensor([0.7, 0.9]))
    assert r.dropped_fraction == pytest.approx(1 / 3)


def test_metrics_by_hand():
    counts = torch.tensor([2.0, 6.0])
    assert load_cv(counts) == pytest.approx(0.5)
    assert max_violation(counts) == pytest.approx(0.5)
    assert router_entropy(torch.full((3, 4), 0.25)).tolist() == pytest.approx([math.log(4)] * 3)
    layer = MoELayer(MoEConfig(hidden_size=4, expert_hidden=4, num_experts=2, top_k=1))
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
    layer(torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0], [1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
    m = layer.metrics()
    assert m["tokens_per_expert"] == [3, 1]
    assert m["load_cv"] == pytest.approx(0.5) and m["max_violation"] == pytest.approx(0.5)
    assert m["dropped_fraction"] == 0.0


def test_bias_balancing_reduces_imbalance_on_skewed_router():
    torch.manual_seed(0)
    router = TopKRouter(16, 8, 2, bias_update_rate=0.003)
    with torch.no_grad():
        router.weight[0] += 0.15  # skew: experts 0 and 1 get most of the tokens
        router.weight[1] += 0.1
    x = torch.randn(512, 16) + 1.0
    before = load_cv(router(x).selected_counts)
    for _ in range(100):
        router.update_bias(router(x).selected_counts)
    after = load_cv(router(x).selected_counts)
    assert before > 0.8
    assert after < 0.1 and after < before / 10
    assert router.selection_bias[0] < 0  # the overloaded expert was pushed down


@pytest.mark.parametrize("kwargs, words", [
    (dict(top_k=9), "top-k"),
    (dict(capacity_factor=0.0), "capacity factor"),
    (dict(router="random"), "router"),
])
def test_bad_config_raises(kwargs, words):
    base = dict(hidden_size=8, expert_hidden=8, num_experts=8, top_k=2)
    base.update(kwargs)
    with pytest.raises(SparselmError, match=words):
        MoEConfig(**base)
