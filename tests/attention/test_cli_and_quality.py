"""CLI and quality measurements (end-to-end ones are marked slow), compiled FlexAttention."""
import json
import warnings

import pytest
import torch
from transformers import LlamaConfig

from sparselm.attention import Sinks, SlidingWindow, Strided, reference_attention, sparse_attention
from sparselm.attention.quality import train_with_pattern
from sparselm.cli import main


def test_cli_bad_pattern_is_one_line_error(capsys):
    assert main(["attention", "tiny", "--pattern", "window:0"]) == 2
    err = capsys.readouterr().err
    assert "window must be >= 1" in err and len(err.strip().splitlines()) == 1
    assert main(["attention", "tiny", "--pattern", "banana:3"]) == 2
    assert "unknown pattern 'banana'" in capsys.readouterr().err


def test_train_with_pattern_keeps_the_pattern_and_learns():
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64, max_position_embeddings=64)
    ids = torch.arange(2000) % 17  # a periodic stream: learnable inside an 8-token window
    model, losses = train_with_pattern(cfg, ids, "window:8+sinks:1", steps=30, batch_size=4, seq_len=32, lr=1e-2,
                                       progress=False)
    assert model.config._attn_implementation == "sparselm"
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


@pytest.mark.slow
def test_cli_eval_and_bench_on_tiny(capsys):
    code = main(["attention", "tiny", "--pattern", "window:32+sinks:4", "--eval", "--bench", "--max-windows", "4",
                 "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ppl = result["perplexity"]
    assert ppl["full"] > 1 and ppl["window:32+sinks:4"] >= ppl["full"] * 0.99
    long = result["long_text"]
    assert long["tokens"] == 4 * result["context"]
    assert long["sinks+window_cache_bytes"]["peak"] == long["sinks+window_cache_bytes"]["final"]
    assert long["sinks+window_cache_bytes"]["peak"] < long["full_cache_bytes_final"] / 4
    decode = result["decode"]
    assert decode["sinks+window"]["peak_cache_bytes"] < decode["full"]["peak_cache_bytes"] / 4


@pytest.mark.slow
@pytest.mark.parametrize("pattern", [Sinks(4) | SlidingWindow(64), Strided(32)], ids=str)
def test_compiled_flex_equals_reference(pattern):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 300, 16, generator=gen)
    k, v = torch.randn(1, 2, 300, 16, generator=gen), torch.randn(1, 2, 300, 16, generator=gen)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, ran = sparse_attention(q, k, v, pattern, backend="flex")
    assert ran == "flex"
    torch.testing.assert_close(out, reference_attention(q, k, v, pattern), rtol=1e-4, atol=1e-4)
