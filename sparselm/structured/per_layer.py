"""Per-layer MLP widths: recorded in the config, and a loader that rebuilds such models.

With a uniform neuron ratio every layer has the same width and the config's own field
(`intermediate_size`, `ffn_dim`, ...) says it, so plain `transformers` loads the model. With
per-layer ratios the widths differ: the config then keeps the largest width in its own field
and lists every layer's width under `sparselm_intermediate_sizes`; `load_structured` builds
the model from the config, resizes each MLP, and loads the safetensors weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from sparselm.errors import SparselmError

SIZES_KEY = "sparselm_intermediate_sizes"


def record_intermediate_sizes(config, sizes: list[int], width_field: str) -> None:
    """Write the widths into `config`: uniform -> the standard field only; else also SIZES_KEY."""
    setattr(config, width_field, max(sizes))
    if len(set(sizes)) == 1:
        if hasattr(config, SIZES_KEY):
            delattr(config, SIZES_KEY)
    else:
        setattr(config, SIZES_KEY, list(sizes))


def _resize_mlp(mlp_projections: dict[str, nn.Module], mlp: nn.Module, width: int) -> None:
    from sparselm.structured.module_slicing import replace_child, slice_linear

    keep = torch.arange(width)
    for key, layer in mlp_projections.items():
        replace_child(mlp, layer, slice_linear(layer, keep, "in" if key == "down" else "out"))
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = width


def load_structured(path: str | Path, dtype: torch.dtype | None = None):
    """(model, tokenizer) for a folder whose config lists per-layer MLP widths."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from sparselm.adapters import get_adapter

    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    sizes = raw.get(SIZES_KEY)
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    if sizes:
        adapter = get_adapter(model)
        blocks = adapter.blocks(model)
        if len(sizes) != len(blocks):
            raise SparselmError(f"{path}: config lists {len(sizes)} MLP widths for {len(blocks)} layers; "
                                "the folder is inconsistent, re-save the model")
        for block, width in zip(blocks, sizes):
            _resize_mlp(adapter.mlp_projections(block), adapter.mlp(block), int(width))
    from sparselm.io import load_safetensors_into, load_tokenizer_if_present

    load_safetensors_into(model, path, "per-layer MLP widths in the config")
    return model, load_tokenizer_if_present(path)
