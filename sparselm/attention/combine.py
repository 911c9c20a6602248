"""Union (`a | b`) and intersection (`a & b`) of patterns.

Sparse Transformers' factorised attention and BigBird are unions (window | global |
random); intersections restrict a pattern (e.g. `strided:64 & window:1024`). Pair counts
of compositions are counted, not closed-form.
"""
from __future__ import annotations

from dataclasses import dataclass

from sparselm.attention.pattern import Pattern, Range, intersect_ranges, merge_ranges


@dataclass(frozen=True)
class _Composite(Pattern):
    """Parts combined key by key with `_combine` (a boolean operator on rule outputs)."""

    parts: tuple[Pattern, ...]

    @classmethod
    def of(cls, *patterns: Pattern):
        flat: list[Pattern] = []
        for p in patterns:
            flat.extend(p.parts if isinstance(p, cls) else (p,))
        return cls(tuple(flat))

    @property
    def translation_invariant(self) -> bool:
        return all(p.translation_invariant for p in self.parts)

    def prepare(self, n: int) -> None:
        for p in self.parts:
            p.prepare(n)

    @staticmethod
    def _combine(a, b):
        raise NotImplementedError

    def _rule(self, q, k):
        out = self.parts[0]._rule(q, k)
        for p in self.parts[1:]:
            out = self._combine(out, p._rule(q, k))
        return out


@dataclass(frozen=True)
class Union(_Composite):
    """A key is allowed if any part allows it."""

    @staticmethod
    def _combine(a, b):
        return a | b

    def key_ranges(self, q_start: int, q_end: int) -> list[Range]:
        return merge_ranges([r for p in self.parts for r in p.key_ranges(q_start, q_end)])

    def spec(self) -> str:
        return "+".join(p.spec() for p in self.parts)


@dataclass(frozen=True)
class Intersection(_Composite):
    """A key is allowed only if every part allows it."""

    @staticmethod
    def _combine(a, b):
        return a & b

    def key_ranges(self, q_start: int, q_end: int) -> list[Range]:
        ranges = merge_ranges(self.parts[0].key_ranges(q_start, q_end))
        for p in self.parts[1:]:
            ranges = intersect_ranges(ranges, merge_ranges(p.key_ranges(q_start, q_end)))
        return ranges

    def spec(self) -> str:
        return "&".join(f"({p.spec()})" if isinstance(p, Union) else p.spec() for p in self.parts)
