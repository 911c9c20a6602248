"""Block patterns: BigBird-style seeded random blocks, and arbitrary block-sparse layouts.

Both work on a grid of `block` x `block` tiles. A tile's rule is looked up in a bool
layout [query blocks, key blocks]; causality inside diagonal tiles comes from the base
class (`k <= q`).

Reference: Zaheer et al. 2020, "Big Bird: Transformers for Longer Sequences", section 2
(random attention: each query block attends r random key blocks).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sparselm.attention.pattern import Pattern, Range, merge_ranges, positive_int, table_on, triangle
from sparselm.errors import SparselmError


def _tile_lookup(layout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, block: int,
                 copies: dict) -> torch.Tensor:
    """layout[q // block, k // block] for broadcast position tensors, False outside the layout."""
    layout = table_on(copies, "layout", layout, q.device)
    qb, kb = q // block, k // block
    inside = (qb < layout.shape[0]) & (kb < layout.shape[1])
    return layout[qb.clamp(max=layout.shape[0] - 1), kb.clamp(max=layout.shape[1] - 1)] & inside


@dataclass(frozen=True)
class RandomBlocks(Pattern):
    """Each query block attends `count` key blocks drawn at random from the blocks before it.

    Draws are seeded per query block (seed, block index), so the layout at length n is a
    prefix of the layout at any longer length, and the same seed gives the same pattern on
    every machine. Query blocks with fewer than `count` earlier blocks attend all of them.
    The diagonal block is not included: compose with `SlidingWindow` as BigBird does.
    """

    block: int
    count: int
    seed: int = 0
    _layouts: dict = field(default_factory=dict, compare=False, repr=False)
    _device_copies: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        positive_int("block", self.block)
        positive_int("random blocks", self.count)
        positive_int("seed", self.seed, minimum=0)

    def _choices(self, query_block: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + query_block)
        return torch.randperm(query_block, generator=gen)[: self.count]  # [<= count]

    def layout(self, n_blocks: int) -> torch.Tensor:
        """Bool [n_blocks, n_blocks]: may query block i attend key block j (a prefix of any longer layout)."""
        have = max(self._layouts, default=0)
        if have >= n_blocks:
            return self._layouts[have][:n_blocks, :n_blocks]
        table = torch.zeros(n_blocks, n_blocks, dtype=torch.bool)
        for qb in range(1, n_blocks):
            table[qb, self._choices(qb)] = True
        self._layouts.clear()  # keep one table: the largest length in use
        self._device_copies.clear()  # copies of the smaller table
        self._layouts[n_blocks] = table
        return table

    def prepare(self, n: int) -> None:
        have = max(self._layouts, default=0)
        if have * self.block < n:
            self.layout(-(-n // self.block))

    def _rule(self, q, k):
        table = self._layouts[max(self._layouts)]
        return _tile_lookup(table, q, k, self.block, self._device_copies)

    def key_ranges(self, q_start: int, q_end: int) -> list[Range]:
        self.prepare(q_end)
        table = self._layouts[max(self._layouts)]
        first, last = q_start // self.block, (q_end - 1) // self.block
        blocks = table[first:last + 1].any(0).nonzero().flatten().tolist()
        return merge_ranges([(b * self.block, min(q_end, (b + 1) * self.block)) for b in blocks])

    def pairs(self, n: int) -> int:
        total = 0
        for qb in range(-(-n // self.block)):
            rows = min(self.block, n - qb * self.block)
            total += rows * min(self.count, qb) * self.block  # chosen blocks are earlier, hence full
        return total

    def spec(self) -> str:
        return f"random:{self.block}:{self.count}:{self.seed}"


@dataclass(frozen=True)
class BlockSparse(Pattern):
    """An arbitrary layout: query block i attends key block j where `layout[i, j]` is True.

    The sequence length must be a multiple of `block` and at most layout rows * block.
    Tiles above the diagonal are ignored (causality).
    """

    layout: torch.Tensor = field(compare=False)
    block: int = 64
    _device_copies: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        positive_int("block", self.block)
        if not isinstance(self.layout, torch.Tensor) or self.layout.ndim != 2 \
                or self.layout.shape[0] != self.layout.shape[1]:
            raise SparselmError("block-sparse layout must be a square 2-D tensor [blocks, blocks] of bools")
        object.__setattr__(self, "layout", self.layout.detach().to("cpu", torch.bool).clone())

    def prepare(self, n: int) -> None:
        capacity = self.layout.shape[0] * self.block
        if n > capacity:
            raise SparselmError(f"block-sparse layout covers {capacity} tokens ({self.layout.shape[0]} blocks of "
                                f"{self.block}) but the sequence has {n}; pass a larger layout")

    def check_length(self, n: int) -> None:
        """Raise unless the block size divides n (the layout is defined per whole tile)."""
        self.prepare(n)
        if n % self.block:
            raise SparselmError(f"block size {self.block} does not divide the sequence length {n}; "
                                f"pad the sequence to a multiple of {self.block} or choose a block size that divides it")

    def _rule(self, q, k):
        return _tile_lookup(self.layout, q, k, self.block, self._device_copies)

    def key_ranges(self, q_start: int, q_end: int) -> list[Range]:
        first, last = q_start // self.block, (q_end - 1) // self.block
        blocks = self.layout[first:last + 1].any(0).nonzero().flatten().tolist()
        return merge_ranges([(b * self.block, min(q_end, (b + 1) * self.block)) for b in blocks])

    def pairs(self, n: int) -> int:
        self.check_length(n)
        nb = n // self.block
        tiles = self.layout[:nb, :nb]
        below = int(torch.tril(tiles, diagonal=-1).sum())
        return below * self.block * self.block + int(tiles.diagonal().sum()) * triangle(self.block)

    def spec(self) -> str:
        return f"blocks:{self.block}:{int(self.layout.sum())}of{self.layout.numel()}"

    def __eq__(self, other):
        return isinstance(other, BlockSparse) and self.block == other.block \
            and self.layout.shape == other.layout.shape and bool((self.layout == other.layout).all())

    def __hash__(self):
        return hash((self.block, tuple(self.layout.flatten().tolist())))
