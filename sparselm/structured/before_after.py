"""What a shrink or a factorization bought: parameters, perplexity and decode speed of the input
model and the result, measured in the same process one after the other."""
from __future__ import annotations

import torch.nn as nn


def measure_model(model: nn.Module, eval_ids, seq_len: int, max_windows: int, new_tokens: int = 64,
                  prompt_len: int = 32, repeats: int = 3) -> dict:
    """{params, perplexity, decode_tokens_per_s, prefill_tokens_per_s} of one model."""
    from sparselm.bench.generation import measure_generation
    from sparselm.evaluate import perplexity

    gen = measure_generation(model, prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "perplexity": perplexity(model, eval_ids, seq_len, max_windows=max_windows),
        "decode_tokens_per_s": gen.decode_tokens_per_s,
        "prefill_tokens_per_s": gen.prefill_tokens_per_s,
    }


def compare_before_after(before: nn.Module, after: nn.Module, eval_ids, seq_len: int, max_windows: int = 16,
                         new_tokens: int = 64) -> dict:
    """Both models measured, plus ratios (after / before)."""
    context = getattr(before.config, "max_position_embeddings", None) or 2048
    prompt_len = max(1, min(32, context - new_tokens))
    rows = {"input": measure_model(before, eval_ids, seq_len, max_windows, new_tokens, prompt_len),
            "output": measure_model(after, eval_ids, seq_len, max_windows, new_tokens, prompt_len)}
    # The first model timed also pays for warming up the process: time both again, alternating,
    # and keep each one's best, so neither is favoured by going second.
    from sparselm.bench.generation import measure_generation

    for name, model in (("input", before), ("output", after)):
        again = measure_generation(model, prompt_len=prompt_len, new_tokens=new_tokens, repeats=3)
        rows[name]["decode_tokens_per_s"] = max(rows[name]["decode_tokens_per_s"], again.decode_tokens_per_s)
        rows[name]["prefill_tokens_per_s"] = max(rows[name]["prefill_tokens_per_s"], again.prefill_tokens_per_s)
    rows["ratio"] = {k: rows["output"][k] / rows["input"][k] for k in rows["input"]}
    return rows


def before_after_table(rows: dict) -> str:
    lines = ["| model | params | perplexity | decode tok/s | prefill tok/s |", "| --- | ---: | ---: | ---: | ---: |"]
    for name in ("input", "output"):
        r = rows[name]
        lines.append(f"| {name} | {r['params']:,} | {r['perplexity']:.2f} | {r['decode_tokens_per_s']:.1f} | "
                     f"{r['prefill_tokens_per_s']:.0f} |")
    q = rows["ratio"]
    lines.append(f"| output / input | {q['params']:.3f}x | {q['perplexity']:.3f}x | {q['decode_tokens_per_s']:.2f}x | "
                 f"{q['prefill_tokens_per_s']:.2f}x |")
    return "\n".join(lines)
