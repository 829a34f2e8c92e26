"""Load tests: calls at a steady rate for a while, with live progress and a summary (throughput, p50/p95/p99, errors).

Bounded on purpose: at most ``MAX_RPS`` calls a second, ``MAX_DURATION_S`` seconds and ``MAX_CALLS`` calls, and
only against a grid on this machine (a loopback address), so it measures a grid and cannot flood anyone else's.
Calls are started on schedule whether or not earlier ones have answered (an open loop), and each latency counts
from the moment its call was due, so a grid that falls behind shows it in the percentiles instead of hiding it.
"""

from __future__ import annotations

import ipaddress
import math
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from nanogrid_contract.errors import InvalidArgument

MAX_RPS = 500
MAX_DURATION_S = 300.0
MAX_CALLS = 20_000
MAX_IN_FLIGHT = 64  # calls waiting for an answer at once; beyond this a due call counts as an error ("overloaded")


def check_bounds(rps: float, duration_s: float) -> int:
    """The number of calls a test makes; refuses rates, durations and counts over the bounds."""
    if not 0 < rps <= MAX_RPS:
        raise InvalidArgument(f"--rps must be more than 0 and at most {MAX_RPS}, not {rps:g}")
    if not 0 < duration_s <= MAX_DURATION_S:
        raise InvalidArgument(
            f"--duration must be more than 0 and at most {MAX_DURATION_S:g} s, not {duration_s:g}"
        )
    calls = math.ceil(rps * duration_s)
    if calls > MAX_CALLS:
        raise InvalidArgument(
            f"{rps:g} calls/s for {duration_s:g} s is {calls} calls; a load test makes at most "
            f"{MAX_CALLS}: lower --rps or --duration"
        )
    return calls


def check_loopback(url: str) -> None:
    """Load tests only go to a grid on this machine."""
    host = urlsplit(url).hostname or ""
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except OSError as exc:
        raise InvalidArgument(f"cannot resolve the grid's host {host!r}: {exc}") from None
    if not addresses or not all(
        ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses
    ):
        raise InvalidArgument(
            f"load tests run only against a grid on this machine (a loopback address), not {url}; "
            "run `nanogrid loadtest` on the grid's own host"
        )


@dataclass
class LoadTest:
    """A running or finished load test: counts as they happen, the summary once ``done``."""

    rps: float
    duration_s: float
    planned: int
    sent: int = 0
    completed: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # why calls failed -> how many
    latencies_ms: list[float] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    done: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, latency_ms: float, error: str | None) -> None:
        with self.lock:
            self.latencies_ms.append(latency_ms)
            if error is None:
                self.completed += 1
            else:
                self.failed += 1
                self.errors[error] = self.errors.get(error, 0) + 1

    def summary(self) -> dict[str, Any]:
        with self.lock:
            latencies = sorted(self.latencies_ms)
            answered = self.completed + self.failed
            elapsed = (self.finished_at or time.time()) - self.started_at
            return {
                "rps": self.rps,
                "duration_s": self.duration_s,
                "planned": self.planned,
                "sent": self.sent,
                "completed": self.completed,
                "failed": self.failed,
                "errors": dict(self.errors),
                "elapsed_s": round(elapsed, 3),
                "throughput": round(answered / elapsed, 2) if elapsed > 0 else 0.0,
                "p50_ms": _percentile(latencies, 0.50),
                "p95_ms": _percentile(latencies, 0.95),
                "p99_ms": _percentile(latencies, 0.99),
                "max_ms": round(latencies[-1], 3) if latencies else None,
                "done": self.done,
                "started_at": self.started_at,
                "finished_at": self.finished_at,
            }


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))], 3)


def run(
    call: Callable[[], str | None],
    rps: float,
    duration_s: float,
    *,
    on_progress: Callable[[LoadTest], None] | None = None,
    progress_every_s: float = 0.5,
    stop: threading.Event | None = None,
) -> LoadTest:
    """Make ``rps`` calls a second for ``duration_s`` seconds; ``call`` returns None on success, else why it failed.

    ``on_progress`` is called about every ``progress_every_s`` seconds and once at the end; ``stop`` ends it early.
    """
    test = LoadTest(rps, duration_s, check_bounds(rps, duration_s))
    stop = stop or threading.Event()
    in_flight = threading.Semaphore(MAX_IN_FLIGHT)

    def one(due: float) -> None:
        try:
            error = call()
        # an error of the call is a result of the test, never the end of it
        except Exception as exc:
            error = type(exc).__name__
        finally:
            in_flight.release()
        test.record((time.monotonic() - due) * 1000, error)

    start, last_progress = time.monotonic(), 0.0
    with ThreadPoolExecutor(MAX_IN_FLIGHT, thread_name_prefix="loadtest") as pool:
        for n in range(test.planned):
            due = start + n / rps
            while (wait := due - time.monotonic()) > 0 and not stop.is_set():
                stop.wait(min(wait, progress_every_s))
                if on_progress and time.monotonic() - last_progress >= progress_every_s:
                    last_progress = time.monotonic()
                    on_progress(test)
            if stop.is_set():
                break
            test.sent += 1
            if not in_flight.acquire(blocking=False):
                # the grid is this far behind: counted, not queued without bound
                test.record(0.0, "overloaded")
                continue
            pool.submit(one, due)
        while on_progress and test.completed + test.failed < test.sent and not stop.is_set():
            stop.wait(progress_every_s)  # the last calls are answering: keep the progress live
            on_progress(test)
    test.finished_at, test.done = time.time(), True
    if on_progress:
        on_progress(test)
    return test
