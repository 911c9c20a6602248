import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def make_llama(layers=3, heads=4, kv=2, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=512, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def llama():
    return make_llama()


@pytest.fixture
def calib():
    return torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(1))
