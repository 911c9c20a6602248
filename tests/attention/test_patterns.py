"""Patterns: closed-form densities against counting, hand-checked masks, parsing, rendering, errors."""
import pytest
import torch

from sparselm.attention import (
    BlockSparse, Causal, DilatedWindow, Fixed, GlobalTokens, RandomBlocks, Sinks, SlidingWindow, Strided,
    parse_pattern,
)
from sparselm.errors import SparselmError

PRIMITIVES = [
    Causal(), SlidingWindow(1), SlidingWindow(5), SlidingWindow(64), Sinks(3), GlobalTokens.first(2),
    GlobalTokens((0, 7, 20)), DilatedWindow(3, 2), DilatedWindow(4, 5), Strided(1), Strided(4), Strided(7),
    Fixed(4, 1), Fixed(8, 3), Fixed(5, 5), RandomBlocks(4, 1, seed=3), RandomBlocks(8, 2, seed=0),
]


@pytest.mark.parametrize("pattern", PRIMITIVES, ids=lambda p: p.spec())
@pytest.mark.parametrize("n", [1, 2, 7, 16, 33, 70])
def test_closed_form_pairs_match_counting(pattern, n):
    assert pattern.pairs(n) == pattern.counted_pairs(n)


def test_closed_forms_by_hand():
    # window 3 over 6 tokens: rows see 1, 2, 3, 3, 3, 3 keys
    assert SlidingWindow(3).pairs(6) == 15
    assert SlidingWindow(3).density(6) == pytest.approx(15 / 21)
    # strided 2 over 5 tokens: local min(q+1, 2) = 1,2,2,2,2 plus q // 2 = 0,0,1,1,2
    assert Strided(2).pairs(5) == 9 + 4
    # fixed block 4, c=1, 8 tokens: own block (q mod 4)+1 -> 2 * 10, plus 1 summary key for q >= 4
    assert Fixed(4, 1).pairs(8) == 20 + 4
    # sinks 2 over 4 tokens: 1, 2, 2, 2
    assert Sinks(2).pairs(4) == 7
    assert Causal().density(100) == 1.0
    # window at 16k: almost exactly w / ((n + 1) / 2)
    assert SlidingWindow(256).density(16384) == pytest.approx((256 * 257 / 2 + (16384 - 256) * 256) / (16384 * 16385 / 2))


def test_window_mask_by_hand():
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0],
                             [0, 1, 1, 1, 0, 0],
                             [0, 0, 1, 1, 1, 0],
                             [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(SlidingWindow(3).mask(6), expected)
    # queries as the last 2 of 6 keys (decoding with a cache)
    assert torch.equal(SlidingWindow(3).mask(2, 6), expected[4:])


def test_union_and_intersection_are_or_and_of_masks():
    a, b = SlidingWindow(4), Strided(3)
    n = 29
    assert torch.equal((a | b).mask(n), a.mask(n) | b.mask(n))
    assert torch.equal((a & b).mask(n), a.mask(n) & b.mask(n))
    sw = Sinks(2) | SlidingWindow(5)
    # per query: min(q+1, w) window keys + sinks outside the window
    by_hand = sum(min(q + 1, 5) + max(0, min(2, q + 1 - 5)) for q in range(n))
    assert sw.pairs(n) == by_hand


def test_every_pattern_is_causal():
    for p in PRIMITIVES + [Sinks(2) | SlidingWindow(3), GlobalTokens((5,)) | Strided(3)]:
        m = p.mask(40)
        assert not torch.triu(m, diagonal=1).any(), p.spec()


def test_random_blocks_seeded_and_prefix_stable():
    a, b, c = RandomBlocks(4, 2, seed=1), RandomBlocks(4, 2, seed=1), RandomBlocks(4, 2, seed=2)
    assert torch.equal(a.mask(64), b.mask(64))
    assert not torch.equal(a.mask(64), c.mask(64))
    assert torch.equal(RandomBlocks(4, 2, seed=1).mask(128)[:64, :64], a.mask(64))
    # every query block past the second sees exactly 2 earlier whole blocks
    tiles = a.mask(64).view(16, 4, 16, 4).any(3).any(1)  # [query block, key block]
    assert tiles[2:].sum(1).tolist() == [2] * 14


def test_block_sparse_layout():
    layout = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 0]], dtype=torch.bool)
    p = BlockSparse(layout, block=2)
    m = p.mask(6)
    assert m[2:4, 0:2].all() and not m[4:6, 0:2].any() and not m[4:6, 4:6].any()
    assert p.pairs(6) == p.counted_pairs(6) == 2 * 4 + 2 * 3
    with pytest.raises(SparselmError, match="does not divide"):
        p.pairs(5)
    with pytest.raises(SparselmError, match="covers 6 tokens"):
        p.mask(8)


@pytest.mark.parametrize("text", ["window:256+sinks:4", "strided:64", "fixed:64:8", "dilated:32:4", "global:8",
                                  "global:0,5,9", "random:64:2:7", "causal", "(window:8+sinks:1)&strided:4",
                                  "window:16&strided:4+sinks:2"])
def test_parse_round_trip(text):
    p = parse_pattern(text)
    assert parse_pattern(p.spec()) == p
    assert torch.equal(parse_pattern(p.spec()).mask(50), p.mask(50))


def test_parse_structure_and_precedence():
    assert parse_pattern("window:256+sinks:4") == SlidingWindow(256) | Sinks(4)
    assert parse_pattern("window:8&strided:2+sinks:1") == (SlidingWindow(8) & Strided(2)) | Sinks(1)
    assert parse_pattern(" window:8 + sinks:1 ") == SlidingWindow(8) | Sinks(1)


@pytest.mark.parametrize("bad,message", [
    ("window:0", "window must be >= 1"), ("window:-3", "window must be >= 1"), ("wndow:5", "unknown pattern"),
    ("window", "takes 1 argument"), ("window:x", "must be an integer"), ("window:4+", "ends where"),
    ("(window:4", "missing"), ("", "empty"), ("fixed:4:8", "summary"), ("window:4 sinks:2", "unexpected"),
])
def test_bad_pattern_strings(bad, message):
    with pytest.raises(SparselmError, match=message):
        parse_pattern(bad)


def test_bad_constructor_arguments():
    with pytest.raises(SparselmError):
        SlidingWindow(0)
    with pytest.raises(SparselmError):
        RandomBlocks(0, 1)
    with pytest.raises(SparselmError):
        BlockSparse(torch.ones(2, 3, dtype=torch.bool), block=4)
    with pytest.raises(SparselmError):
        SlidingWindow(4).density(0)


def test_render_png(tmp_path):
    path = (SlidingWindow(8) | Sinks(2)).render(tmp_path / "sub" / "mask.png", n=32)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 500
    assert [p.name for p in path.parent.iterdir()] == ["mask.png"]  # no temporary file left behind


def test_translation_invariance_flags_are_true():
    from sparselm.attention.pattern import Pattern

    q = torch.arange(40)[:, None]
    k = torch.arange(40)[None, :]
    flagged = [p for p in PRIMITIVES + [SlidingWindow(4) | Strided(3)] if p.translation_invariant]
    assert {type(p).__name__ for p in flagged} >= {"SlidingWindow", "Strided", "DilatedWindow", "Causal", "Union"}
    for p in flagged:
        p.prepare(100)
        assert torch.equal(p.allows(q + 17, k + 17), p.allows(q, k)), p.spec()
    assert not (SlidingWindow(4) | Sinks(2)).translation_invariant
    assert not Pattern.translation_invariant


@pytest.mark.parametrize("pattern", [
    GlobalTokens((0, 5)) | SlidingWindow(4),
    RandomBlocks(block=4, count=1),
    BlockSparse(torch.ones(4, 4, dtype=torch.bool), block=4),
], ids=["global", "random", "blocksparse"])
def test_lookup_tables_are_copied_to_the_device_once(pattern):
    # A compiled FlexAttention mask on a GPU cannot copy a CPU table inside its graph: the
    # tables must already be on the device (the "meta" device stands in for the GPU here).
    pattern.prepare(16)
    probe = torch.zeros(1, dtype=torch.int32, device="meta")
    pattern.allows(probe, probe)
    parts = getattr(pattern, "parts", (pattern,))
    copies = [c for p in parts for c in getattr(p, "_device_copies", {}).values()]
    assert copies and all(c.device.type == "meta" for c in copies)
    before = [id(c) for c in copies]
    pattern.allows(probe, probe + 3)
    assert [id(c) for p in parts for c in getattr(p, "_device_copies", {}).values()] == before  # reused
    assert pattern.mask(16).equal(pattern.mask(16))  # CPU evaluation unchanged
