"""Factorization math: full rank reproduces the layer, truncation optimality, allocation."""
import pytest
import torch

from sparselm.errors import SparselmError
from sparselm.lowrank.allocate import kept_parameters, sensitivity_ranks, uniform_ranks
from sparselm.lowrank.factorize import asvd_decomposition, svd_decomposition, whitened_decomposition, whitening_factor
from sparselm.lowrank.linear import LowRankLinear, rank_saves_parameters

torch.manual_seed(0)
W = torch.randn(12, 8)
X = torch.randn(200, 8) * torch.linspace(0.1, 3, 8)  # [N, I], uneven feature scales
GRAM = X.T @ X / X.shape[0]


@pytest.mark.parametrize("decomposition", [
    lambda: svd_decomposition(W),
    lambda: asvd_decomposition(W, X.abs().mean(0)),
    lambda: whitened_decomposition(W, GRAM),
])
def test_full_rank_reproduces_the_layer(decomposition):
    a, b = decomposition().factors(8)
    layer = torch.nn.Linear(8, 12)
    low = LowRankLinear.from_factors(a, b, layer.bias.data)
    x = torch.randn(5, 8)
    torch.testing.assert_close(low(x), x @ W.T + layer.bias, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(low.dense_weight(), W, rtol=1e-5, atol=1e-5)


def test_whitened_truncation_minimises_output_error():
    """SVD-LLM's claim: at rank r the output error ||(W - W_r) X|| equals the discarded singular
    values of W L, and is no larger than plain SVD's."""
    rank = 3
    dec = whitened_decomposition(W, GRAM)
    a, b = dec.factors(rank)
    out_err = ((X @ (W - b @ a).T) ** 2).sum() / X.shape[0]
    assert out_err.item() == pytest.approx((dec.s[rank:] ** 2).sum().item(), rel=1e-4)
    a2, b2 = svd_decomposition(W).factors(rank)
    assert out_err < ((X @ (W - b2 @ a2).T) ** 2).sum() / X.shape[0]


def test_whitening_fixes_singular_second_moment():
    x = torch.randn(100, 4)
    x[:, 2] = 0  # a dead input makes X^T X singular
    lower = whitening_factor(x.T @ x / 100)
    assert torch.isfinite(lower).all() and lower[2, 2] > 0
    a, b = whitened_decomposition(torch.randn(6, 4), x.T @ x / 100).factors(4)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()


def test_rank_checks_and_break_even():
    assert rank_saves_parameters(4, 12, 8) and not rank_saves_parameters(5, 12, 8)  # 12*8/20 = 4.8
    with pytest.raises(SparselmError, match="larger than"):
        svd_decomposition(W).factors(9)
    with pytest.raises(SparselmError, match="larger than"):
        LowRankLinear(8, 12, 9)


def test_uniform_allocation_hits_the_budget():
    shapes = {"a": (100, 100), "b": (300, 100)}
    ranks = uniform_ranks(shapes, 0.5)
    assert ranks == {"a": 25, "b": 37}  # floor(0.5 * 50), floor(0.5 * 75)
    assert kept_parameters(ranks, shapes) <= 0.5 * (100 * 100 + 300 * 100)
    assert uniform_ranks(shapes, 1.0) == {"a": None, "b": None}
    with pytest.raises(SparselmError, match="keep"):
        uniform_ranks(shapes, 0.0)
    with pytest.raises(SparselmError, match="rank 0"):
        uniform_ranks(shapes, 0.01)


def test_sensitivity_allocation_gives_sensitive_layers_more():
    shapes = {"easy": (100, 100), "hard": (100, 100)}
    grid = (0.2, 0.4, 0.6, 0.8)
    sensitivity = {"easy": {r: 0.01 * (1 - r) for r in grid}, "hard": {r: 1.0 * (1 - r) for r in grid}}
    ranks = sensitivity_ranks(shapes, sensitivity, 0.6)
    kept = {n: kept_parameters({n: ranks[n]}, {n: shapes[n]}) for n in shapes}
    assert kept["hard"] > kept["easy"]
    assert kept_parameters(ranks, shapes) <= 0.6 * 20000
