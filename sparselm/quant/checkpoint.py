"""Packing a quantized model, measuring its bytes per parameter, and saving / loading it.

Folder layout written by `save_quantized` (read back by `load_quantized`):

    config.json, tokenizer files     as written by transformers
    model.safetensors                every tensor; a packed layer `L` stores `L.codes`,
                                     `L.scales` (+ `L.mask`, `L.zeros`, `L.bias`) instead of `L.weight`
    sparselm_quant.json              the header: format version, per packed layer its shape, bits,
                                     group size, symmetry, nnz and dtype; tied tensors; the size report

Guarantees: the folder appears only when complete; `load_quantized` gives a model whose
outputs are bit-identical to the saved one; a missing, extra or mis-shaped tensor is refused
with its name.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from sparselm.adapters import get_adapter, linear_weight
from sparselm.adapters.base import LINEAR_TYPES
from sparselm.errors import SparselmError
from sparselm.quant.packed import QuantSparseLinear
from sparselm.quant.quantize import QUANT_ATTR

HEADER_FILE = "sparselm_quant.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
BF16_BYTES = 2


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def pack_quantized(model: nn.Module) -> dict[str, QuantSparseLinear]:
    """Replace (in place) every layer quantized by `quantize` with a `QuantSparseLinear`.

    Outputs do not change: the packed layer dequantizes to exactly the weight it replaces."""
    packed = {}
    for name, mod in list(model.named_modules()):
        qw = getattr(mod, QUANT_ATTR, None)
        if qw is None or isinstance(mod, QuantSparseLinear):
            continue
        weight = linear_weight(mod)
        if not torch.equal(qw.dequantize().to(weight.dtype).to(weight.device), weight):
            raise SparselmError(f"layer {name}: its weight changed after quantization; quantize it again")
        layer = QuantSparseLinear.from_quantized(qw, getattr(mod, "bias", None), dtype=weight.dtype)
        _set_module(model, name, layer.to(weight.device))
        packed[name] = layer
    if not packed:
        raise SparselmError("the model has no quantized layers; run sparselm.quant.quantize(model, config, ...) first")
    return packed


def bytes_per_parameter(model: nn.Module) -> dict:
    """Storage of the linear layers of the decoder blocks, packed where quantized.

    Returns bytes, parameters, bytes_per_parameter and `vs_bf16` (the ratio to 2 bytes per
    parameter, i.e. a dense bf16 copy of the same layers). Unquantized layers count at their
    dtype's size; quantized but not yet packed ones at the size they would take packed."""
    total_bytes, params = 0, 0
    for mod in _block_linears(model):
        if isinstance(mod, QuantSparseLinear):
            nbytes, n = mod.weight_nbytes(), mod.in_features * mod.out_features
        elif getattr(mod, QUANT_ATTR, None) is not None:
            layer = QuantSparseLinear.from_quantized(getattr(mod, QUANT_ATTR))
            nbytes, n = layer.weight_nbytes(), layer.in_features * layer.out_features
        else:
            w = linear_weight(mod)
            nbytes, n = w.numel() * w.element_size(), w.numel()
        total_bytes, params = total_bytes + nbytes, params + n
    bpp = total_bytes / max(1, params)
    return {"bytes": total_bytes, "parameters": params, "bytes_per_parameter": bpp, "vs_bf16": bpp / BF16_BYTES}


def _block_linears(model: nn.Module) -> list[nn.Module]:
    """Every linear layer of the decoder blocks, packed or not."""
    kinds = LINEAR_TYPES + (QuantSparseLinear,)
    return [m for b in get_adapter(model).blocks(model) for m in b.modules() if isinstance(m, kinds)]


def _layer_spec(layer: QuantSparseLinear) -> dict:
    return {"in_features": layer.in_features, "out_features": layer.out_features, "bits": layer.bits,
            "group_size": layer.group_size, "symmetric": layer.symmetric, "nnz": layer.nnz,
            "bias": layer.bias is not None, "dtype": str(layer.weight_dtype).removeprefix("torch.")}


def save_quantized(model: nn.Module, tokenizer, out_dir: str | Path, metadata: dict | None = None,
                   overwrite: bool = False, protect: tuple = ()) -> Path:
    """Pack (if not yet packed) and write the model; returns the folder. The model is packed in place.

    `protect`: input paths that must never be replaced (the model that was loaded)."""
    from sparselm.io import atomic_output_dir

    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantSparseLinear)}
    if not layers:
        layers = pack_quantized(model)
    state = model.state_dict()
    tensors, tied, seen = {}, {}, {}
    for key, t in state.items():
        ident = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.numel() else None
        if ident is not None and ident in seen:
            tied[key] = seen[ident]  # safetensors refuses shared storage: store once, re-tie on load
            continue
        if ident is not None:
            seen[ident] = key
        tensors[key] = t.detach().contiguous().cpu()
    header = {"format_version": FORMAT_VERSION, "layers": {n: _layer_spec(m) for n, m in layers.items()},
              "tied": tied, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "size": bytes_per_parameter(model), **({"metadata": metadata} if metadata else {})}
    with atomic_output_dir(out_dir, overwrite=overwrite, protect=protect) as tmp:
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"sparselm_quant": json.dumps(header)})
        (tmp / HEADER_FILE).write_text(json.dumps(header, indent=2))
    return Path(out_dir)


def load_quantized(path: str | Path):
    """(model, tokenizer or None) from a folder written by `save_quantized`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / HEADER_FILE).exists() or not (path / WEIGHTS_FILE).exists():
        raise SparselmError(f"{str(path)!r} is not a quantized sparselm folder (needs {HEADER_FILE} and "
                            f"{WEIGHTS_FILE}); write one with sparselm.quant.save_quantized")
    header = json.loads((path / HEADER_FILE).read_text())
    if header.get("format_version") != FORMAT_VERSION:
        raise SparselmError(f"unsupported quantized format version {header.get('format_version')!r} "
                            f"(this sparselm reads {FORMAT_VERSION})")
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, header.get("dtype", "float32")))
    for name, spec in header["layers"].items():
        layer = QuantSparseLinear(spec["in_features"], spec["out_features"], spec["bits"], spec["group_size"],
                                  spec["symmetric"], spec["nnz"], spec["bias"], getattr(torch, spec["dtype"]))
        _set_module(model, name, layer)
    expected = model.state_dict()
    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as fh:
        stored = {k: fh.get_tensor(k) for k in fh.keys()}
    for key, alias in header.get("tied", {}).items():
        if alias not in stored:
            raise SparselmError(f"tensor {alias!r} (tied to {key!r}) is missing from {WEIGHTS_FILE}")
        stored[key] = stored[alias]
    for key, ref in expected.items():
        if key not in stored:
            raise SparselmError(f"tensor {key!r} is missing from {path / WEIGHTS_FILE}; the checkpoint is "
                                f"incomplete, save it again")
        t = stored[key]
        if tuple(t.shape) != tuple(ref.shape) or t.dtype != ref.dtype:
            raise SparselmError(f"tensor {key!r} has shape {tuple(t.shape)} {t.dtype} in the checkpoint but the "
                                f"model expects {tuple(ref.shape)} {ref.dtype}; the header and the weights disagree")
    extra = sorted(set(stored) - set(expected))
    if extra:
        raise SparselmError(f"tensor {extra[0]!r} in the checkpoint belongs to no layer of the model "
                            f"({len(extra)} unexpected in all); the header and the weights disagree")
    model.load_state_dict(stored, strict=True)
    if header.get("tied"):
        model.tie_weights()
    model.eval()
    tokenizer = None
    if (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
