"""The lean decode loop gives the transformers forward's logits (dense and packed, GQA, rope
scaling, biases), prefill, decode and chunked prefill alike, and refuses what it cannot run."""
import copy

import pytest
import torch

from sparselm.bench.lean_decode import LeanDecoder
from sparselm.errors import SparselmError
from sparselm.pack import pack
from sparselm.prune import Magnitude, sparsify
from tests.conftest import random_llama


def hf_logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits  # [B, T, V]


def check_against_hf(model, ids, chunks):
    """Feed `ids` to the lean loop in `chunks` (lengths) and compare every chunk's last logits."""
    ref = hf_logits(model, ids)
    dec = LeanDecoder(model, max_len=ids.shape[1] + 4, batch_size=ids.shape[0])
    pos = 0
    for n in chunks:
        got = dec.step(ids[:, pos:pos + n])
        pos += n
        torch.testing.assert_close(got, ref[:, pos - 1], rtol=1e-4, atol=1e-4)
    assert pos == ids.shape[1]


@pytest.mark.parametrize("overrides", [{}, {"num_key_value_heads": 4},
                                       {"rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                            "rope_theta": 10000.0}},
                                       {"attention_bias": True}])
def test_prefill_then_decode_equals_transformers(overrides):
    model = random_llama(seed=1, **overrides)
    if overrides.get("attention_bias"):
        for layer in model.model.layers:  # random biases: zero biases would not test them
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.data.normal_()
    ids = torch.randint(0, 256, (2, 21), generator=torch.Generator().manual_seed(0))
    check_against_hf(model, ids, [13] + [1] * 8)
    check_against_hf(model, ids, [5, 7, 1, 8])  # chunks after earlier tokens need the offset causal mask


def test_qwen2_family():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=200,
                                         max_position_embeddings=64)).eval()
    ids = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    check_against_hf(model, ids, [6] + [1] * 6)


def test_packed_model_through_the_lean_loop():
    model = random_llama(seed=2)
    sparsify(model, Magnitude(sparsity=0.7), progress=False)
    packed = copy.deepcopy(model)
    pack(packed, "bitmask", progress=False)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    check_against_hf(packed, ids, [10] + [1] * 6)
    torch.testing.assert_close(hf_logits(packed, ids), hf_logits(model, ids), rtol=1e-4, atol=1e-4)


def test_refuses_what_it_cannot_run():
    model = random_llama()
    dec = LeanDecoder(model, max_len=8, batch_size=1)
    with pytest.raises(SparselmError, match="exceed the cache"):
        dec.step(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(SparselmError, match="batch 1"):
        dec.step(torch.zeros(2, 1, dtype=torch.long))
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16))
    with pytest.raises(SparselmError, match="families"):
        LeanDecoder(gpt2, max_len=8)


def test_generation_benchmark_runs_through_the_lean_loop():
    from sparselm.bench.generation import compare_generation

    model = random_llama(seed=3)
    sparsify(model, Magnitude(sparsity=0.7), progress=False)
    summary = compare_generation(model, ["dense", "bitmask"], prompt_len=8, new_tokens=4, repeats=1,
                                 progress=False, runtime="lean")
    assert summary["runtime"] == "lean" and [r["variant"] for r in summary["results"]] == ["dense", "bitmask"]
    assert all(r["decode_tokens_per_s"] > 0 for r in summary["results"])
    with pytest.raises(SparselmError, match="runtime"):
        compare_generation(model, ["dense"], runtime="vllm")
