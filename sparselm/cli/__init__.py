"""Command line: one subcommand per job, each in its own module of this package.

Each module `sparselm/cli/<name>.py` defines `register(subparsers)` that adds its parser
and sets `func=<callable(args) -> int>` as a default.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# Order is the order `sparselm --help` lists them in.
COMMANDS = [
    "demo", "prune", "eval", "compare", "shrink", "lowrank", "moefy", "attention",
    "train", "activations", "quantize", "pack", "bench",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparselm", description="Make transformer language models sparse, and measure what it buys.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        modname = f"sparselm.cli.{name}"
        if importlib.util.find_spec(modname) is None:
            continue
        importlib.import_module(modname).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from sparselm.errors import SparselmError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except SparselmError as err:
        print(f"sparselm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sparselm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
