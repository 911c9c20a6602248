"""Held-out perplexity, measured weight sparsity and parameter counts.

Perplexity protocol (deterministic): the split's token stream is cut into non-overlapping
windows of `seq_len` tokens (the model's context by default); each window is scored on its
own (no state carried over), every token but the first of a window is predicted, and
perplexity = exp(total negative log-likelihood / number of predicted tokens). With
`max_windows`, only the first windows of the stream are used.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from sparselm.errors import SparselmError


@torch.no_grad()
def perplexity(model, token_ids: torch.Tensor, seq_len: int, max_windows: int | None = None,
               batch_size: int = 8, progress: bool = False) -> float:
    """Perplexity of `model` over non-overlapping `seq_len` windows of a 1-D token stream."""
    n_windows = token_ids.numel() // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise SparselmError(f"evaluation text too short: {token_ids.numel()} tokens, fewer than one window of {seq_len}")
    windows = token_ids[: n_windows * seq_len].view(n_windows, seq_len)  # [W, S]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for i in tqdm(range(0, n_windows, batch_size), desc="perplexity", disable=not progress, dynamic_ncols=True):
        batch = windows[i:i + batch_size].to(device)  # [B, S]
        logits = model(input_ids=batch).logits[:, :-1].float()  # [B, S-1, V]
        nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    model.train(was_training)
    return math.exp(nll / count)


def _weight(module) -> torch.Tensor:
    return module.weight


def layer_sparsity(model) -> dict[str, float]:
    """Fraction of exact zeros in the weight of every prunable linear layer, by qualified name."""
    from sparselm.adapters import get_adapter

    adapter = get_adapter(model)
    out = {}
    blocks = adapter.blocks(model)
    prefix = adapter.blocks_prefix(model)
    for i, block in enumerate(blocks):
        for name, mod in adapter.linear_layers(block).items():
            w = _weight(mod)
            out[f"{prefix}.{i}.{name}"] = (w == 0).float().mean().item()
    return out


def parameter_counts(model) -> dict[str, int]:
    """Total and non-zero parameter counts, overall and for the prunable linear layers."""
    from sparselm.adapters import get_adapter

    adapter = get_adapter(model)
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    lin_total = lin_nonzero = 0
    for block in adapter.blocks(model):
        for mod in adapter.linear_layers(block).values():
            lin_total += mod.weight.numel()
            lin_nonzero += int((mod.weight != 0).sum())
    return {"total": total, "nonzero": nonzero, "linear_total": lin_total, "linear_nonzero": lin_nonzero}


@dataclass
class EvalReport:
    perplexity: float
    seq_len: int
    windows: int
    data: str
    split: str
    sparsity: float  # over the prunable linear layers of the decoder blocks
    params: dict = field(default_factory=dict)
    layer_sparsity: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        p = self.params
        rows = [("perplexity", f"{self.perplexity:.3f}"),
                ("data", f"{self.data} / {self.split} ({self.windows} windows x {self.seq_len} tokens)"),
                ("linear sparsity", f"{self.sparsity:.2%}"),
                ("params total", f"{p['total']:,}"), ("params nonzero", f"{p['nonzero']:,}")]
        return "\n".join(["| metric | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows])


def model_context(model, default: int = 512) -> int:
    cfg = model.config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return min(v, 2048)
    return default


def evaluate(model, tokenizer, data=None, split: str = "test", seq_len: int | None = None,
             max_windows: int | None = 64, batch_size: int = 8, progress: bool = False) -> EvalReport:
    """Perplexity on `split` of `data` (default corpus when None), sparsity and parameter counts."""
    from sparselm.data.corpus import load_corpus
    from sparselm.data.tokens import corpus_token_ids

    corpus = load_corpus(data)
    seq_len = seq_len or model_context(model)
    ids = corpus_token_ids(tokenizer, corpus, split)
    windows = ids.numel() // seq_len if max_windows is None else min(max_windows, ids.numel() // seq_len)
    ppl = perplexity(model, ids, seq_len, max_windows=max_windows, batch_size=batch_size, progress=progress)
    params = parameter_counts(model)
    sparsity = 1 - params["linear_nonzero"] / max(1, params["linear_total"])
    return EvalReport(ppl, seq_len, windows, corpus.name, split, sparsity, params, layer_sparsity(model))
