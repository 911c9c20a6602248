"""`sparselm pack MODEL --out DIR`: pack sparse layers into the fastest format, write a packed checkpoint."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("pack", help="pack a pruned model's sparse layers and save a compressed checkpoint")
    p.add_argument("model", help="a local HF model folder (pruned) or a built-in name")
    p.add_argument("--format", default="auto", choices=["auto", "dense", "csr", "bitmask", "nm"],
                   help="auto: fastest measured per layer (default); or force one format")
    p.add_argument("--batch-size", type=int, default=1, help="batch size the model will run at (default 1)")
    p.add_argument("--nm", default="2:4", help="N:M pattern of the nm format (default 2:4)")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print the report as one JSON line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sparselm.errors import SparselmError
    from sparselm.io import load
    from sparselm.pack import pack, save_packed, size_report

    from pathlib import Path

    if Path(args.out).exists() and not args.overwrite:  # before minutes of work, not after
        raise SparselmError(f"output folder {args.out} already exists; choose another --out or pass --overwrite")
    try:
        n, m = (int(v) for v in args.nm.split(":"))
    except ValueError as err:
        raise SparselmError(f"--nm must look like 2:4, got {args.nm!r}") from err
    model, tokenizer = load(args.model)
    report = pack(model, args.format, batch_size=args.batch_size, n=n, m=m, progress=not args.json)
    out = save_packed(model, tokenizer, args.out, metadata={"packed_from": str(args.model),
                                                           "pack_format": args.format,
                                                           "batch_size": args.batch_size,
                                                           "choices": report.counts()},
                      overwrite=args.overwrite, n=n, m=m, protect=(args.model,))
    size = size_report(out)
    if args.json:
        from sparselm.cli.common import print_json

        print_json({"out": str(out), "pack": report.to_dict(), "size": size})
        return 0
    print(report.table())
    print(f"\nwrote {out}: {size['file_bytes'] / 2**20:.2f} MiB, {size['parameters']:,} parameters, "
          f"{size['bytes_per_parameter']:.3f} bytes/parameter ({size['ratio_to_dense']:.3f}x the dense file)")
    return 0
