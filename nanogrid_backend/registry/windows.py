"""Metrics windows from rollups: what every adapter needs to keep and read a function's 1h/24h/7d/30d figures.

A finished call adds one to a few counters (per function, per time slot, per log-scale bucket of its
duration and of its peak memory) instead of being read back later: a window is a sum over at most a few
thousand counter rows, whatever the number of calls. Percentiles come from the buckets (four per
doubling, so within about 9 % of the exact value) and never exceed the exact maximum, which is kept too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

from nanogrid_backend.models import FAILED, JobRecord

MINUTE, HOUR = 60, 3600
# name -> (seconds, resolution of the slots it sums): the hour is counted by the minute, longer windows by the hour
WINDOWS: dict[str, tuple[int, int]] = {
    "1h": (3600, MINUTE),
    "24h": (86400, HOUR),
    "7d": (7 * 86400, HOUR),
    "30d": (30 * 86400, HOUR),
}
RESOLUTIONS = (MINUTE, HOUR)
MINUTE_SLOTS_KEPT_S = 2 * 3600  # minute counters are needed for the last hour only
STEPS_PER_DOUBLING = 4
NO_VALUE = -10_000  # the bucket of a call with no duration or memory (cancelled before it started)
DURATION, MEMORY = "d", "m"  # counter kinds: duration in ms, peak memory in MiB
MiB = 1 << 20


def bucket_of(value: float | None) -> int:
    """The log-scale bucket of a positive value: [2^(b/4), 2^((b+1)/4))."""
    if value is None:
        return NO_VALUE
    return math.floor(math.log2(max(value, 1e-3)) * STEPS_PER_DOUBLING)


def bucket_value(bucket: int) -> float:
    """A bucket's representative value: the geometric middle of its bounds."""
    return 2 ** ((bucket + 0.5) / STEPS_PER_DOUBLING)


def bucket_upper(bucket: int) -> float:
    return 2 ** ((bucket + 1) / STEPS_PER_DOUBLING)


class Counter(NamedTuple):
    """One counter row's key and the call's contribution to it (a tuple: four are made for every finished call)."""

    resolution: int
    slot: int
    metric: str
    bucket: int
    failed: int
    cold: int
    value: float | None


def counters_for(job: JobRecord) -> list[Counter]:
    """What one finished call adds: at each resolution, its duration bucket and its memory bucket."""
    when = job.finished_at or time.time()
    failed, cold = int(job.status == FAILED), int(bool(job.cold))
    duration = job.execution_time_ms
    memory = None if job.peak_memory_bytes is None else job.peak_memory_bytes / MiB
    duration_bucket, memory_bucket = bucket_of(duration), bucket_of(memory)
    rows = []
    for resolution in RESOLUTIONS:
        slot = int(when // resolution)
        rows.append(Counter(resolution, slot, DURATION, duration_bucket, failed, cold, duration))
        rows.append(Counter(resolution, slot, MEMORY, memory_bucket, failed, cold, memory))
    return rows


def first_slot(window: str, now: float) -> tuple[int, int]:
    """(resolution, the oldest slot a window sums): windows are whole minutes (1h) or whole hours."""
    seconds, resolution = WINDOWS[window]
    return resolution, int((now - seconds) // resolution) + 1


def summarise(
    rows: Sequence[tuple[str, int, int, int, int, float, float | None]], since: float
) -> dict[str, Any]:
    """One window from its summed counters: rows of (metric, bucket, calls, failed, cold, total, max)."""
    durations = sorted((b, n, total, peak) for m, b, n, _, _, total, peak in rows if m == DURATION)
    memory = sorted((b, n, total, peak) for m, b, n, _, _, total, peak in rows if m == MEMORY)
    count = sum(n for m, _, n, *_ in rows if m == DURATION)
    errors = sum(f for m, _, _, f, *_ in rows if m == DURATION)
    cold = sum(c for m, _, _, _, c, *_ in rows if m == DURATION)
    return {
        "since": since,
        "count": count,
        "errors": errors,
        "error_rate": errors / count if count else None,
        "cold_starts": cold,
        "cold_share": cold / count if count else None,
        "duration_ms": _distribution(durations),
        "peak_memory_mib": {
            **_distribution(memory),
            "histogram": [
                {"le": round(bucket_upper(b), 3), "count": n}
                for b, n, _, _ in memory
                if b != NO_VALUE
            ],
        },
    }


def _distribution(buckets: list[tuple[int, int, float, float | None]]) -> dict[str, float | None]:
    measured = [(b, n, total, peak) for b, n, total, peak in buckets if b != NO_VALUE]
    count = sum(n for _, n, _, _ in measured)
    if not count:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    peak = max(p for *_, p in measured if p is not None)
    figures: dict[str, float | None] = {}
    for name, q in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99)):
        rank, seen = q * count, 0
        for b, n, _, _ in measured:
            seen += n
            if seen >= rank:
                figures[name] = round(min(bucket_value(b), peak), 3)
                break
    figures["mean"] = round(sum(total for _, _, total, _ in measured) / count, 3)
    figures["max"] = round(peak, 3)
    return figures
