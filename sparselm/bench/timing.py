"""Wall-clock timing that a speed claim can rest on: medians, warm-up, and cold caches.

A decode step of a large model streams its weights from memory; timing one layer again and
again instead measures the last-level cache. `cold_copies` says how many copies of an
operand to rotate through so that each call reads memory, sized from this CPU's L3.
"""
from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Callable


def l3_cache_bytes(default: int = 32 * 2**20) -> int:
    """Size of the largest CPU cache (L3 on most machines) from sysfs, else `default`."""
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in "KMG" else text
        if digits.isdigit():
            best = max(best, int(digits) * scale)
    return best or default


def cache_bytes(level: int, default: int) -> int:
    """Size of one core's data (or unified) cache at `level` (1, 2, 3) from sysfs, else `default`."""
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if int((index / "level").read_text()) != level or (index / "type").read_text().strip() == "Instruction":
                continue
            text = (index / "size").read_text().strip().upper()
        except (OSError, ValueError):
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in "KMG" else text
        if digits.isdigit():
            return int(digits) * scale
    return default


def cold_copies(bytes_per_copy: int, l3_bytes: int | None = None, max_copies: int = 64,
                max_total_bytes: int = 6 * 2**30) -> int:
    """Copies to rotate so the bytes touched between two uses of one copy exceed twice the L3.

    Capped by `max_total_bytes` (memory) and `max_copies`; at least 2.
    """
    l3 = l3_bytes if l3_bytes is not None else l3_cache_bytes()
    wanted = math.ceil(2 * l3 / max(1, bytes_per_copy)) + 1
    by_memory = max(2, max_total_bytes // max(1, bytes_per_copy))
    return int(max(2, min(wanted, max_copies, by_memory)))


def median_seconds(fn: Callable[[int], object], repeats: int = 10, warmup: int = 2,
                   min_total_seconds: float = 0.0) -> float:
    """Median wall time of `fn(i)` over `repeats` calls (i counts calls, for rotating operands).

    Runs `warmup` untimed calls first. Keeps going past `repeats` until `min_total_seconds`
    of timed calls have accumulated (at most 10x repeats), so very fast calls get more samples.
    """
    for i in range(warmup):
        fn(i)
    samples: list[float] = []
    i = warmup
    while len(samples) < repeats or (sum(samples) < min_total_seconds and len(samples) < 10 * repeats):
        start = time.perf_counter()
        fn(i)
        samples.append(time.perf_counter() - start)
        i += 1
    return statistics.median(samples)
