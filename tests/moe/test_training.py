"""MoE language model: loss includes router losses, bias balancing trains, generation guard, CLI."""
import json

import pytest
import torch

from sparselm.errors import SparselmError
from sparselm.moe.layer import moe_layers, total_aux_loss
from sparselm.moe.training import build_moe_lm, train_lm

ARCH = dict(hidden=32, layers=2, heads=4, kv_heads=2, context=32, experts=4, top_k=2, expert_hidden=16)


def test_training_mode_loss_adds_router_losses():
    model = build_moe_lm(128, **ARCH, balance="aux")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    out = model(input_ids=ids, labels=ids)
    logits = out.logits[:, :-1].flatten(0, 1)
    ce = torch.nn.functional.cross_entropy(logits, ids[:, 1:].flatten())
    aux = total_aux_loss(model)
    assert aux.item() > 0.02  # 2 layers x (0.01 x balance loss >= 1) + z-loss
    torch.testing.assert_close(out.loss, ce + aux)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, ce)  # eval: LM loss only


def test_train_lm_updates_bias_and_learns():
    model = build_moe_lm(64, **ARCH, balance="bias", bias_rate=1e-2)
    ids = torch.arange(64).repeat(40)  # a perfectly predictable stream
    history = train_lm(model, ids, steps=30, batch_size=4, seq_len=16, lr=1e-2, progress=False)
    assert history["losses"][-1] < history["losses"][0] - 1.0
    biases = [layer.router.selection_bias for _, layer in moe_layers(model)]
    assert all(b.abs().max() > 0 for b in biases)
    # every step moves each bias by exactly +-rate (or 0 on exact balance)
    assert all(torch.allclose((b / 1e-2).round(), b / 1e-2, atol=1e-4) for b in biases)


def test_expert_choice_model_refuses_generation():
    model = build_moe_lm(64, **{**ARCH, "experts": 4})
    model.config.router_type = "expert_choice"
    from sparselm.moe.modeling import SparseMoeForCausalLM

    ec = SparseMoeForCausalLM(model.config).eval()
    with pytest.raises(SparselmError, match="not causal"):
        ec.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2)


@pytest.mark.slow
def test_moefy_cli_partition_roundtrip(tmp_path, capsys):
    from sparselm.cli import main
    from sparselm.io import load

    out = tmp_path / "moe"
    assert main(["moefy", "tiny", "--experts", "4", "--top-k", "2", "--method", "partition", "--samples", "8",
                 "--router-steps", "50", "--eval-windows", "4", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["active_mlp_fraction"] == 0.5 and summary["moe_perplexity"] > 1
    model, tok = load(str(out))
    assert model.config.num_experts == 4 and tok is not None
    assert main(["moefy", "tiny", "--experts", "4", "--top-k", "5", "--out", str(tmp_path / "bad")]) == 2
