"""The sinks + window cache: equal to the full cache inside the window, StreamingLLM beyond it, flat memory."""
import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from sparselm.attention import SinkWindowCache, greedy_generate, stream_perplexity
from sparselm.errors import SparselmError


def _llama(layers, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


IDS = torch.randint(0, 512, (1, 44), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_same_next_token_logits_as_full_cache_within_the_window():
    sinks, window = 2, 16
    model = _llama(layers=2)
    cache = SinkWindowCache.for_model(model, sinks, window)
    full = DynamicCache(config=model.config)
    torch.testing.assert_close(model(IDS[:, :5], cache=cache).logits, model(IDS[:, :5], cache=full).logits,
                               rtol=1e-5, atol=1e-5)
    for t in range(5, sinks + window):  # the sequence stays within sinks + window tokens
        a = model(IDS[:, t:t + 1], cache=cache).logits
        b = model(IDS[:, t:t + 1], cache=full).logits
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # one token later the oldest non-sink token is evicted and the results part
    a = model(IDS[:, 18:19], cache=cache).logits
    b = model(IDS[:, 18:19], cache=full).logits
    assert (a - b).abs().max() > 1e-4


@torch.no_grad()
def test_beyond_the_window_it_is_streamingllm_with_slot_positions():
    # With one layer, the cached keys/values of the kept tokens are exactly those of a fresh
    # forward over the kept tokens alone with positions 0..n-1, which is StreamingLLM's definition.
    sinks, window = 2, 8
    model = _llama(layers=1)
    cache = SinkWindowCache.for_model(model, sinks, window)
    model(IDS[:, :3], cache=cache)
    for t in range(3, 40):
        streamed = model(IDS[:, t:t + 1], cache=cache).logits[:, -1]
        n = t + 1
        kept = list(range(n)) if n <= sinks + window else list(range(sinks)) + list(range(n - window, n))
        fresh = model(IDS[:, kept]).logits[:, -1]
        torch.testing.assert_close(streamed, fresh, rtol=1e-5, atol=2e-5)
        assert cache.get_seq_length() == min(n, sinks + window - 1)


@torch.no_grad()
def test_positions_given_by_the_caller_only_shift_slots():
    # generate() passes absolute positions; RoPE depends on differences, so logits must not change
    model = _llama(layers=2)
    outs = []
    for offset in (0, 1000):
        cache = SinkWindowCache.for_model(model, 1, 6)
        step = []
        for t in range(20):
            pos = torch.tensor([[t + offset]])
            step.append(model(IDS[:, t:t + 1], cache=cache, position_ids=pos).logits)
        outs.append(torch.cat(step, 1))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_cache_memory_is_flat_and_decode_runs():
    model = _llama(layers=2)
    prompt = IDS[0, :4]
    cache = SinkWindowCache.for_model(model, 2, 10)
    tokens, report = greedy_generate(model, prompt, 40, cache)
    cache.patch.remove()
    assert tokens.shape == (40,)
    per_token = 2 * 2 * 2 * 16 * 4  # layers * (k, v) * kv heads * head dim * fp32 bytes
    assert report.peak_cache_bytes == (2 + 10 - 1) * per_token
    assert report.cache_bytes[-1] == report.cache_bytes[20]  # flat once the window is full
    full_tokens, full = greedy_generate(model, prompt, 40, DynamicCache(config=model.config))
    assert full.cache_bytes[-1] == (4 + 39) * per_token  # the full cache grows with every token
    # inside the window (prompt 4 + 7 generated <= 12 tokens) greedy tokens agree
    assert torch.equal(tokens[:7], full_tokens[:7])


@torch.no_grad()
def test_stream_perplexity_with_full_cache_equals_one_forward():
    model = _llama(layers=2)
    ids = IDS[0, :30]
    one_pass = torch.nn.functional.cross_entropy(model(ids[None]).logits[0, :-1], ids[1:]).exp().item()
    streamed = stream_perplexity(model, ids, DynamicCache(config=model.config), chunk=7)
    assert streamed.perplexity == pytest.approx(one_pass, rel=1e-5)


def test_models_without_rotary_are_refused():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(SparselmError, match="rotary"):
        SinkWindowCache.for_model(gpt2, 4, 16)
    with pytest.raises(SparselmError, match="window"):
        SinkWindowCache.for_model(_llama(layers=1), 4, 0)
