"""Arguments and steps shared by several subcommands (calibration data, devices, output)."""
from __future__ import annotations

import argparse
import json


def add_calibration_args(p: argparse.ArgumentParser, samples: int = 128, seq_len: int | None = 512) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument("--calib", default=None, metavar="TEXT",
                   help="calibration text: a text file or folder, or 'stdlib' (default: the built-in corpus)")
    g.add_argument("--samples", type=int, default=samples, help=f"calibration windows (default {samples})")
    g.add_argument("--seq-len", type=int, default=seq_len,
                   help="tokens per calibration window (default: min(512, model context))")
    g.add_argument("--seed", type=int, default=0, help="seed of the calibration sampling (default 0)")


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None,
                   help="where each block is processed: cpu or cuda (default: cuda when available)")


def resolve_device(name: str | None) -> str:
    import torch

    from sparselm.errors import SparselmError

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SparselmError("--device cuda was given but no CUDA GPU is available; use --device cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SparselmError(f"--device {name!r} is not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise SparselmError(f"--device {name} names GPU {device.index}, but this machine has {count} "
                            f"(cuda:0 to cuda:{count - 1}); pick one of those")
    return name


def calibration_for(model, tokenizer, args) -> tuple:
    """(calibration ids [n, seq_len], a record of where they came from)."""
    from sparselm.data import calibration, load_corpus
    from sparselm.evaluate import model_context

    corpus = load_corpus(args.calib)
    seq_len = args.seq_len or min(512, model_context(model))
    seq_len = min(seq_len, model_context(model))
    ids = calibration(tokenizer, corpus, n=args.samples, seq_len=seq_len, seed=args.seed)
    return ids, {"corpus": corpus.name, "corpus_fingerprint": corpus.fingerprint, "samples": args.samples,
                 "seq_len": seq_len, "seed": args.seed}


def print_json(obj) -> None:
    print(json.dumps(obj, default=str))
