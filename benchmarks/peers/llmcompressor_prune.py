"""Prune a local Hugging Face causal LM with llm-compressor, on given calibration tokens.

The peer side of ``benchmarks/bench_pruning.py``. It runs inside ``.venv-llmcompressor``
(created by ``benchmarks/peers/setup_llmcompressor.sh``), never in the main environment,
because llm-compressor pins an older transformers than sparselm uses.

Guarantees:
- calibration uses exactly the rows of ``input_ids`` in the given safetensors file, in
  order, unshuffled and untruncated, so both libraries see the same tokens;
- pruning goes through llm-compressor's own public entry point (``oneshot``) with its
  sequential pipeline (one decoder layer at a time, later layers calibrated on the
  outputs of already-pruned ones, as in SparseGPT section 3 / Wanda section 3);
- every ``nn.Linear`` inside the decoder layers is pruned; ``lm_head`` and embeddings
  are not (the setting both papers report);
- the output folder holds plain dense weights with zeros (``save_compressed=False``) and
  the tokenizer if the input folder had one, so any ``transformers`` can load it; it is
  written to a temporary sibling folder and renamed into place when complete;
- the last line printed on stdout is one JSON object with the settings and
  ``prune_seconds``: the wall time of the ``oneshot`` call alone (model loading and
  saving excluded).

Usage:
    .venv-llmcompressor/bin/python benchmarks/peers/llmcompressor_prune.py \\
        MODEL_DIR CALIB.safetensors --method sparsegpt --sparsity 0.5 \\
        --pattern 2:4 --out OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path, help="local HF causal LM folder")
    parser.add_argument("calib", type=Path,
                        help="safetensors file with a LongTensor 'input_ids' [n, seq_len]")
    parser.add_argument("--method", choices=["sparsegpt", "wanda"], required=True)
    parser.add_argument("--sparsity", type=float, default=0.5,
                        help="fraction of zeros per layer for unstructured masks")
    parser.add_argument("--pattern", default="unstructured",
                        help="'unstructured' or 'N:M' (e.g. 2:4)")
    parser.add_argument("--owl", action="store_true",
                        help="llm-compressor's OWL layer-wise sparsity profile "
                             "(outlier threshold M=5, lambda=0.08, as in the OWL paper)")
    parser.add_argument("--dampening", type=float, default=0.01,
                        help="SparseGPT dampening as a fraction of mean(diag H)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="calibration batch size (llm-compressor's default is 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (must not exist)")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> tuple[int, int]:
    """Validate the arguments before any heavy import; returns (N, M), (0, 0) if unstructured."""
    if not (args.model_dir / "config.json").is_file():
        sys.exit(f"error: {args.model_dir} has no config.json; pass a Hugging Face model folder")
    if not (args.model_dir / "tokenizer.json").is_file() and not (
            args.model_dir / "tokenizer_config.json").is_file():
        sys.exit(f"error: {args.model_dir} has no tokenizer files; llm-compressor's oneshot "
                 "needs a tokenizer, save one next to the model")
    if not args.calib.is_file():
        sys.exit(f"error: calibration file {args.calib} does not exist")
    if args.out.exists():
        sys.exit(f"error: output folder {args.out} exists; remove it or choose another --out")
    if args.pattern == "unstructured":
        if not 0.0 <= args.sparsity < 1.0:
            sys.exit(f"error: --sparsity {args.sparsity} is outside [0, 1)")
        return 0, 0
    try:
        n, m = (int(part) for part in args.pattern.split(":"))
    except ValueError:
        sys.exit(f"error: --pattern {args.pattern!r} is neither 'unstructured' nor N:M like 2:4")
    if not 0 < n < m:
        sys.exit(f"error: --pattern {args.pattern} needs 0 < N < M")
    if args.owl:
        sys.exit("error: --owl allocates unstructured sparsity; use --pattern unstructured")
    return n, m


def calibration_loader(calib_path: Path, batch_size: int):
    """A DataLoader over the given rows, in file order, as llm-compressor's pipelines expect.

    Passing a DataLoader makes ``oneshot`` skip its own dataset loading, tokenisation,
    shuffling and truncation, so the peer sees the same tokens as sparselm.
    """
    import torch
    from safetensors.torch import load_file

    input_ids = load_file(str(calib_path))["input_ids"].long()  # [n, T]
    if input_ids.dim() != 2:
        sys.exit(f"error: 'input_ids' in {calib_path} has shape {tuple(input_ids.shape)}, "
                 "expected [n, seq_len]")
    rows = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in input_ids]

    def stack_rows(batch: list[dict]) -> dict:
        return {key: torch.stack([row[key] for row in batch]) for key in batch[0]}  # [B, T]

    loader = torch.utils.data.DataLoader(rows, batch_size=batch_size, shuffle=False,
                                         collate_fn=stack_rows)
    return loader, tuple(input_ids.shape)


def build_modifier(args: argparse.Namespace, n: int, m: int, decoder_layer: str):
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    settings = dict(
        sparsity=args.sparsity if n == 0 else n / m,
        mask_structure=f"{n}:{m}",  # "0:0" is llm-compressor's spelling of unstructured
        targets=[decoder_layer],  # prune the Linear layers inside every decoder layer
        ignore=["re:.*lm_head"],
    )
    if args.owl:
        # OWL paper defaults (Yin et al. 2023, section 4): M = 5, lambda = 0.08.
        settings.update(sparsity_profile="owl", owl_m=5, owl_lmbda=0.08)
    if args.method == "sparsegpt":
        return SparseGPTModifier(dampening_frac=args.dampening, block_size=128, **settings)
    return WandaPruningModifier(**settings)


def decoder_layer_class(model) -> str:
    """Class name of the model's decoder layer, from the HF convention ``_no_split_modules``."""
    names = list(getattr(model, "_no_split_modules", None) or [])
    if not names:
        sys.exit("error: the model declares no _no_split_modules; cannot find its decoder layers")
    return names[0]


def save_dense(model, model_dir: Path, out_dir: Path) -> None:
    """Save dense weights with zeros next to ``out_dir`` first, then rename into place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(str(staging), save_compressed=False)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, staging / name)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    n, m = check_args(args)

    import torch
    import transformers
    import llmcompressor
    from llmcompressor import oneshot

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(args.model_dir), dtype=torch.float32)
    model.eval()
    # oneshot insists on a processor whenever data is given, although a DataLoader
    # bypasses tokenisation entirely; hand it the model's own tokenizer.
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(args.model_dir))
    loader, calib_shape = calibration_loader(args.calib, args.batch_size)
    layer_class = decoder_layer_class(model)
    modifier = build_modifier(args, n, m, layer_class)

    start = time.perf_counter()
    oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=loader,
        recipe=[modifier],
        num_calibration_samples=calib_shape[0],
        pipeline="sequential",
        sequential_targets=[layer_class],
        output_dir=None,  # saved below, uncompressed, so plain transformers can load it
    )
    prune_seconds = time.perf_counter() - start

    save_dense(model, args.model_dir, args.out)
    record = {
        "library": "llmcompressor",
        "version": llmcompressor.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "method": args.method,
        "owl": args.owl,
        "pattern": args.pattern,
        "sparsity": args.sparsity if n == 0 else n / m,
        "dampening": args.dampening if args.method == "sparsegpt" else None,
        "calib_shape": list(calib_shape),
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "prune_seconds": round(prune_seconds, 3),
        "out": str(args.out),
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
