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


def _cpu_caches() -> list[tuple[int, str, int]]:
    """(level, type, bytes) of each cache of CPU 0 from sysfs; empty where sysfs has none."""
    caches = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            kind = (index / "type").read_text().strip()
            text = (index / "size").read_text().strip().upper()
        except (OSError, ValueError):
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in "KMG" else text
        if digits.isdigit():
            caches.append((level, kind, int(digits) * scale))
    return caches


def l3_cache_bytes(default: int = 32 * 2**20) -> int:
    """Size of the largest CPU cache (L3 on most machines) from sysfs, else `default`."""
    return max((size for _, _, size in _cpu_caches()), default=0) or default


def cache_bytes(level: int, default: int) -> int:
    """Size of one core's data (or unified) cache at `level` (1, 2, 3) from sysfs, else `default`."""
    return next((size for lvl, kind, size in _cpu_caches() if lvl == level and kind != "Instruction"), default)


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


def alternating_rounds(measures: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Call every measure once per round, the order reversed every other round, and collect what
    each returns (seconds, tokens/s, ...). Neither candidate always runs right after the other
    (on caches it just filled), and a burst of load from another process hits both alike."""
    samples: dict[str, list[float]] = {name: [] for name in measures}
    order = list(measures)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            samples[name].append(measures[name]())
    return samples


def median_ratio(samples: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of samples[num][r] / samples[den][r]. Robust to the machine's speed
    drifting during a run, which the ratio of two medians is not."""
    return statistics.median(a / b for a, b in zip(samples[num], samples[den]))


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Distribution-free confidence interval for the median of `values`: (low, high, coverage).

    The interval between the j-th smallest and the j-th largest value holds the true median
    with probability 1 - 2 P(Binomial(n, 1/2) < j), whatever the distribution, for independent
    samples; j is the largest index whose coverage is still >= `confidence`. With too few
    values for that (n < 6 at 95%) it is the full range and `coverage` says what it holds.
    """
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise ValueError("median_interval needs at least one value")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")

    def coverage(j: int) -> float:  # P(x_(j) <= median <= x_(n+1-j))
        return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(j)) / 2.0**n

    j = 1
    while j + 1 <= (n + 1) // 2 and coverage(j + 1) >= confidence:
        j += 1
    return xs[j - 1], xs[n - j], coverage(j)


def ratio_interval(samples: dict[str, list[float]], num: str, den: str,
                   confidence: float = 0.95) -> tuple[float, float, float]:
    """`median_interval` of the per-round ratios samples[num][r] / samples[den][r]."""
    return median_interval([a / b for a, b in zip(samples[num], samples[den])], confidence)
