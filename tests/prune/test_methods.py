"""The pruning math on single layers: exact sparsity, valid N:M groups, and reconstruction
error ordering on correlated inputs (SparseGPT < Wanda, magnitude; refine <= SparseGPT)."""
import pytest
import torch

from sparselm.prune.magnitude import global_magnitude_threshold, magnitude_prune
from sparselm.prune.masks import Pattern, is_valid_nm
from sparselm.prune.refine import layer_error, refine_kept_weights
from sparselm.prune.sparsegpt import sparsegpt_prune
from sparselm.prune.statistics import HessianAccumulator, InputNormAccumulator
from sparselm.prune.wanda import wanda_prune, wanda_scores


def correlated_layer(rows=48, cols=64, tokens=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, cols // 4, generator=g)
    mix = torch.randn(cols // 4, cols, generator=g)
    scale = torch.exp(torch.randn(cols, generator=g))  # uneven input scales, as in LLMs
    x = (z @ mix + 0.3 * torch.randn(tokens, cols, generator=g)) * scale  # [T, C] correlated inputs
    w = torch.randn(rows, cols, generator=g)
    return w, x


def stats(x):
    h = HessianAccumulator(x.shape[1])
    n = InputNormAccumulator(x.shape[1])
    for chunk in x.split(300):  # uneven batches: running means must not care
        h.add(chunk)
        n.add(chunk)
    return h, n


def test_accumulators_match_closed_form():
    _, x = correlated_layer()
    h, n = stats(x)
    torch.testing.assert_close(h.hessian, 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(n.sq_mean, (x ** 2).mean(0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.sq_mean, n.sq_mean, rtol=1e-4, atol=1e-4)


def test_wanda_score_and_exact_per_row_sparsity():
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0]])
    sq = torch.tensor([16.0, 4.0, 1.0, 0.25])  # norms 4, 2, 1, 0.5
    assert wanda_scores(w, sq).tolist() == [[4.0, 4.0, 3.0, 2.0]]
    pruned, keep = wanda_prune(w, sq, 0.5)
    assert keep.tolist() == [[True, True, False, False]]
    torch.manual_seed(0)
    w, x = correlated_layer(rows=33, cols=80)
    _, n = stats(x)
    pruned, keep = wanda_prune(w, n.sq_mean, 0.6)
    assert ((pruned == 0).sum(1) == int(0.6 * 80)).all()


@pytest.mark.parametrize("pattern", [Pattern(2, 4), Pattern(4, 8)])
def test_every_method_gives_valid_nm(pattern):
    w, x = correlated_layer()
    h, n = stats(x)
    outs = [magnitude_prune(w, 0.5, pattern)[0], wanda_prune(w, n.sq_mean, 0.5, pattern)[0],
            sparsegpt_prune(w, h.hessian, 0.5, pattern)[0]]
    for out in outs:
        assert is_valid_nm(out, pattern.n, pattern.m)
        assert (out == 0).float().mean().item() == pytest.approx(1 - pattern.n / pattern.m)


def test_sparsegpt_beats_wanda_and_magnitude_on_correlated_inputs():
    w, x = correlated_layer()
    h, n = stats(x)
    for pattern, s in ((Pattern(), 0.5), (Pattern(), 0.7), (Pattern(2, 4), 0.5)):
        err = {
            "magnitude": layer_error(magnitude_prune(w, s, pattern)[0], w, h.hessian),
            "wanda": layer_error(wanda_prune(w, n.sq_mean, s, pattern)[0], w, h.hessian),
            "sparsegpt": layer_error(sparsegpt_prune(w, h.hessian, s, pattern, blocksize=16)[0], w, h.hessian),
        }
        assert err["sparsegpt"] < err["wanda"] and err["sparsegpt"] < err["magnitude"], (pattern, err)


def test_sparsegpt_sparsity_and_mask_consistency():
    w, x = correlated_layer(rows=40, cols=256)
    h, _ = stats(x)
    out, keep = sparsegpt_prune(w, h.hessian, 0.5, blocksize=128)
    assert (out == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)
    assert torch.equal(out != 0, keep)


def test_sparsegpt_dead_inputs_are_pruned_not_nan():
    w, x = correlated_layer()
    x[:, 5] = 0.0
    h, _ = stats(x)
    out, keep = sparsegpt_prune(w, h.hessian, 0.5)
    assert torch.isfinite(out).all()
    assert not keep[:, 5].any()


def test_sparsegpt_zero_sparsity_is_identity_up_to_rounding():
    w, x = correlated_layer()
    h, _ = stats(x)
    out, keep = sparsegpt_prune(w, h.hessian, 0.0)
    assert keep.all()
    torch.testing.assert_close(out, w)


def test_failed_cholesky_raises_dampening_with_warning_not_magnitude():
    w, x = correlated_layer(cols=32, tokens=8)  # 8 tokens: rank-deficient Hessian
    h, _ = stats(x)
    hess = h.hessian.clone()
    hess -= 0.5 * torch.eye(32) * hess.diagonal().mean()  # indefinite at 1% dampening
    with pytest.warns(RuntimeWarning, match="dampening"):
        out, _ = sparsegpt_prune(w, hess, 0.5)
    assert torch.isfinite(out).all()


def test_refine_lowers_error_keeps_mask():
    w, x = correlated_layer()
    h, _ = stats(x)
    out, keep = sparsegpt_prune(w, h.hessian, 0.7, blocksize=16)
    refined = refine_kept_weights(out, w, h.hessian, keep, iters=100)
    assert torch.equal(refined != 0, keep)
    assert layer_error(refined, w, h.hessian) < 0.95 * layer_error(out, w, h.hessian)


def test_global_magnitude_threshold():
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0, 6.0, 7.0])
    thr = global_magnitude_threshold([a, b], 0.5)  # 3 of 7 below or at the threshold
    assert thr == 3.0
