"""Load and save models: local Hugging Face folders or built-in names in, HF layout out.

Loading never unpickles: weights must be safetensors (or `.bin` read with weights_only=True
by transformers), and remote code is never trusted unless asked for. Saving writes to a
temporary folder beside the target and renames it into place only when complete.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from sparselm.errors import SparselmError

METADATA_FILE = "sparselm.json"


def _check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    st.get_slice(key)  # header entries must point inside the file
            size = f.stat().st_size
            with open(f, "rb") as fh:
                header_len = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(header_len))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if 8 + header_len + end > size:
                raise ValueError(f"file has {size} bytes, tensors need {8 + header_len + end}")
        except Exception as err:  # noqa: BLE001 - any parse failure means the file is unusable
            raise SparselmError(f"corrupt or truncated weights file {f}: {err}; re-download or re-save the model") from err


def load_safetensors_into(model, path: Path, layout: str) -> None:
    """Load every *.safetensors file of `path` into a model built for a custom `layout` (low-rank,
    per-layer widths, ...): corrupt files, a missing weight or an unexpected one are refused."""
    from safetensors.torch import load_file

    _check_safetensors(path)
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    if not state:
        raise SparselmError(f"{path} has no .safetensors weights; save the model with sparselm")
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise SparselmError(f"{path}: weights do not match the {layout} (missing {sorted(set(missing) - tied)[:3]}, "
                            f"unexpected {unexpected[:3]}); re-save the model")
    model.tie_weights()
    model.eval()


def load_tokenizer_if_present(path: Path):
    from transformers import AutoTokenizer

    has_tokenizer = any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    return AutoTokenizer.from_pretrained(path) if has_tokenizer else None


def load(path_or_name: str | Path, dtype: torch.dtype | str | None = None, trust_remote_code: bool = False,
         device: str | None = None):
    """(model, tokenizer) from a local HF causal-LM folder, or a built-in name ("tiny", "small")."""
    from sparselm.zoo import BUILTIN_SPECS, load_builtin

    if isinstance(path_or_name, str) and path_or_name in BUILTIN_SPECS and not Path(path_or_name).exists():
        model, tok = load_builtin(path_or_name)
        return (model.to(device), tok) if device else (model, tok)
    path = Path(path_or_name).expanduser()
    if not path.exists():
        raise SparselmError(f"model path {str(path_or_name)!r} does not exist; give a local Hugging Face model "
                            f"folder or a built-in name ({', '.join(BUILTIN_SPECS)})")
    if not path.is_dir() or not (path / "config.json").exists():
        raise SparselmError(f"{str(path)!r} is not a model folder (no config.json); give a folder written by "
                            f"save_pretrained")
    config = json.loads((path / "config.json").read_text())
    special = _special_loader(path, config)
    if special is not None:
        return special(path)
    _check_safetensors(path)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as err:
        raise SparselmError(f"unsupported architecture in {path}: {err}. sparselm loads causal LMs that "
                            f"transformers knows (llama, mistral, qwen2, gpt2, opt, ...); pass "
                            f"trust_remote_code=True only if you trust the model's code") from err
    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=cfg, dtype=dtype or "auto",
                                                     trust_remote_code=trust_remote_code)
    except ValueError as err:
        raise SparselmError(f"{path} holds a {cfg.model_type!r} model that is not a causal LM: {err}") from err
    model.eval()
    if device:
        model.to(device)
    return model, AutoTokenizer.from_pretrained(path)


def _special_loader(path: Path, config: dict):
    """Loaders for formats plain transformers cannot read (packed, low-rank, MoE), or None."""
    if (path / "sparselm_quant.json").exists():
        from sparselm.quant import load_quantized
        return load_quantized
    if (path / "sparselm_packed.json").exists():
        from sparselm.pack.checkpoint import load_packed
        return load_packed
    if "sparselm_intermediate_sizes" in config:  # per-layer MLP widths after structured pruning
        from sparselm.structured import load_structured
        return load_structured
    if "sparselm_lowrank" in config:
        from sparselm.lowrank.io import load_lowrank
        return load_lowrank
    if "sparselm_moe" in config or config.get("model_type") == "sparselm_moe":
        from sparselm.moe.io import load_moe
        return load_moe
    return None


def check_output_dir(out_dir: str | Path, overwrite: bool = False, protect: tuple = ()) -> Path:
    """Refuse an output folder that exists (unless `overwrite`) or is one of the inputs in
    `protect`; creates nothing, so commands can check before hours of work."""
    out = Path(out_dir).expanduser().resolve()
    for p in protect:
        if p is not None and Path(p).expanduser().exists() and Path(p).expanduser().resolve() == out:
            raise SparselmError(f"output folder {out} is the input model; write to another folder")
    if out.exists() and not overwrite:
        raise SparselmError(f"output folder {out} already exists; choose another --out or pass --overwrite")
    return out


@contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool = False, protect: tuple = ()):
    """Yield a temporary folder; on success it replaces `out_dir`, on failure it is removed.

    `protect` lists input paths that must never be replaced (the input model).
    """
    out = check_output_dir(out_dir, overwrite, protect)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        if out.exists():
            backup = out.with_name(f".{out.name}.old-{tmp.name[-8:]}")
            out.rename(backup)
            tmp.rename(out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def library_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sparselm")
    except PackageNotFoundError:
        return "0+unknown"


def save(model, tokenizer, out_dir: str | Path, metadata: dict | None = None, overwrite: bool = False,
         packed: bool = False, protect: tuple = ()) -> Path:
    """Save in HF layout (safetensors) plus `sparselm.json` with what was done; atomic.

    With `packed=True` the sparse weights are stored packed (see `sparselm.pack.checkpoint`).
    """
    if packed:
        from sparselm.pack.checkpoint import save_packed
        return save_packed(model, tokenizer, out_dir, metadata=metadata, overwrite=overwrite)
    with atomic_output_dir(out_dir, overwrite=overwrite, protect=protect) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        record = {"sparselm_version": library_version(), **(metadata or {})}
        (tmp / METADATA_FILE).write_text(json.dumps(record, indent=2, default=str))
    return Path(out_dir)
