"""The math and surgery of each structured step, checked by hand on small tensors."""
import torch
import torch.nn as nn

from sparselm.structured.heads import head_output_energy, kept_head_layout, prune_attention_heads, units_to_remove
from sparselm.structured.layers import block_influence, least_influential
from sparselm.structured.module_slicing import slice_linear, top_indices
from sparselm.structured.neurons import activation_neuron_scores, prune_mlp_neurons, select_neurons
from sparselm.errors import SparselmError
import pytest


def test_activation_neuron_scores_by_hand():
    down = torch.tensor([[3.0, 0.0, 1.0], [4.0, 2.0, 0.0]])  # column norms 5, 2, 1
    sq_mean = torch.tensor([1.0, 16.0, 4.0])  # rms 1, 4, 2
    assert torch.allclose(activation_neuron_scores(down, sq_mean), torch.tensor([5.0, 8.0, 2.0], dtype=torch.float64))
    assert select_neurons(torch.tensor([5.0, 8.0, 2.0]), 1 / 3).tolist() == [0, 1]


def test_top_indices_keeps_order_and_breaks_ties_low():
    assert top_indices(torch.tensor([1.0, 3.0, 3.0, 0.0]), 2).tolist() == [1, 2]
    assert top_indices(torch.tensor([2.0, 2.0, 2.0]), 1).tolist() == [0]


def test_slice_linear_rows_and_columns():
    layer = nn.Linear(4, 3)
    rows = slice_linear(layer, torch.tensor([0, 2]), "out")
    cols = slice_linear(layer, torch.tensor([1, 3]), "in")
    x = torch.randn(5, 4)
    assert torch.equal(rows(x), layer(x)[:, [0, 2]])
    assert torch.equal(cols.weight, layer.weight[:, [1, 3]]) and torch.equal(cols.bias, layer.bias)


def test_pruned_mlp_equals_dense_mlp_with_neurons_zeroed(llama):
    mlp = llama.model.layers[0].mlp
    x = torch.randn(2, 5, 64)
    keep = torch.tensor([0, 3, 7, 100, 171])
    with torch.no_grad():
        mask = torch.zeros(172)
        mask[keep] = 1
        reference = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x) * mask)
        prune_mlp_neurons(mlp, {"gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj}, keep)
        assert mlp.gate_proj.weight.shape == (5, 64) and mlp.down_proj.weight.shape == (64, 5)
        torch.testing.assert_close(mlp(x), reference)


def test_head_output_energy_matches_direct_computation():
    torch.manual_seed(0)
    heads, dim, hidden, tokens = 3, 4, 6, 50
    o = torch.randn(hidden, heads * dim)
    a = torch.randn(tokens, heads * dim)
    energy = head_output_energy(o, a.T @ a / tokens, dim)
    direct = [((a[:, h * dim:(h + 1) * dim] @ o[:, h * dim:(h + 1) * dim].T) ** 2).sum(1).mean() for h in range(heads)]
    torch.testing.assert_close(energy, torch.stack(direct).double(), rtol=1e-5, atol=1e-5)


def test_group_layout_keeps_whole_kv_groups():
    scores = torch.tensor([1.0, 1.0, 5.0, 5.0, 0.1, 9.0])  # 3 groups of 2: sums 2, 10, 9.1
    kept_q, kept_kv = kept_head_layout(scores, None, 3, 1, "groups")
    assert kept_kv.tolist() == [1, 2] and kept_q.tolist() == [2, 3, 4, 5]
    kept_q, kept_kv = kept_head_layout(scores, None, 3, 1, "query")
    assert kept_kv.tolist() == [0, 1, 2] and kept_q.tolist() == [0, 2, 5]


def test_head_ratio_checks():
    assert units_to_remove(0.5, 4, 2, "groups") == 1
    assert units_to_remove(0.25, 8, 4, "groups") == 1
    with pytest.raises(SparselmError, match="achievable ratios"):
        units_to_remove(0.25, 4, 2, "groups")  # one head of four: not a whole group of two
    with pytest.raises(SparselmError, match="every attention head"):
        units_to_remove(0.9, 4, 2, "groups")
    with pytest.raises(SparselmError, match="do not split"):
        units_to_remove(0.5, 6, 4, "groups")


def test_pruned_attention_equals_heads_zeroed_in_o_proj(llama):
    """Dropping KV group 0 (query heads 0, 1) gives the output of the dense attention with those
    heads' columns of o_proj zeroed."""
    layer = llama.model.layers[0]
    attn = layer.self_attn
    x = torch.randn(1, 6, 64)
    pos = torch.arange(6)[None]
    emb = llama.model.rotary_emb(x, pos)
    with torch.no_grad():
        zeroed = attn.o_proj.weight.clone()
        zeroed[:, :32] = 0
        saved = attn.o_proj.weight.clone()
        attn.o_proj.weight.copy_(zeroed)
        reference = attn(x, position_embeddings=emb, attention_mask=None)[0]
        attn.o_proj.weight.copy_(saved)
        proj = {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj}
        prune_attention_heads(attn, proj, torch.tensor([2, 3]), torch.tensor([1]), 16)
        assert attn.q_proj.weight.shape == (32, 64) and attn.k_proj.weight.shape == (16, 64)
        torch.testing.assert_close(attn(x, position_embeddings=emb, attention_mask=None)[0], reference)


def test_block_influence_by_hand():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # cos 1 and 0
    assert block_influence(x, y).item() == pytest.approx(1.0)
    assert least_influential(torch.tensor([0.3, 0.1, 0.1, 0.9]), 2) == [1, 2]


def test_skipping_a_block_measures_what_removing_it_gives(calib):
    """Iterative selection measures influence with a block skipped by a hook: that must equal
    the influence of the remaining blocks after really removing it."""
    from tests.structured.conftest import make_llama
    from sparselm.structured.layers import _skip_block, measure_block_influence, remove_layers

    model = make_llama(layers=4)
    blocks = model.model.layers
    handle = blocks[1].register_forward_hook(_skip_block, with_kwargs=True)
    skipped = measure_block_influence(model, blocks, calib, progress=False)
    handle.remove()
    removed = make_llama(layers=4)
    remove_layers(removed, removed.model.layers, [1])
    after = measure_block_influence(removed, removed.model.layers, calib, progress=False)
    assert skipped[1].item() == pytest.approx(0.0, abs=1e-9)
    torch.testing.assert_close(skipped[[0, 2, 3]], after, rtol=1e-6, atol=1e-9)


def test_iterative_selection_follows_the_remeasured_influence(calib, monkeypatch):
    """With hand-made influences that change once a block is gone, iterative selection picks
    the second block from the re-measured values, one-shot selection from the first ones."""
    from tests.structured.conftest import make_llama
    from sparselm.structured import layers as L

    model = make_llama(layers=4)
    rounds = [torch.tensor([0.9, 0.3, 0.1, 0.2], dtype=torch.float64),  # block 2 goes first
              torch.tensor([0.9, 0.25, 0.0, 0.6], dtype=torch.float64)]  # then block 3 matters more than 1
    calls = []

    def fake_measure(model, blocks, calib_ids, batch_size=8, progress=True):
        calls.append(len(blocks))
        return rounds[min(len(calls), 2) - 1]

    monkeypatch.setattr(L, "measure_block_influence", fake_measure)
    assert L.select_layers_to_remove(model, model.model.layers, calib, 2, "once")[0] == [2, 3]
    calls.clear()
    dropped, first = L.select_layers_to_remove(model, model.model.layers, calib, 2, "iterative")
    assert dropped == [1, 2] and len(calls) == 2
    torch.testing.assert_close(first, rounds[0])
    assert not any(b._forward_hooks for b in model.model.layers)  # the skip hooks are gone
    with pytest.raises(SparselmError, match="layer selection"):
        L.select_layers_to_remove(model, model.model.layers, calib, 2, "greedy")
