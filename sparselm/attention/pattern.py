"""The pattern abstraction: which (query, key) position pairs may attend, as a mask function.

A pattern is a rule `allows(q, k) -> bool tensor` over absolute token positions, written
only with element-wise tensor ops so the same rule serves three consumers: the dense-mask
reference (evaluated on a full [Tq, Tk] grid), the blocked backend (evaluated on the small
grid of one query chunk and the keys it gathers) and FlexAttention (traced as `mask_mod`).

Every pattern is causal: `allows` is always intersected with `k <= q`, because sparselm's
models are causal language models. Patterns compose with `|` (union) and `&`
(intersection), as in Child et al. 2019 ("Generating Long Sequences with Sparse
Transformers"), where factorised patterns are unions of simple ones.

Density convention: `density(n)` = allowed pairs / causal pairs = pairs(n) / (n(n+1)/2),
so full causal attention has density 1.0. Primitives give `pairs(n)` in closed form;
compositions count (`counted_pairs`), and tests check that both agree.

Position legend: T = tokens, Tq / Tk = query / key lengths, C = query chunk, K = gathered keys.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from sparselm.errors import SparselmError

Range = tuple[int, int]  # half-open [start, end) of key positions


def triangle(m: int) -> int:
    """1 + 2 + ... + m: the allowed pairs of full causal attention over m tokens."""
    return m * (m + 1) // 2


def merge_ranges(ranges: list[Range]) -> list[Range]:
    """Sorted, non-overlapping, non-empty union of half-open ranges."""
    merged: list[Range] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def intersect_ranges(a: list[Range], b: list[Range]) -> list[Range]:
    """Intersection of two sorted, merged range lists."""
    out: list[Range] = []
    i = j = 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


class Pattern:
    """Base class of every attention pattern.

    Subclasses implement `_rule(q, k)` (the pattern without causality), `key_ranges`
    (a superset of the keys a block of queries may need, so backends gather only those),
    `spec()` (the string `parse_pattern` reads back) and, where one exists, `pairs(n)`
    in closed form.
    """

    # True when allows(q + s, k + s) == allows(q, k) for every shift s >= 0 (backends reuse masks)
    translation_invariant = False

    # -- the rule --------------------------------------------------------------------
    def _rule(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def allows(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Bool tensor, broadcast of `q` and `k` (int64 absolute positions): may q attend to k?

        Call `prepare(n)` first with n > every position used (patterns with tables need it).
        """
        return (k <= q) & self._rule(q, k)

    def prepare(self, n: int) -> None:
        """Make the pattern ready for positions < n (sizes lookup tables; validates n)."""

    def key_ranges(self, q_start: int, q_end: int) -> list[Range]:
        """Key ranges within [0, q_end) holding every key that queries q_start..q_end-1 may see.

        A superset is allowed (the exact mask is applied afterwards); tighter is faster.
        """
        return [(0, q_end)]

    def spec(self) -> str:
        raise NotImplementedError

    # -- composition -------------------------------------------------------------------
    def __or__(self, other: "Pattern") -> "Pattern":
        from sparselm.attention.combine import Union

        return Union.of(self, _as_pattern(other))

    def __and__(self, other: "Pattern") -> "Pattern":
        from sparselm.attention.combine import Intersection

        return Intersection.of(self, _as_pattern(other))

    def __str__(self) -> str:
        return self.spec()

    # -- measurement -------------------------------------------------------------------
    def mask(self, n_q: int, n_k: int | None = None, q_offset: int | None = None) -> torch.Tensor:
        """Dense bool mask [n_q, n_k]; queries sit at positions q_offset + i (default n_k - n_q)."""
        n_k = n_q if n_k is None else n_k
        q_offset = n_k - n_q if q_offset is None else q_offset
        self.prepare(max(n_k, n_q + q_offset))
        q = torch.arange(n_q) + q_offset  # [Tq]
        k = torch.arange(n_k)  # [Tk]
        return self.allows(q[:, None], k[None, :])  # [Tq, Tk]

    def counted_pairs(self, n: int, rows: int = 512) -> int:
        """Allowed pairs among n tokens, counted by evaluating the rule (O(n^2) time, O(rows*n) memory)."""
        self.prepare(n)
        total = 0
        for start in range(0, n, rows):
            q = torch.arange(start, min(n, start + rows))  # [R]
            k = torch.arange(min(n, start + rows))  # [K]
            total += int(self.allows(q[:, None], k[None, :]).sum())
        return total

    def pairs(self, n: int) -> int:
        """Allowed (q, k) pairs among n tokens; closed form in primitives, counted otherwise."""
        return self.counted_pairs(n)

    def density(self, n: int) -> float:
        """Fraction of the causal pairs the pattern keeps at length n (1.0 = full causal attention)."""
        if n <= 0:
            raise SparselmError(f"density needs a positive length, got {n}")
        return self.pairs(n) / triangle(n)

    def render(self, path: str | os.PathLike, n: int = 64) -> Path:
        """Save a PNG picture of the mask at length n (black = attends); written atomically."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        mask = self.mask(n).numpy()  # [T, T]
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.imshow(~mask, cmap="gray", interpolation="nearest", vmin=0, vmax=1)
        ax.set_title(f"{self.spec()}\nlength {n}, density {self.density(n):.3f}", fontsize=9)
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
        os.close(fd)
        try:
            fig.savefig(tmp, dpi=100, bbox_inches="tight")
            os.replace(tmp, path)
        finally:
            plt.close(fig)
            if os.path.exists(tmp):
                os.remove(tmp)
        return path


def _as_pattern(value) -> Pattern:
    if isinstance(value, Pattern):
        return value
    if isinstance(value, str):
        from sparselm.attention.parse import parse_pattern

        return parse_pattern(value)
    raise SparselmError(f"cannot combine a pattern with {type(value).__name__}; use a Pattern or a pattern string")


def positive_int(name: str, value, minimum: int = 1) -> int:
    """Validate an integer parameter of a pattern, raising SparselmError that says what to pass."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise SparselmError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise SparselmError(f"{name} must be >= {minimum}, got {value}; pass a positive {name}")
    return value


def table_on(copies: dict, name: str, table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`table` on `device`: itself when it is there already, else a copy made once and kept in
    `copies` (a pattern's own cache). A compiled FlexAttention mask cannot copy a CPU lookup table
    to the GPU inside its graph, so `pattern_block_mask` evaluates the rule once eagerly first."""
    if table.device == device:
        return table
    key = (name, str(device))
    if key not in copies:
        copies[key] = table.to(device)
    return copies[key]
