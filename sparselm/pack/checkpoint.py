"""Compressed checkpoints: packed sparse weights in safetensors with a small JSON header.

Layout of a packed folder (loadable with `load_packed`, or `sparselm.load`, which routes here):

    config.json, tokenizer files         as written by transformers
    model.safetensors                    every tensor of the model; a packed layer `L` stores
                                         `L.values`, `L.col_indices`, ... instead of `L.weight`
    sparselm_packed.json                 the header: per packed layer its format, shape, dtype
                                         (and n, m), tied tensors, and the size report

The header is also stored in the safetensors metadata, so a file that lost its JSON twin can
still be checked. Guarantees: `load_packed` gives a model whose outputs are bit-identical to
the model that was saved (same modules, same tensors); with `unpack=True` the packed layers
come back as plain dense layers, bit-identical to the pruned dense model. A missing, extra or
mismatched tensor is refused with its name. Nothing is written in place: the folder appears
only when complete.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from sparselm.errors import SparselmError
from sparselm.pack import formats
from sparselm.pack.sparse_linear import SparseLinear, dense_weight_of

HEADER_FILE = "sparselm_packed.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


def _smallest_format(weight: torch.Tensor, n: int, m: int, name: str) -> str | None:
    """The packed format with the fewest bytes for this weight, or None if dense is smallest."""
    dense_bytes = weight.numel() * weight.element_size()
    sizes = {fmt: formats.packed_nbytes(SparseLinear.from_dense(weight, fmt, name=name).packed_tensors())
             for fmt in ("csr", "bitmask")}
    if formats.nm_violations(weight, n, m) == 0:
        sizes["nm"] = formats.packed_nbytes(formats.pack_nm(weight, n, m, name=name))
    best = min(sizes, key=sizes.get)
    return best if sizes[best] < dense_bytes else None


def _expected_shapes(spec: dict) -> dict[str, tuple]:
    out_f, in_f, fmt = spec["out_features"], spec["in_features"], spec["format"]
    if fmt == "csr":
        return {"crow_indices": (out_f + 1,), "col_indices": (spec["nnz"],), "values": (spec["nnz"],)}
    if fmt == "bitmask":
        return {"mask": (out_f, 8 * ((in_f + 63) // 64)), "row_offsets": (out_f + 1,), "values": (spec["nnz"],)}
    slots = ((in_f + spec["m"] - 1) // spec["m"]) * spec["n"]
    return {"indices": (out_f, slots), "values": (out_f, slots)}


def _layer_spec(module: SparseLinear) -> dict:
    spec = {"format": module.format, "in_features": module.in_features, "out_features": module.out_features,
            "dtype": str(module.values.dtype).replace("torch.", ""), "bias": module.bias is not None,
            "nnz": int(module.values.numel()) if module.format != "nm" else module.nnz}
    if module.format == "nm":
        spec.update(n=module.n, m=module.m)
    return spec


def save_packed(model: nn.Module, tokenizer, out_dir, metadata: dict | None = None, overwrite: bool = False,
                n: int = 2, m: int = 4, protect: tuple = ()) -> Path:
    """Write `model` with its sparse linear layers packed; the input model is not modified.

    Layers that are already SparseLinear keep their format. Dense decoder-block linears with
    zeros are packed into the format with the fewest bytes (csr, bitmask, or n:m when the mask
    allows), unless dense is smaller. Returns the folder; the size report is in its header.
    `protect` lists input paths the output must not replace (the input model's folder).
    """
    from safetensors.torch import save_file

    from sparselm.io import atomic_output_dir, library_version
    from sparselm.pack.auto import packable_layers

    # Packing a copy would double the memory; collect packed tensors per layer instead.
    replaced: dict[str, SparseLinear] = {}
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            replaced[name] = module
    try:
        candidates = packable_layers(model)
    except SparselmError:
        candidates = {}
    for name, module in candidates.items():
        weight = dense_weight_of(module)
        if (weight == 0).any():
            fmt = _smallest_format(weight, n, m, name)
            if fmt is not None:
                replaced[name] = SparseLinear.from_dense(module, fmt, n=n, m=m, name=name)

    tensors: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        layer = key.rpartition(".")[0]
        if layer in replaced and not isinstance(model.get_submodule(layer), SparseLinear):
            continue  # a dense layer stored packed below
        tensors[key] = value
    for name, module in replaced.items():
        for key, value in module.packed_tensors().items():
            tensors[f"{name}.{key}"] = value
        if module.bias is not None:
            tensors[f"{name}.bias"] = module.bias.detach()

    # safetensors refuses shared storage: keep one copy of tied tensors, record the others.
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    unique: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.dtype)
        if value.numel() and ident in seen:
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        unique[key] = value.detach().cpu().contiguous().clone() if not value.is_contiguous() else value.detach().cpu()

    layers = {name: _layer_spec(module) for name, module in sorted(replaced.items())}
    header = {"format_version": FORMAT_VERSION, "layers": layers, "tied": tied}
    with atomic_output_dir(out_dir, overwrite=overwrite, protect=protect) as tmp:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(unique, str(tmp / WEIGHTS_FILE), metadata={"sparselm_packed": json.dumps(header)})
        file_bytes = (tmp / WEIGHTS_FILE).stat().st_size
        dense_params = sum(p.numel() for k, p in model.state_dict().items()
                           if p.is_floating_point() and k.rpartition(".")[0] not in replaced and k not in tied)
        dense_params += sum(s["in_features"] * s["out_features"] + (s["out_features"] if s["bias"] else 0)
                            for s in layers.values())
        dense_equiv_bytes = sum(p.numel() * p.element_size() for k, p in model.state_dict().items()
                                if p.is_floating_point() and k.rpartition(".")[0] not in replaced and k not in tied)
        dense_equiv_bytes += sum((s["in_features"] * s["out_features"] + (s["out_features"] if s["bias"] else 0))
                                 * torch.empty(0, dtype=getattr(torch, s["dtype"])).element_size()
                                 for s in layers.values())
        header["size"] = {"file_bytes": file_bytes, "parameters": dense_params,
                          "bytes_per_parameter": file_bytes / max(1, dense_params),
                          "dense_bytes": dense_equiv_bytes, "ratio_to_dense": file_bytes / max(1, dense_equiv_bytes)}
        header["sparselm_version"] = library_version()
        header["metadata"] = metadata or {}
        (tmp / HEADER_FILE).write_text(json.dumps(header, indent=2, default=str))
    return Path(out_dir)


def read_header(path) -> dict:
    """The JSON header of a packed folder (layers, tied tensors, size report)."""
    path = Path(path)
    try:
        return json.loads((path / HEADER_FILE).read_text())
    except (OSError, ValueError) as err:
        raise SparselmError(f"{path} is not a packed sparselm checkpoint ({HEADER_FILE} unreadable: {err}); "
                            "write one with save_packed or `sparselm pack`") from err


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path / WEIGHTS_FILE))
    except Exception as err:  # noqa: BLE001 - any parse failure means the file is unusable
        raise SparselmError(f"cannot read {path / WEIGHTS_FILE}: {err}; the checkpoint is corrupt or "
                            "truncated, save it again") from err


def load_packed(path, unpack: bool = False):
    """(model, tokenizer) from a folder written by `save_packed`.

    unpack=False: packed layers are SparseLinear (bit-identical outputs to the saved model).
    unpack=True: they are decoded back into the model's own dense layers.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    header = read_header(path)
    if header.get("format_version") != FORMAT_VERSION:
        raise SparselmError(f"{path}: packed format version {header.get('format_version')} is not "
                            f"supported (this sparselm reads version {FORMAT_VERSION}); upgrade sparselm")
    tensors = _read_tensors(path)
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config)
    model.eval()
    for name, spec in header["layers"].items():
        try:
            dense = model.get_submodule(name)
        except AttributeError as err:
            raise SparselmError(f"{path}: packed layer {name!r} does not exist in a {config.model_type} model; "
                                "the checkpoint does not match its config.json") from err
        packed = {}
        for key, shape in _expected_shapes(spec).items():
            tname = f"{name}.{key}"
            if tname not in tensors:
                raise SparselmError(f"{path}: tensor {tname!r} is missing from {WEIGHTS_FILE}; the checkpoint is "
                                    "incomplete, save it again")
            if tuple(tensors[tname].shape) != tuple(shape):
                raise SparselmError(f"{path}: tensor {tname!r} has shape {list(tensors[tname].shape)}, the header "
                                    f"says {list(shape)}; the checkpoint is corrupt, save it again")
            packed[key] = tensors.pop(tname)
        if str(packed["values"].dtype).replace("torch.", "") != spec["dtype"]:
            raise SparselmError(f"{path}: tensor {name + '.values'!r} has dtype {packed['values'].dtype}, "
                                f"the header says {spec['dtype']}; the checkpoint is corrupt, save it again")
        bias = tensors.pop(f"{name}.bias", None) if spec["bias"] else None
        if spec["bias"] and bias is None:
            raise SparselmError(f"{path}: tensor {name + '.bias'!r} is missing from {WEIGHTS_FILE}")
        module = SparseLinear(spec["in_features"], spec["out_features"], spec["format"], packed, bias,
                              n=spec.get("n"), m=spec.get("m"))
        if unpack:
            _write_dense(dense, module, name)
            module = dense
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)

    expected = model.state_dict()
    packed_keys = {f"{name}.{k}" for name in header["layers"] for k in
                   ("weight", "bias", "crow_indices", "col_indices", "values", "mask", "row_offsets", "indices")}
    state: dict[str, torch.Tensor] = {}
    for key, target in expected.items():
        if key in packed_keys and (unpack or isinstance(model.get_submodule(key.rpartition(".")[0]), SparseLinear)):
            continue  # already placed with its layer
        source_key = header["tied"].get(key, key)
        if source_key not in tensors and source_key not in state:
            raise SparselmError(f"{path}: tensor {key!r} is missing from {WEIGHTS_FILE}; the checkpoint is "
                                "incomplete, save it again")
        value = tensors.get(source_key, state.get(source_key))
        if tuple(value.shape) != tuple(target.shape):
            raise SparselmError(f"{path}: tensor {key!r} has shape {list(value.shape)}, the model expects "
                                f"{list(target.shape)}; the checkpoint does not match its config.json")
        state[key] = value
    used = set(state) | set(header["tied"].values())
    extra = sorted(k for k in tensors if k not in used)
    if extra:
        raise SparselmError(f"{path}: unexpected tensor {extra[0]!r} in {WEIGHTS_FILE} (and {len(extra) - 1} more); "
                            "the checkpoint does not match its config.json")
    model.load_state_dict(state, strict=False, assign=True)
    tokenizer = AutoTokenizer.from_pretrained(path) if any(path.glob("tokenizer*")) else None
    return model, tokenizer


def _write_dense(dense: nn.Module, packed: SparseLinear, name: str) -> None:
    """Copy a decoded packed weight into a dense nn.Linear / Conv1D (bit-exact)."""
    weight = packed.dense_weight()  # [out, in]
    if isinstance(dense, nn.Linear):
        dense.weight = nn.Parameter(weight, requires_grad=False)
    elif type(dense).__name__ == "Conv1D":
        dense.weight = nn.Parameter(weight.t().contiguous(), requires_grad=False)
    else:
        raise SparselmError(f"cannot unpack layer {name!r} into a {type(dense).__name__}")
    if packed.bias is not None:
        dense.bias = nn.Parameter(packed.bias.detach(), requires_grad=False)


def size_report(path) -> dict:
    """File size, parameter count and bytes per parameter of a packed folder."""
    return read_header(path)["size"]
