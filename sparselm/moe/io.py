"""Save and load MoE models: Hugging Face layout, safetensors, atomic writes.

A saved folder is a normal transformers checkpoint of `SparseMoeForCausalLM`
(model_type "sparselm_moe"): after `import sparselm.moe` (which registers the classes with
the Auto classes) `AutoModelForCausalLM.from_pretrained(folder)` loads it, and
`sparselm.io.load(folder)` dispatches here.
"""
from __future__ import annotations

from pathlib import Path

import torch

from sparselm.errors import SparselmError


def save_moe(model, tokenizer, out_dir: str | Path, metadata: dict | None = None, overwrite: bool = False,
             protect: tuple = ()) -> Path:
    """Write `model` (a SparseMoeForCausalLM) and `tokenizer` to `out_dir` atomically.

    The MoE description lives in config.json; `metadata` goes to sparselm.json.
    """
    from sparselm.io import save
    from sparselm.moe.modeling import SparseMoeForCausalLM

    if not isinstance(model, SparseMoeForCausalLM):
        raise SparselmError(f"save_moe needs a SparseMoeForCausalLM, got {type(model).__name__}; convert the model "
                            "with sparselm.moe.convert (upcycle / partition) or build one from SparseMoeConfig")
    meta = {"moe": {k: v for k, v in model.config.moe_config().to_dict().items()}, **(metadata or {})}
    return save(model, tokenizer, out_dir, metadata=meta, overwrite=overwrite, protect=protect)


def load_moe(path: str | Path, dtype: torch.dtype | str | None = None):
    """(model, tokenizer) from a folder written by `save_moe`; tokenizer is None if absent."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import sparselm.moe.modeling  # noqa: F401 - registers the config/model classes
    from sparselm.io import _check_safetensors

    path = Path(path).expanduser()
    if not (path / "config.json").exists():
        raise SparselmError(f"{path} is not a saved MoE model (no config.json); give a folder written by save_moe")
    _check_safetensors(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    model.eval()
    tokenizer = None
    if (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
