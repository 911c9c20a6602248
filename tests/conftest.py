import copy

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_pair():
    """The built-in tiny model (trained on the default corpus on first use, then cached)."""
    from sparselm.zoo import load_builtin

    return load_builtin("tiny", progress=False)


@pytest.fixture
def tiny(tiny_pair):
    """A private copy of the tiny model (tests may prune it) and its tokenizer."""
    model, tok = tiny_pair
    return copy.deepcopy(model), tok


@pytest.fixture(scope="session")
def tiny_calib(tiny_pair):
    from sparselm.data import calibration

    return calibration(tiny_pair[1], n=32, seq_len=128, seed=0)


@pytest.fixture(scope="session")
def tiny_test_ids(tiny_pair):
    from sparselm.data import corpus_token_ids

    return corpus_token_ids(tiny_pair[1], None, "test")


def random_llama(seed=0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def with_threads(n, fn):
    """fn() with torch's CPU thread count set to n, restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


@pytest.fixture
def no_tf32():
    """fp32 comparisons on a GPU need true fp32 matmuls (cuBLAS may use TF32 where allowed)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before
