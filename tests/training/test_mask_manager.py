"""The mask manager on a real (random-init) Llama: masks hold through optimizer steps."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sparselm.training import MaskManager, SparseTrainingConfig


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def run_steps(method, steps=12, distribution="uniform", sparsity=0.8, nm=None, check=None):
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    cfg = SparseTrainingConfig(sparsity=sparsity, method=method, distribution=distribution, total_steps=steps,
                               update_interval=3, gmp_frequency=2, nm=nm)
    mgr = MaskManager(cfg).attach(model, opt)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 128, (2, 16), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        before = {n: int(m.sum()) for n, m in mgr.masks.items()}
        mgr.step()
        opt.zero_grad()
        if check:
            check(mgr, opt, before)
    return model, opt, mgr


def assert_masked_exactly_zero(mgr, opt):
    for t in mgr.targets:
        off = ~mgr.masks[t.name]
        assert (t.param[off] == 0).all()
        for value in opt.state[t.param].values():
            if torch.is_tensor(value) and value.shape == t.param.shape:
                assert (value[off] == 0).all()


@pytest.mark.parametrize("method", ["static", "set", "rigl"])
def test_masks_hold_and_counts_constant(method):
    counts = {}

    def check(mgr, opt, before):
        assert_masked_exactly_zero(mgr, opt)
        after = {n: int(m.sum()) for n, m in mgr.masks.items()}
        assert after == before  # constant active count per layer at every update
        counts.setdefault("first", after)
        assert after == counts["first"]

    model, opt, mgr = run_steps(method, check=check)
    report = mgr.finalize()
    assert report["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert "lm_head.weight" not in report["layers"] and "model.embed_tokens.weight" not in report["layers"]
    if method != "static":
        assert mgr.history and all(h["regrown"] > 0 for h in mgr.history)


def test_rigl_masks_actually_change():
    _, _, mgr = run_steps("rigl", steps=8)  # updates at step 3 (and 6 is past 0.75 * 8)
    assert [h["step"] for h in mgr.history] == [3]
    first = MaskManager(SparseTrainingConfig(sparsity=0.8, method="rigl", total_steps=8)).attach(tiny_llama(), None)
    assert any((first.masks[n] != mgr.masks[n]).any() for n in mgr.masks)


def test_gmp_reaches_final_sparsity_and_masks_only_shrink():
    def check(mgr, opt, before):
        assert_masked_exactly_zero(mgr, opt)
        assert all(int(m.sum()) <= before[n] for n, m in mgr.masks.items())

    _, _, mgr = run_steps("gmp", steps=20, check=check)
    assert mgr.current_sparsity() == pytest.approx(0.8, abs=1e-3)


def test_erk_and_nm_options():
    _, _, mgr = run_steps("set", distribution="erk", sparsity=0.9, steps=6)
    assert mgr.current_sparsity() == pytest.approx(0.9, abs=2e-3)
    assert len(set(round(d, 6) for d in mgr.densities.values())) > 1
    _, _, mgr = run_steps("rigl", sparsity=0.5, nm=(2, 4), steps=6)
    for t in mgr.targets:
        assert (mgr.masks[t.name].view(-1, 4).sum(1) == 2).all()


def test_state_dict_roundtrip_resumes_identically():
    _, _, mgr = run_steps("set", steps=6)
    other = MaskManager(mgr.config).attach(tiny_llama(), None)
    other.load_state_dict(mgr.state_dict())
    assert other.step_count == 6
    assert all(torch.equal(other.masks[n], mgr.masks[n]) for n in mgr.masks)
    assert torch.equal(other._generator.get_state(), mgr._generator.get_state())
