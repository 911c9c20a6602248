"""Hugging Face integration: same logits with a long window, pattern semantics, training, errors."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from sparselm.attention import Sinks, SlidingWindow, apply
from sparselm.errors import SparselmError


def _llama(layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def test_window_covering_the_sequence_gives_the_same_logits():
    model = _llama()
    ids = torch.randint(0, 512, (2, 45), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(ids).logits
        patch = apply(model, SlidingWindow(45) | Sinks(4))
        sparse = model(ids).logits
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    assert patch.backends_used["blocked"] == 2  # one call per layer, backend reported
    patch.remove()
    assert model.config._attn_implementation == "sdpa"


def test_narrow_window_changes_logits_only_after_the_window():
    model = _llama()
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(ids).logits
        apply(model, "window:10")
        sparse = model(ids).logits
    torch.testing.assert_close(sparse[:, :10], dense[:, :10], rtol=1e-5, atol=1e-5)
    assert (sparse[:, 10:] - dense[:, 10:]).abs().max() > 1e-3


def test_patched_model_equals_reference_backend_with_gradients():
    ids = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(2))
    results = []
    for backend in ("reference", "blocked"):
        model = _llama().train()
        apply(model, Sinks(2) | SlidingWindow(5), backend=backend)
        loss = model(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)


def test_training_with_a_pattern_reduces_the_loss():
    model = _llama(layers=1).train()
    apply(model, "window:8+sinks:2")
    ids = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(3))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_generate_with_dynamic_cache_matches_recomputation():
    model = _llama()
    apply(model, "window:6+sinks:1")
    prompt = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=12, do_sample=False)
        # greedy tokens must be the argmax of a fresh full forward at every step
        logits = model(out).logits
    assert torch.equal(logits[0, 8:-1].argmax(-1), out[0, 9:])


def test_gpt2_goes_through_the_interface_too():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=64)).eval()
    ids = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        dense = gpt2(ids).logits
        patch = apply(gpt2, "window:20")
        sparse = gpt2(ids).logits
    assert len(patch.modules) == 2 and patch.backends_used["blocked"] == 2
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)


class _OpaqueLlama(LlamaForCausalLM):
    _supports_attention_backend = False  # as a model with hand-written attention declares


def test_models_without_the_attention_interface_are_refused():
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      vocab_size=64)
    with pytest.raises(SparselmError, match="AttentionInterface"):
        apply(_OpaqueLlama(cfg), "window:4")
    with pytest.raises(SparselmError, match="not a Hugging Face"):
        apply(torch.nn.Linear(2, 2), "window:4")
    with pytest.raises(SparselmError, match="unknown attention backend"):
        apply(_llama(layers=1), "window:4", backend="cuda-magic")


def test_left_padding_mask_matches_the_unpatched_model():
    model = _llama()
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(6))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :5] = 0
    with torch.no_grad():
        dense = model(ids, attention_mask=mask).logits
        apply(model, "window:16")
        sparse = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(sparse[0], dense[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse[1, 5:], dense[1, 5:], rtol=1e-5, atol=1e-5)
