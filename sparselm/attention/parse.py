"""Pattern strings: `window:256+sinks:4`, `strided:64`, `(window:128+random:64:2:0)&window:1024`.

Grammar (`&` binds tighter than `+`; spaces are ignored):

    expr  := term ('+' term)*          union
    term  := atom ('&' atom)*          intersection
    atom  := '(' expr ')' | NAME (':' ARG)*

Names and their arguments:

    causal | full                     full causal attention
    window:W                          sliding window of W keys
    sinks:S                           the first S tokens
    global:G | global:P1,P2,...       the first G tokens, or the listed positions, are global
    dilated:W:D                       W keys spaced D apart
    strided:S                         Sparse Transformers strided pattern
    fixed:L:C                         Sparse Transformers fixed pattern (block L, C summary keys)
    random:B:R[:SEED]                 R random earlier blocks of B tokens per query block
"""
from __future__ import annotations

import re

from sparselm.attention.block_patterns import RandomBlocks
from sparselm.attention.combine import Intersection, Union
from sparselm.attention.local_patterns import (
    Causal, DilatedWindow, Fixed, GlobalTokens, Sinks, SlidingWindow, Strided,
)
from sparselm.attention.pattern import Pattern
from sparselm.errors import SparselmError

_USAGE = ("known patterns: causal, window:W, sinks:S, global:G, dilated:W:D, strided:S, fixed:L:C, "
          "random:B:R[:SEED]; join with '+' (union) or '&' (intersection), e.g. 'window:256+sinks:4'")
_TOKEN = re.compile(r"\s*(\(|\)|\+|&|[A-Za-z_]+(?::[^\s()+&]*)*)")


def _int(text: str, what: str, source: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise SparselmError(f"pattern {source!r}: {what} must be an integer, got {text!r}; {_USAGE}") from None


def _atom(word: str, source: str) -> Pattern:
    name, *args = word.split(":")
    name = name.lower()
    arities = {"causal": (0,), "full": (0,), "window": (1,), "sinks": (1,), "global": (1,), "dilated": (2,),
               "strided": (1,), "fixed": (2,), "random": (2, 3)}
    if name not in arities:
        raise SparselmError(f"unknown pattern {name!r} in {source!r}; {_USAGE}")
    if len(args) not in arities[name]:
        want = " or ".join(str(a) for a in arities[name])
        raise SparselmError(f"pattern {word!r} takes {want} argument(s) after ':', got {len(args)}; {_USAGE}")
    if name == "global" and "," in args[0]:
        return GlobalTokens(tuple(_int(a, "a global position", source) for a in args[0].split(",")))
    values = [_int(a, f"the argument of {name}", source) for a in args]
    if name in ("causal", "full"):
        return Causal()
    if name == "global":
        return GlobalTokens.first(values[0])
    builders = {"window": SlidingWindow, "sinks": Sinks, "dilated": DilatedWindow, "strided": Strided,
                "fixed": Fixed, "random": RandomBlocks}
    return builders[name](*values)


def parse_pattern(text: str | Pattern) -> Pattern:
    """Parse a pattern string (see the module docstring); a Pattern passes through unchanged.

    Raises SparselmError naming the bad part and listing the valid patterns.
    """
    if isinstance(text, Pattern):
        return text
    if not isinstance(text, str) or not text.strip():
        raise SparselmError(f"empty or non-string pattern {text!r}; {_USAGE}")
    source, pos, tokens = text, 0, []
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m:
            raise SparselmError(f"cannot read pattern {source!r} at {text[pos:]!r}; {_USAGE}")
        tokens.append(m.group(1))
        pos = m.end()

    def expr(i: int) -> tuple[Pattern, int]:
        node, i = term(i)
        parts = [node]
        while i < len(tokens) and tokens[i] == "+":
            node, i = term(i + 1)
            parts.append(node)
        return (parts[0] if len(parts) == 1 else Union.of(*parts)), i

    def term(i: int) -> tuple[Pattern, int]:
        node, i = atom(i)
        parts = [node]
        while i < len(tokens) and tokens[i] == "&":
            node, i = atom(i + 1)
            parts.append(node)
        return (parts[0] if len(parts) == 1 else Intersection.of(*parts)), i

    def atom(i: int) -> tuple[Pattern, int]:
        if i >= len(tokens):
            raise SparselmError(f"pattern {source!r} ends where a pattern was expected; {_USAGE}")
        if tokens[i] == "(":
            node, i = expr(i + 1)
            if i >= len(tokens) or tokens[i] != ")":
                raise SparselmError(f"pattern {source!r}: missing ')'")
            return node, i + 1
        if tokens[i] in ")+&":
            raise SparselmError(f"pattern {source!r}: unexpected {tokens[i]!r}; {_USAGE}")
        return _atom(tokens[i], source), i + 1

    node, end = expr(0)
    if end != len(tokens):
        raise SparselmError(f"pattern {source!r}: unexpected {tokens[end]!r}; {_USAGE}")
    return node
