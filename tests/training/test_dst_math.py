"""Hand-checked math of sparse training: ERK, schedules, drop-and-grow."""

import pytest
import torch

from sparselm.errors import SparselmError
from sparselm.training.config import SparseTrainingConfig
from sparselm.training.densities import erk_densities, uniform_densities
from sparselm.training.mask_updates import drop_and_grow, nm_topk_mask, random_mask
from sparselm.training.schedules import cosine_drop_fraction, gmp_sparsity, is_dst_update


def test_erk_matches_closed_form_and_total():
    shapes = {"a": (64, 64), "b": (256, 64), "c": (64, 256), "d": (512, 512)}
    numel = {k: s[0] * s[1] for k, s in shapes.items()}
    dens = erk_densities(shapes, 0.9)
    total = sum(dens[k] * numel[k] for k in shapes)
    assert total == pytest.approx(0.1 * sum(numel.values()), rel=1e-9)
    eps = dens["d"] / ((512 + 512) / (512 * 512))
    for k, (o, i) in shapes.items():
        assert dens[k] == pytest.approx(eps * (o + i) / (o * i), rel=1e-9)


def test_erk_makes_overfull_layers_dense_and_resolves():
    shapes = {"tiny": (4, 4), "big": (1000, 1000)}
    dens = erk_densities(shapes, 0.5)
    assert dens["tiny"] == 1.0  # raw scale 0.5 vs 0.002: would exceed density 1
    assert dens["big"] * 1e6 + 16 == pytest.approx(0.5 * (1e6 + 16))
    assert uniform_densities(shapes, 0.3) == {"tiny": pytest.approx(0.7), "big": pytest.approx(0.7)}


def test_cubic_schedule_formula():
    s_f, s_i, t0, end = 0.9, 0.0, 10, 110
    for t in (10, 35, 60, 109):
        expected = s_f + (s_i - s_f) * (1 - (t - t0) / (end - t0)) ** 3
        assert gmp_sparsity(t, s_f, t0, end, s_i) == pytest.approx(expected)
    assert gmp_sparsity(0, s_f, t0, end) == 0.0 and gmp_sparsity(500, s_f, t0, end) == 0.9
    assert gmp_sparsity(60, s_f, t0, end) == pytest.approx(0.9 * (1 - 0.125))


def test_cosine_drop_fraction_and_update_steps():
    assert cosine_drop_fraction(0, 0.3, 100) == pytest.approx(0.3)
    assert cosine_drop_fraction(50, 0.3, 100) == pytest.approx(0.15)
    assert cosine_drop_fraction(100, 0.3, 100) == 0.0
    assert [t for t in range(0, 40) if is_dst_update(t, 10, 30)] == [10, 20]


def test_rigl_grows_where_handmade_gradient_is_largest():
    mask = torch.zeros(4, 8, dtype=torch.bool)
    mask[:, :4] = True  # 16 active
    weight = torch.arange(1, 33, dtype=torch.float32).view(4, 8) * mask
    grad = torch.zeros(4, 8)
    grad[3, 7], grad[2, 6], grad[0, 5], grad[1, 4] = 9.0, -8.0, 7.0, 6.0
    grad[0, 0] = 100.0  # active: never a grow candidate
    gen = torch.Generator().manual_seed(0)
    new, grown, dropped = drop_and_grow(mask, weight, grad.abs(), 0.25, gen)
    assert int(new.sum()) == 16
    # The 4 smallest active magnitudes are weights 1, 2, 3, 4 (row 0, cols 0-3).
    assert dropped.nonzero().tolist() == [[0, 0], [0, 1], [0, 2], [0, 3]]
    assert sorted(grown.nonzero().tolist()) == [[0, 5], [1, 4], [2, 6], [3, 7]]


def test_just_dropped_are_not_regrown_when_other_candidates_exist():
    gen = torch.Generator().manual_seed(1)
    mask = random_mask((16, 32), 0.2, gen)
    weight = torch.randn(16, 32) * mask
    grad = torch.zeros(16, 32)
    grad[mask] = 50.0  # huge gradient on active ones, including those about to be dropped
    new, grown, dropped = drop_and_grow(mask, weight, grad, 0.3, gen)
    assert int(new.sum()) == int(mask.sum())
    assert not (grown & mask).any() and not (new & dropped).any()


def test_nm_drop_and_grow_keeps_every_group_valid():
    gen = torch.Generator().manual_seed(2)
    mask = random_mask((8, 16), 0.5, gen, nm=(2, 4))
    assert (mask.view(-1, 4).sum(1) == 2).all()
    for _ in range(5):
        weight = torch.randn(8, 16) * mask
        mask, _, _ = drop_and_grow(mask, weight, torch.rand(8, 16), 0.3, gen, nm=(2, 4))
        assert (mask.view(-1, 4).sum(1) == 2).all()
    assert nm_topk_mask(torch.tensor([[4.0, 1.0, 3.0, 2.0]]), 2, 4).tolist() == [[True, False, True, False]]


@pytest.mark.parametrize("kwargs, word", [
    ({"sparsity": 1.0}, "[0, 1)"), ({"sparsity": -0.1}, "[0, 1)"),
    ({"sparsity": 0.5, "update_interval": 0}, "update interval"),
    ({"sparsity": 0.5, "drop_fraction": 0.0}, "drop fraction"),
    ({"sparsity": 0.5, "drop_fraction": 1.0}, "drop fraction"),
    ({"sparsity": 0.5, "method": "magic"}, "method"),
])
def test_bad_config_raises(kwargs, word):
    with pytest.raises(SparselmError, match=word.replace("[", r"\[").replace(")", r"\)")):
        SparseTrainingConfig(**kwargs)
