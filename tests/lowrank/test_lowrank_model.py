"""`lowrank` on a random-init Llama: budgets, save/reload, errors before work."""
import copy

import pytest
import torch

from sparselm.errors import SparselmError
from sparselm.io import load
from sparselm.lowrank import LowRankLinear, load_lowrank, lowrank, save_lowrank
from sparselm.lowrank.model_factorization import calibration_loss

X = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(2))


def logits(model):
    with torch.no_grad():
        return model(input_ids=X).logits


@pytest.mark.parametrize("method", ["svd", "asvd", "whiten"])
def test_budget_and_layers(llama, calib, method):
    report = lowrank(llama, calib, keep=0.6, method=method, progress=False)
    swapped = [m for m in llama.modules() if isinstance(m, LowRankLinear)]
    assert len(swapped) == 3 * 7 and report.kept_fraction <= 0.6
    assert report.kept_fraction > 0.55  # floor() loses at most one rank per layer
    for m in swapped:
        assert m.rank * (m.in_features + m.out_features) < m.in_features * m.out_features
    assert not isinstance(llama.lm_head, LowRankLinear)


def test_whiten_beats_svd_on_calibration_loss(llama, calib):
    dense = calibration_loss(llama, calib)
    losses = {}
    for method in ("svd", "whiten"):
        model = copy.deepcopy(llama)
        lowrank(model, calib, keep=0.4, method=method, progress=False)
        losses[method] = calibration_loss(model, calib) - dense
    assert losses["whiten"] < losses["svd"]


def test_sensitivity_allocation_meets_budget(llama, calib):
    report = lowrank(llama, calib, keep=0.6, method="whiten", allocation="sensitivity", sensitivity_rows=2,
                     progress=False)
    assert 0.5 < report.kept_fraction <= 0.6


def test_save_and_reload_gives_same_logits(llama, calib, tmp_path):
    lowrank(llama, calib, keep=0.5, method="whiten", progress=False)
    save_lowrank(llama, None, tmp_path / "lr")
    assert not hasattr(llama.config, "sparselm_lowrank")
    for reloaded in (load_lowrank(tmp_path / "lr")[0], load(tmp_path / "lr")[0]):
        assert isinstance(reloaded.model.layers[0].mlp.up_proj, LowRankLinear)
        torch.testing.assert_close(logits(reloaded), logits(llama), rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, match", [
    ({"keep": 1.5}, "keep"),
    ({"keep": 0.001}, "rank 0"),
    ({"method": "qr"}, "unknown low-rank method"),
    ({"allocation": "random"}, "unknown rank allocation"),
    ({"ranks": {"model.layers.0.mlp.up_proj": 100}}, "larger than"),
    ({"ranks": {"lm_head": 4}}, "not a decoder-block"),
])
def test_bad_input_fails_before_any_work(llama, calib, kwargs, match):
    before = copy.deepcopy(llama.state_dict())
    with pytest.raises(SparselmError, match=match):
        lowrank(llama, calib, progress=False, **kwargs)
    assert llama.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in llama.state_dict().items())


def test_methods_with_activations_need_calibration(llama):
    with pytest.raises(SparselmError, match="calibration"):
        lowrank(llama, None, method="whiten", progress=False)
    lowrank(llama, None, method="svd", keep=0.5, progress=False)  # plain SVD needs no data
