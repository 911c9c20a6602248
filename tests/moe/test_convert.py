"""Dense -> MoE conversion: exactness where the math says so, save/reload, bad input."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from sparselm.errors import SparselmError
from sparselm.moe.io import load_moe, save_moe
from sparselm.moe.partition import balanced_kmeans, partition
from sparselm.moe.upcycle import upcycle


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(1))


def test_upcycled_model_equals_dense_and_reloads(dense, ids, tmp_path):
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    moe = upcycle(dense, num_experts=4, top_k=2)
    with torch.no_grad():
        ref = dense(ids).logits
        got = moe(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())  # input untouched
    save_moe(moe, None, tmp_path / "up")
    reloaded, _ = load_moe(tmp_path / "up")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, got)


def test_partition_with_all_experts_is_exact(dense, ids):
    # 172 neurons into 5 experts: 35 each (+ zero padding), all experts active -> exact.
    moe, report = partition(dense, ids, num_experts=5, top_k=5, router_steps=5, progress=False)
    assert [sum(r["expert_sizes"]) for r in report] == [172, 172]
    assert all(max(r["expert_sizes"]) == 35 for r in report)
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)


def test_partition_top2_reloads_with_same_logits(dense, ids, tmp_path):
    moe, report = partition(dense, ids, num_experts=4, top_k=2, router_steps=100, progress=False)
    layer = moe.model.layers[0].mlp
    assert layer.config.unit_gates and layer.experts.expert_hidden == 43
    assert all(r["router_top_k_recall"] > 0.5 for r in report)  # better than chance (0.5)
    save_moe(moe, None, tmp_path / "part")
    reloaded, _ = load_moe(tmp_path / "part")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, moe(ids).logits)


def test_balanced_kmeans_recovers_planted_groups():
    gen = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(4, 32, generator=gen), dim=1)
    truth = torch.arange(4).repeat_interleave(6)[torch.randperm(24, generator=gen)]
    points = torch.nn.functional.normalize(centers[truth] + 0.1 * torch.randn(24, 32, generator=gen), dim=1)
    labels = balanced_kmeans(points, 4, seed=3)
    assert torch.bincount(labels).tolist() == [6, 6, 6, 6]
    for c in range(4):  # each found cluster is one planted group
        assert len(set(truth[labels == c].tolist())) == 1


def test_unsupported_family_raises():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(SparselmError, match="Llama"):
        upcycle(gpt2)


def test_pruning_unused_experts_keeps_logits(dense, ids):
    from sparselm.moe.expert_pruning import expert_scores, prune_experts

    moe = upcycle(dense, num_experts=6, top_k=2, expert_noise=0.05)
    for block in moe.model.layers:  # experts 1 and 4 are never selected
        block.mlp.router.selection_bias[[1, 4]] = -10.0
    scores = expert_scores(moe, ids, "usage", progress=False)
    assert all(s[1] == 0 and s[4] == 0 and s.sum() == ids.numel() * 2 for s in scores.values())
    with torch.no_grad():
        ref = moe(ids).logits
    report = prune_experts(moe, ids, keep=4, criterion="contribution", progress=False)
    assert all(r["kept"] == [0, 2, 3, 5] for r in report.values())
    assert moe.config.num_experts == 4 and moe.model.layers[0].mlp.experts.gate_up_E2FD.shape[0] == 4
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, ref, rtol=1e-5, atol=1e-5)
