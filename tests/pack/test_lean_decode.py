"""The lean decode loop gives the transformers forward's logits (dense and packed, GQA, rope
scaling, biases), prefill, decode and chunked prefill alike, and refuses what it cannot run."""
import copy

import pytest
import torch

from sparselm.bench.lean_decode import LeanDecoder
from sparselm.errors import SparselmError
from sparselm.pack import SparseLinear, pack
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
    dense, packed = summary["results"]
    # 70% bitmask: 0.3 x 4 bytes of values + 1/8 byte of mask per weight, ~0.33x the dense linears
    # (the LM head stays dense: it was not pruned)
    assert packed["pack_choices"] == {"bitmask": 14} and not dense["pack_choices"]
    assert packed["linear_weight_bytes"] < 0.6 * dense["linear_weight_bytes"]
    assert packed["weight_bytes"] < dense["weight_bytes"]
    assert packed["flops_per_token"] < 0.6 * dense["flops_per_token"]  # counts the stored non-zeros
    with pytest.raises(SparselmError, match="runtime"):
        compare_generation(model, ["dense"], runtime="vllm")


needs_extension = pytest.mark.skipif(
    __import__("sparselm.kernels", fromlist=["load_extension"]).load_extension() is None,
    reason="the C++ decode step needs the kernel extension")


def decode_logits(model, ids, steps, fast, threads=None):
    """Prefill ids, then `steps` greedy single-token steps (on `threads` torch threads if
    given): the logits of every step."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        dec = LeanDecoder(model, max_len=ids.shape[1] + steps + 1, batch_size=ids.shape[0], fast=fast)
        out = [dec.step(ids)]
        for _ in range(steps):
            out.append(dec.step(out[-1].argmax(-1, keepdim=True)))
    finally:
        torch.set_num_threads(before)
    return dec, torch.stack(out)


@needs_extension
@pytest.mark.parametrize("batch", [1, 2])  # batch 1: dense projections through the stack's own GEMV
@pytest.mark.parametrize("fmt", ["dense", "bitmask", "csr", "nm", "mixed"])
def test_cpp_decode_step_equals_the_python_loop(fmt, batch):
    model = random_llama(seed=4, num_key_value_heads=2, attention_bias=True)
    for layer in model.model.layers:
        layer.self_attn.k_proj.bias.data.normal_()
    sparsify(model, Magnitude(sparsity=0.5, pattern="2:4" if fmt in ("nm", "mixed") else "unstructured"),
             progress=False)
    if fmt == "mixed":  # csr everywhere but one N:M layer, and one projection left dense
        up = model.model.layers[0].mlp.up_proj.weight.detach().clone()
        pack(model, "csr", progress=False)
        model.model.layers[0].mlp.up_proj = SparseLinear.from_dense(up, "nm", n=2, m=4)
        model.model.layers[1].self_attn.o_proj = torch.nn.Linear(64, 64, bias=False)
    elif fmt != "dense":
        pack(model, fmt, progress=False)
    ids = torch.randint(0, 256, (batch, 9), generator=torch.Generator().manual_seed(0))
    fast_dec, fast = decode_logits(model, ids, 6, fast=True)
    slow_dec, slow = decode_logits(model, ids, 6, fast=False)
    assert fast_dec.fast_path_reason is None and slow_dec.fast_path_reason is not None
    assert fast_dec._stack_full  # embedding, blocks, norm and head: one C++ call per token
    # batch 1 with dense, bitmask or CSR projections only: the whole step in one parallel region
    assert fast_dec._stack.single_region == (batch == 1 and fmt in ("dense", "bitmask", "csr"))
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    # and the stack's keys and values are the ones the Python loop caches
    torch.testing.assert_close(fast_dec.k_cache, slow_dec.k_cache, rtol=1e-5, atol=1e-5)


@needs_extension
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_single_region_step_for_any_thread_count(threads):
    """The one-region step splits heads, rows and neurons between the threads: any split
    (3 threads: uneven shares of 4 heads, 64 rows, a packed 256-row head) gives the Python
    loop's logits and caches, with the LM head pruned and packed too."""
    model = random_llama(seed=8, num_key_value_heads=2)
    sparsify(model, Magnitude(sparsity=0.6, lm_head=True), progress=False)
    dense_layer = copy.deepcopy(model.model.layers[1])
    pack(model, "bitmask", progress=False)  # the sparse head is packed too
    model.model.layers[1] = dense_layer  # one layer stays dense: both kinds in one step
    assert isinstance(model.lm_head, SparseLinear)
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(3))
    fast_dec, fast = decode_logits(model, ids, 5, fast=True, threads=threads)
    slow_dec, slow = decode_logits(model, ids, 5, fast=False)
    assert fast_dec._stack.single_region
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast_dec.v_cache, slow_dec.v_cache, rtol=1e-5, atol=1e-5)
    with pytest.raises(SparselmError, match="token id 256 outside the vocabulary"):
        fast_dec.step(torch.tensor([[256]]))


@needs_extension
def test_cpp_decode_step_takes_per_layer_widths():
    """A model whose MLP widths differ per layer (structured pruning) runs through the C++ step."""
    from sparselm.structured import shrink

    model = random_llama(seed=5)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    shrink(model, ids, neurons=[0.25, 0.5], progress=False)
    assert model.model.layers[0].mlp.down_proj.in_features != model.model.layers[1].mlp.down_proj.in_features
    fast_dec, fast = decode_logits(model, ids[:1, :5], 4, fast=True)
    _, slow = decode_logits(model, ids[:1, :5], 4, fast=False)
    assert fast_dec.fast_path_reason is None
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)


@needs_extension
def test_cpp_decode_step_says_why_it_is_not_used():
    model = random_llama(seed=6).to(torch.float16)
    assert "fp32 or bf16" in LeanDecoder(model, max_len=8).fast_path_reason
    model = random_llama(seed=6).to(torch.bfloat16)
    assert "only whole" in LeanDecoder(model, max_len=8, batch_size=2).fast_path_reason  # batch 2
    sparsify(model, Magnitude(sparsity=0.5, pattern="2:4"), progress=False)
    model.model.layers[0].mlp.up_proj = SparseLinear.from_dense(model.model.layers[0].mlp.up_proj.weight, "nm",
                                                                n=2, m=4)
    assert "only whole" in LeanDecoder(model, max_len=8).fast_path_reason  # an N:M projection
    model = random_llama(seed=6)
    model.model.layers[1].mlp.down_proj = torch.nn.Sequential(model.model.layers[1].mlp.down_proj)
    reason = LeanDecoder(model, max_len=8).fast_path_reason
    assert "layer 1" in reason and "Sequential" in reason
    model = random_llama(seed=6, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    assert "dynamic" in LeanDecoder(model, max_len=8).fast_path_reason


@needs_extension
def test_cpp_blocks_with_a_head_the_step_does_not_take():
    """An LM head the C++ step cannot run (here wrapped in a Sequential) stays in Python while
    the blocks still run in C++; the logits are those of the Python loop."""
    model = random_llama(seed=7)
    model.lm_head = torch.nn.Sequential(model.lm_head)
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(2))
    fast_dec, fast = decode_logits(model, ids, 4, fast=True)
    _, slow = decode_logits(model, ids, 4, fast=False)
    assert fast_dec.fast_path_reason is None and not fast_dec._stack_full
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)


@needs_extension
@pytest.mark.parametrize("fmt", ["dense", "bitmask", "csr"])
def test_greedy_generate_equals_stepping(fmt):
    """`generate` (the greedy loop in C++ when the step is) gives the tokens of stepping and
    taking argmaxes in Python, and leaves the decoder at the right position."""
    model = random_llama(seed=9)
    if fmt != "dense":
        sparsify(model, Magnitude(sparsity=0.6), progress=False)
        pack(model, fmt, progress=False)
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(4))
    _, ref_logits = decode_logits(model, ids, 8, fast=False)
    for fast in (True, False):  # the C++ loop, and the Python fallback
        dec = LeanDecoder(model, max_len=20, fast=fast)
        first = dec.step(ids).argmax(-1, keepdim=True)
        got = dec.generate(first, 8)
        assert dec.pos == 14 and got.shape == (1, 8)
        assert torch.equal(got[0], ref_logits[1:, 0].argmax(-1))
        with pytest.raises(SparselmError, match="exceed the cache"):
            dec.generate(got[:, -1:], 7)
        with pytest.raises(SparselmError, match="steps must be"):
            dec.generate(got[:, -1:], -1)
        assert dec.generate(got[:, -1:], 0).shape == (1, 0) and dec.pos == 14


@needs_extension
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_bf16_model_through_the_cpp_step(threads):
    """bf16 weights, embedding and cache: the one-region step reads the weights widened to fp32
    and keeps fp32 activations, where the transformers forward rounds to bf16 after every op, so
    the two agree to bf16 precision (and on the greedy tokens here); the Python loop's cache
    holds the same keys to bf16 rounding."""
    model = random_llama(seed=10, num_key_value_heads=2, attention_bias=True).to(torch.bfloat16)
    for layer in model.model.layers:
        layer.self_attn.q_proj.bias.data.normal_()
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(5))
    fast_dec, fast = decode_logits(model, ids, 6, fast=True, threads=threads)
    slow_dec, slow = decode_logits(model, ids, 6, fast=False)
    assert fast_dec.fast_path_reason is None and fast_dec._stack.single_region
    assert fast.dtype == slow.dtype == fast_dec.k_cache.dtype == torch.bfloat16
    fast, slow = fast.float(), slow.float()
    assert (fast - slow).abs().max() < 0.03 * slow.abs().max()
    assert torch.equal(fast.argmax(-1), slow.argmax(-1))
    torch.testing.assert_close(fast_dec.k_cache.float(), slow_dec.k_cache.float(), rtol=0.05, atol=0.05)
    # against the transformers forward over the whole sequence the step fed itself
    seq = torch.cat([ids, fast[:-1].argmax(-1).view(1, -1)], dim=1)
    ref = hf_logits(model, seq)[0, ids.shape[1] - 1:].float()
    assert (fast[:, 0] - ref).abs().max() < 0.03 * ref.abs().max()


@needs_extension
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("fmt", ["bitmask", "csr"])
def test_bf16_packed_equals_bf16_dense_in_the_cpp_step(fmt, threads):
    """The same pruned bf16 weights, dense and packed (LM head included), give the same logits
    up to the order of fp32 additions (the 32-column bf16 bitmask kernel sums even and odd
    columns apart, CSR gathers) and the same greedy tokens."""
    model = random_llama(seed=11, num_key_value_heads=2)
    sparsify(model, Magnitude(sparsity=0.7, lm_head=True), progress=False)
    model = model.to(torch.bfloat16)
    packed = copy.deepcopy(model)
    pack(packed, fmt, progress=False)
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(6))
    dense_dec, dense = decode_logits(model, ids, 6, fast=True, threads=threads)
    packed_dec, got = decode_logits(packed, ids, 6, fast=True, threads=threads)
    assert dense_dec._stack.single_region and packed_dec._stack.single_region
    torch.testing.assert_close(got.float(), dense.float(), rtol=1e-2, atol=1e-2)
    assert torch.equal(got.argmax(-1), dense.argmax(-1))
    dec = LeanDecoder(packed, max_len=20)
    tokens = dec.generate(dec.step(ids).argmax(-1, keepdim=True), 6)
    assert torch.equal(tokens[0], got[1:, 0].argmax(-1))


@needs_extension
def test_bf16_cpp_step_with_odd_widths():
    """Widths that are not multiples of 32 (hidden 80, MLP 100, vocabulary 250) and odd row
    counts per thread: the bf16 GEMV's tail blocks, against the Python loop."""
    model = random_llama(seed=12, hidden_size=80, intermediate_size=100, vocab_size=250,
                         num_key_value_heads=2).to(torch.bfloat16)
    ids = torch.randint(0, 250, (1, 5), generator=torch.Generator().manual_seed(7))
    fast_dec, fast = decode_logits(model, ids, 5, fast=True, threads=3)
    _, slow = decode_logits(model, ids, 5, fast=False)
    assert fast_dec._stack.single_region
    fast, slow = fast.float(), slow.float()
    assert (fast - slow).abs().max() < 0.03 * slow.abs().max()
    assert torch.equal(fast.argmax(-1), slow.argmax(-1))


def check_static_against_hf(model, ids, chunks):
    """`check_against_hf` through the static step (what CUDA graphs capture on a GPU), run eagerly."""
    ref = hf_logits(model, ids)
    dec = LeanDecoder(model, max_len=ids.shape[1] + 4, batch_size=ids.shape[0], static_step=True)
    assert dec.static_step and not dec.cuda_graphs  # no graphs on CPU: the same step, eagerly
    pos = 0
    for n in chunks:
        got = dec.step(ids[:, pos:pos + n])
        pos += n
        torch.testing.assert_close(got, ref[:, pos - 1], rtol=1e-4, atol=1e-4)
    assert dec.pos == pos == ids.shape[1]


@pytest.mark.parametrize("overrides", [{}, {"num_key_value_heads": 4},
                                       {"rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                            "rope_theta": 10000.0}}])
def test_static_step_equals_transformers(overrides):
    """Position as a device tensor, cache written by index_copy_, attention over the whole cache
    with later positions masked: the transformers forward's logits, GQA and rope scaling included,
    prefill, single tokens and (uncaptured) chunks after earlier tokens alike."""
    model = random_llama(seed=1, **overrides)
    ids = torch.randint(0, 256, (2, 21), generator=torch.Generator().manual_seed(0))
    check_static_against_hf(model, ids, [13] + [1] * 8)
    check_static_against_hf(model, ids, [5, 7, 1, 8])


@pytest.mark.parametrize("packed", [False, True])
def test_static_generate_equals_stepping(packed):
    """Greedy generation through the static step (argmax and next position kept on the device)
    gives the tokens of stepping and taking argmaxes, after a reset too."""
    model = random_llama(seed=3)
    if packed:
        sparsify(model, Magnitude(sparsity=0.5), progress=False)
        pack(model, "bitmask", progress=False)
    prompt = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    ref = LeanDecoder(model, max_len=24, batch_size=2, fast=False)
    token = ref.step(prompt).argmax(-1, keepdim=True)
    expected = []
    for _ in range(10):
        expected.append(token)
        token = ref.step(token).argmax(-1, keepdim=True)
    expected = torch.cat(expected, dim=1)  # [B, 10]: the prompt's argmax, then 9 generated
    dec = LeanDecoder(model, max_len=24, batch_size=2, static_step=True)
    for _ in range(2):  # the second round after reset() must not see the first round's cache
        dec.reset()
        first = dec.step(prompt).argmax(-1, keepdim=True)
        torch.testing.assert_close(first, expected[:, :1])
        out = dec.generate(first, 9)
        assert dec.pos == 18
        torch.testing.assert_close(out, expected[:, 1:])


def test_static_step_refuses_dynamic_rope():
    """A rotary table that rescales with the sequence length cannot be precomputed for the static
    step: asked for explicitly it is an error naming why (on a GPU, where static steps are the
    default, the loop falls back to its eager steps and says so in `fast_path_reason`)."""
    model = random_llama(seed=6, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(SparselmError, match="rescales with the sequence length"):
        LeanDecoder(model, max_len=8, static_step=True)
    assert not LeanDecoder(model, max_len=8).static_step
