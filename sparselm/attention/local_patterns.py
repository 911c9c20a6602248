"""Position-rule patterns: full causal, sliding window, sinks, global tokens, dilated, strided, fixed.

Each class states its rule and its closed-form pair count (the count of allowed causal
(q, k) pairs among n tokens; `Pattern.density` divides by n(n+1)/2).

References: sliding window (Beltagy et al. 2020, Longformer); dilated window (ibid.);
strided and fixed (Child et al. 2019, Sparse Transformers, section 4.2); global tokens
(Longformer; Zaheer et al. 2020, BigBird); attention sinks (Xiao et al. 2023,
"Efficient Streaming Language Models with Attention Sinks").
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sparselm.attention.pattern import Pattern, Range, positive_int, table_on, triangle
from sparselm.errors import SparselmError


def _window_pairs(n: int, w: int) -> int:
    """sum over q < n of min(q + 1, w): a causal band of width w."""
    m = min(n, w)
    return triangle(m) + max(0, n - w) * w


@dataclass(frozen=True)
class Causal(Pattern):
    """Full causal attention: every query sees every earlier key. Density 1."""

    translation_invariant = True

    def _rule(self, q, k):
        return torch.ones_like(k <= q)

    def pairs(self, n: int) -> int:
        return triangle(n)

    def spec(self) -> str:
        return "causal"


@dataclass(frozen=True)
class SlidingWindow(Pattern):
    """Each query sees the `window` most recent keys, itself included: 0 <= q - k < window."""

    translation_invariant = True

    window: int

    def __post_init__(self):
        positive_int("window", self.window)

    def _rule(self, q, k):
        return (q - k) < self.window

    def key_ranges(self, q_start: int, q_end: int) -> list[Range]:
        return [(max(0, q_start - self.window + 1), q_end)]

    def pairs(self, n: int) -> int:
        return _window_pairs(n, self.window)

    def spec(self) -> str:
        return f"window:{self.window}"


@dataclass(frozen=True)
class Sinks(Pattern):
    """Every query sees the first `count` tokens ("attention sinks"): k < count."""

    count: int

    def __post_init__(self):
        positive_int("sinks", self.count)

    def _rule(self, q, k):
        return k < self.count

    def key_ranges(self, q_start: int, q_end: int) -> list[Range]:
        return [(0, min(self.count, q_end))]

    def pairs(self, n: int) -> int:
        return _window_pairs(n, self.count)  # same count as a band: min(q + 1, count) per query

    def spec(self) -> str:
        return f"sinks:{self.count}"


@dataclass(frozen=True)
class GlobalTokens(Pattern):
    """Tokens at `positions` are global: all queries see them, and they see every earlier key.

    `GlobalTokens.first(g)` makes positions 0..g-1 global (under causality this equals
    `Sinks(g)`, since a query among the first g tokens only has keys among them).
    """

    positions: tuple[int, ...]
    _device_copies: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if not self.positions:
            raise SparselmError("global tokens need at least one position, e.g. GlobalTokens.first(4)")
        for p in self.positions:
            positive_int("global token position", p, minimum=0)
        object.__setattr__(self, "positions", tuple(sorted(set(self.positions))))
        table = torch.zeros(self.positions[-1] + 1, dtype=torch.bool)
        table[list(self.positions)] = True
        object.__setattr__(self, "_table", table)

    @classmethod
    def first(cls, count: int) -> "GlobalTokens":
        positive_int("global tokens", count)
        return cls(tuple(range(count)))

    def _is_global(self, pos: torch.Tensor) -> torch.Tensor:
        table = table_on(self._device_copies, "global", self._table, pos.device)
        return table[pos.clamp(0, table.numel() - 1)] & (pos < table.numel())

    def _rule(self, q, k):
        return self._is_global(k) | self._is_global(q)

    def key_ranges(self, q_start: int, q_end: int) -> list[Range]:
        if any(q_start <= p < q_end for p in self.positions):
            return [(0, q_end)]  # a global query in the block sees everything before it
        return [(p, p + 1) for p in self.positions if p < q_end]

    def pairs(self, n: int) -> int:
        inside = [p for p in self.positions if p < n]
        own_rows = sum(p + 1 for p in inside)  # a global query sees all keys up to itself
        # a non-global query q sees the global keys p <= q: count the (p, q) with q >= p, q not global
        later_rows = sum((n - p) - sum(1 for p2 in inside if p2 >= p) for p in inside)
        return own_rows + later_rows

    def spec(self) -> str:
        if self.positions == tuple(range(len(self.positions))):
            return f"global:{len(self.positions)}"
        return "global:" + ",".join(str(p) for p in self.positions)


@dataclass(frozen=True)
class DilatedWindow(Pattern):
    """`window` keys spaced `dilation` apart: q - k = m * dilation for m in 0..window-1 (Longformer)."""

    translation_invariant = True

    window: int
    dilation: int

    def __post_init__(self):
        positive_int("window", self.window)
        positive_int("dilation", self.dilation)

    def _rule(self, q, k):
        d = q - k
        return (d % self.dilation == 0) & (d < self.window * self.dilation)

    def key_ranges(self, q_start: int, q_end: int) -> list[Range]:
        return [(max(0, q_start - (self.window - 1) * self.dilation), q_end)]

    def pairs(self, n: int) -> int:
        # query q sees min(window, q // dilation + 1) keys; the min switches at q = window * dilation
        m, d = min(n, self.window * self.dilation), self.dilation
        groups, rest = divmod(m, d)
        ramp = d * triangle(groups) + rest * (groups + 1)
        return ramp + max(0, n - self.window * self.dilation) * self.window

    def spec(self) -> str:
        return f"dilated:{self.window}:{self.dilation}"


@dataclass(frozen=True)
class Strided(Pattern):
    """Sparse Transformers' strided pattern (Child et al. 2019, eq. for A(1) u A(2)):
    the previous `stride` keys, plus every key a multiple of `stride` back: (q - k) % stride == 0."""

    translation_invariant = True

    stride: int

    def __post_init__(self):
        positive_int("stride", self.stride)

    def _rule(self, q, k):
        d = q - k
        return (d < self.stride) | (d % self.stride == 0)

    def pairs(self, n: int) -> int:
        s = self.stride
        groups, rest = divmod(n, s)
        far = s * groups * (groups - 1) // 2 + rest * groups  # sum over q of q // s
        return _window_pairs(n, s) + far

    def spec(self) -> str:
        return f"strided:{self.stride}"


@dataclass(frozen=True)
class Fixed(Pattern):
    """Sparse Transformers' fixed pattern (Child et al. 2019): keys in the query's own block of
    `block` tokens, plus the last `summary` positions ("c") of every block: k mod block >= block - c."""

    block: int
    summary: int

    def __post_init__(self):
        positive_int("block", self.block)
        positive_int("summary", self.summary)
        if self.summary > self.block:
            raise SparselmError(f"fixed pattern: summary ({self.summary}) must be <= block ({self.block})")

    def _rule(self, q, k):
        same_block = (q // self.block) == (k // self.block)
        return same_block | ((k % self.block) >= self.block - self.summary)

    def key_ranges(self, q_start: int, q_end: int) -> list[Range]:
        own = (q_start // self.block) * self.block
        summaries = [(b * self.block + self.block - self.summary, (b + 1) * self.block)
                     for b in range(own // self.block)]
        return summaries + [(own, q_end)]

    def pairs(self, n: int) -> int:
        l, c = self.block, self.summary
        groups, rest = divmod(n, l)
        own = groups * triangle(l) + triangle(rest)  # (q mod l) + 1 per query
        earlier = c * (l * groups * (groups - 1) // 2 + rest * groups)  # c * (q // l) per query
        return own + earlier

    def spec(self) -> str:
        return f"fixed:{self.block}:{self.summary}"
