"""sparsify() on whole models: measured sparsity, N:M validity, every family, quality ordering."""
import pytest
import torch

from sparselm.adapters import get_adapter, linear_weight
from sparselm.errors import SparselmError
from sparselm.evaluate import perplexity
from sparselm.prune import Magnitude, SparseGPT, Wanda, is_valid_nm, sparsify
from tests.conftest import random_llama
from tests.core.test_adapters import build


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "qwen2"])
@pytest.mark.parametrize("config", [Wanda(0.5), SparseGPT(pattern="2:4")], ids=["wanda50", "sparsegpt24"])
def test_every_family_prunes_to_target(family, config):
    model = build(family).eval()
    calib = torch.randint(0, 128, (4, 32))
    before = model.get_output_embeddings().weight.clone()
    report = sparsify(model, config, calib, progress=False)
    assert report.sparsity == pytest.approx(0.5, abs=1e-3)
    a = get_adapter(model)
    for block in a.blocks(model):
        for mod in a.linear_layers(block).values():
            w = linear_weight(mod)
            assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)
            if config.parsed_pattern.is_nm:
                assert is_valid_nm(w, 2, 4)
    assert torch.equal(model.get_output_embeddings().weight, before)  # lm_head stays dense


def test_owl_spreads_sparsity_and_keeps_mean():
    model = random_llama(num_hidden_layers=4)
    calib = torch.randint(0, 256, (4, 32))
    report = sparsify(model, Wanda(0.6, owl=True, owl_lambda=0.1), calib, progress=False)
    bs = report.block_sparsity
    assert max(bs) - min(bs) == pytest.approx(0.2, abs=1e-6)  # normalised to [0, 2*lambda]
    assert sum(bs) / len(bs) == pytest.approx(0.6, abs=1e-6)
    assert report.sparsity == pytest.approx(0.6, abs=0.01)


def test_bad_inputs_are_clear():
    model = random_llama(intermediate_size=130)  # 130 columns of down_proj: not divisible by 4
    with pytest.raises(SparselmError, match="not divisible by M=4"):
        sparsify(model, Wanda(pattern="2:4"), torch.randint(0, 256, (2, 8)), progress=False)
    with pytest.raises(SparselmError, match="calibration"):
        sparsify(random_llama(), SparseGPT(0.5), None, progress=False)
    with pytest.raises(SparselmError, match=r"\[0, 1\)"):
        Wanda(1.0)
    with pytest.raises(SparselmError, match="N:M"):
        SparseGPT(pattern="2:4", owl=True)


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.6), ("2:4", 0.5)])
def test_calibrated_methods_beat_magnitude_on_trained_tiny(tiny_pair, tiny_calib, tiny_test_ids, pattern, sparsity):
    import copy

    base, _ = tiny_pair
    ppl = {}
    for cfg in (Magnitude(sparsity, pattern=pattern), Wanda(sparsity, pattern=pattern),
                SparseGPT(sparsity, pattern=pattern)):
        model = copy.deepcopy(base)
        sparsify(model, cfg, tiny_calib, progress=False)
        ppl[cfg.name] = perplexity(model, tiny_test_ids, 128, max_windows=48)
    dense = perplexity(base, tiny_test_ids, 128, max_windows=48)
    assert dense < ppl["sparsegpt"] < ppl["magnitude"], ppl
    assert ppl["wanda"] < ppl["magnitude"], ppl
