"""Where sparselm keeps what it builds once: trained built-in models, token streams, kernels."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """`$SPARSELM_CACHE` or `$XDG_CACHE_HOME/sparselm` or `~/.cache/sparselm`, joined with parts; created."""
    base = os.environ.get("SPARSELM_CACHE")
    if base:
        root = Path(base)
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sparselm"
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
