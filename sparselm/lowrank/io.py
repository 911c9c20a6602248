"""Saving and loading low-rank models.

The folder is a normal HF layout (config.json, safetensors, tokenizer) whose config has a
`sparselm_lowrank` entry: {"ranks": {module name: rank}}. `load_lowrank` builds the HF model
from the config, swaps in `LowRankLinear` of those ranks, then loads the safetensors weights
strictly (only tied weights may be absent). Plain transformers cannot load such a folder,
since the factorized layers have different parameter names; `sparselm.load` routes to here.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from sparselm.errors import SparselmError
from sparselm.lowrank.linear import LowRankLinear
from sparselm.structured.module_slicing import replace_module

CONFIG_KEY = "sparselm_lowrank"


def lowrank_ranks(model: nn.Module) -> dict[str, int]:
    """{module name: rank} for every LowRankLinear in `model`."""
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def save_lowrank(model: nn.Module, tokenizer, out_dir, metadata: dict | None = None, overwrite: bool = False,
                 protect: tuple = ()) -> Path:
    """Save atomically (temporary folder beside `out_dir`, renamed when complete)."""
    from sparselm.io import save

    ranks = lowrank_ranks(model)
    if not ranks:
        raise SparselmError("the model has no LowRankLinear layers; save it with sparselm.save instead")
    model.config.sparselm_lowrank = {"ranks": ranks}
    try:
        return save(model, tokenizer, out_dir, metadata=metadata, overwrite=overwrite, protect=protect)
    finally:
        del model.config.sparselm_lowrank  # the in-memory config stays as it was


def load_lowrank(path, dtype: torch.dtype | None = None):
    """(model, tokenizer) from a folder written by `save_lowrank`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    entry = raw.get(CONFIG_KEY)
    if not isinstance(entry, dict) or not isinstance(entry.get("ranks"), dict):
        raise SparselmError(f"{path}/config.json has no valid '{CONFIG_KEY}' entry; it was not saved by save_lowrank")
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    for name, rank in entry["ranks"].items():
        try:
            layer = model.get_submodule(name)
        except AttributeError as err:
            raise SparselmError(f"{path}: low-rank layer {name!r} does not exist in the model; re-save it") from err
        replace_module(model, name, LowRankLinear(layer.in_features, layer.out_features, int(rank),
                                                  bias=layer.bias is not None, dtype=layer.weight.dtype))
    from sparselm.io import load_safetensors_into, load_tokenizer_if_present

    load_safetensors_into(model, path, "low-rank layout")
    return model, load_tokenizer_if_present(path)
