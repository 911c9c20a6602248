"""Every supported family is found, on a small randomly initialised model built from its config."""
import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from sparselm.adapters import get_adapter, linear_weight, set_linear_weight
from sparselm.errors import SparselmError

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)


def build(family):
    torch.manual_seed(0)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**COMMON))
    if family == "mistral":
        return MistralForCausalLM(MistralConfig(**COMMON))
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**COMMON))
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_embd=64, n_inner=128, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                                          bos_token_id=0, eos_token_id=0))
    if family == "opt":
        return OPTForCausalLM(OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                        vocab_size=128, max_position_embeddings=64, word_embed_proj_dim=64))
    raise ValueError(family)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2", "opt"])
def test_family_adapter(family):
    model = build(family)
    a = get_adapter(model)
    assert a.family == family
    blocks = a.blocks(model)
    assert len(blocks) == 2
    attn, mlp = a.attention_projections(blocks[0]), a.mlp_projections(blocks[0])
    assert "o" in attn and "up" in mlp and "down" in mlp
    hidden = 64
    assert linear_weight(mlp["up"]).shape == (128, hidden)  # [out, in] for Linear and Conv1D alike
    assert linear_weight(mlp["down"]).shape == (hidden, 128)
    n_linear = len(a.linear_layers(blocks[0]))
    assert n_linear == {"llama": 7, "mistral": 7, "qwen2": 7, "gpt2": 4, "opt": 6}[family]
    assert a.embedding(model) is model.get_input_embeddings()
    expected_norm = {"gpt2": lambda m: m.transformer.ln_f, "opt": lambda m: m.model.decoder.final_layer_norm}
    assert a.final_norm(model) is expected_norm.get(family, lambda m: m.model.norm)(model)
    assert a.num_heads(model) == 4
    assert a.head_dim(model) == 16


def test_conv1d_weight_round_trip():
    model = build("gpt2")
    mod = get_adapter(model).mlp_projections(get_adapter(model).blocks(model)[0])["up"]
    x = torch.randn(3, 64)
    w = linear_weight(mod).clone()
    torch.testing.assert_close(mod(x), x @ w.t() + mod.bias)
    w[:, :10] = 0
    set_linear_weight(mod, w)
    assert (mod.weight[:10, :] == 0).all()  # Conv1D stores [in, out]


def test_generic_fallback_and_clear_error():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

    class Weird(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = torch.nn.ModuleList([Block() for _ in range(3)])

    a = get_adapter(Weird())
    assert a.family == "generic" and len(a.blocks(Weird())) == 3
    with pytest.raises(SparselmError, match="supported families"):
        get_adapter(torch.nn.Sequential(torch.nn.ReLU()))
