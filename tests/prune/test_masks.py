import pytest
import torch

from sparselm.errors import SparselmError
from sparselm.prune.masks import (Pattern, check_sparsity, is_valid_nm, matrix_mask, nm_mask, parse_pattern,
                                  row_mask)


def test_row_mask_hand_computed():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0],
                           [0.5, 0.7, 0.1, 0.9]])
    keep = row_mask(scores, 0.5)
    assert keep.tolist() == [[True, False, True, False], [False, True, False, True]]


def test_row_mask_exact_count_per_row_rounds_down():
    torch.manual_seed(0)
    scores = torch.rand(7, 30)
    keep = row_mask(scores, 0.55)  # floor(0.55 * 30) = 16 removed per row
    assert ((~keep).sum(1) == 16).all()


def test_matrix_mask_exact_total():
    scores = torch.rand(5, 9)
    keep = matrix_mask(scores, 0.4)
    assert (~keep).sum().item() == int(0.4 * 45)
    removed = scores[~keep]
    assert removed.max() <= scores[keep].min()


def test_nm_mask_2_4_hand_computed():
    scores = torch.tensor([[1.0, 4.0, 3.0, 2.0, 8.0, 5.0, 6.0, 7.0]])
    keep = nm_mask(scores, 2, 4)
    assert keep.tolist() == [[False, True, True, False, True, False, False, True]]


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_mask_every_group_valid(n, m):
    torch.manual_seed(1)
    scores = torch.rand(16, 64)
    keep = nm_mask(scores, n, m)
    groups = keep.view(16, 64 // m, m).sum(-1)
    assert (groups == n).all()
    assert is_valid_nm(scores * keep, n, m)


def test_parse_pattern_and_errors():
    assert parse_pattern("2:4") == Pattern(2, 4)
    assert not parse_pattern("unstructured").is_nm
    for bad in ("4:4", "5:4", "0:4", "2-4", "a:b"):
        with pytest.raises(SparselmError):
            parse_pattern(bad)


@pytest.mark.parametrize("s", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_outside_range_is_refused(s):
    with pytest.raises(SparselmError, match=r"\[0, 1\)"):
        check_sparsity(s)
