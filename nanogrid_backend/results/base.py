"""The result bus's interface, and the bookkeeping of listeners and live logs its adapters share."""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

from nanogrid_backend.models import JobRecord
from nanogrid_backend.token_buckets import LocalTokenBuckets, TokenBuckets

if TYPE_CHECKING:
    import redis

Listener = Callable[[JobRecord], None]
LogChunk = tuple[str, bytes]  # (stream, data): what a running call printed
LOG_BYTES = 2 << 20  # live output kept per job (the full capture is on the job once it finishes)
LOG_TTL_S = 600.0  # how long a finished job's live log stays readable


class Listeners:
    """Who waits on which job: the bookkeeping every bus shares."""

    def __init__(self) -> None:
        self._by_job: dict[str, list[Listener]] = {}
        self._lock = threading.Lock()

    def add(self, job_ids: list[str], listener: Listener) -> Callable[[], None]:
        with self._lock:
            for job_id in job_ids:
                self._by_job.setdefault(job_id, []).append(listener)

        def remove() -> None:
            with self._lock:
                for job_id in job_ids:
                    remaining = [fn for fn in self._by_job.get(job_id, []) if fn is not listener]
                    if remaining:
                        self._by_job[job_id] = remaining
                    else:
                        self._by_job.pop(job_id, None)

        return remove

    def take(self, job_id: str) -> list[Listener]:
        """The listeners of a job that just finished (each is called once)."""
        with self._lock:
            return self._by_job.pop(job_id, [])

    def waited_on(self) -> list[str]:
        with self._lock:
            return list(self._by_job)


class LogBook:
    """Live output of running jobs, in memory: the embedded grid's log store (Redis has streams)."""

    def __init__(self) -> None:
        # chunks, bytes, ended at
        self._logs: dict[str, tuple[list[LogChunk], int, float | None]] = {}
        self._cond = threading.Condition()

    def append(self, job_id: str, stream: str, data: bytes) -> None:
        with self._cond:
            chunks, size, ended = self._logs.get(job_id, ([], 0, None))
            if size + len(data) <= LOG_BYTES and ended is None:
                chunks.append((stream, data))
                self._logs[job_id] = (chunks, size + len(data), None)
            self._cond.notify_all()

    def end(self, job_id: str) -> None:
        with self._cond:
            chunks, size, _ = self._logs.get(job_id, ([], 0, None))
            self._logs[job_id] = (chunks, size, time.monotonic())
            now = time.monotonic()
            for old in [
                j for j, (_, _, at) in self._logs.items() if at is not None and now - at > LOG_TTL_S
            ]:
                del self._logs[old]
            self._cond.notify_all()

    def read(self, job_id: str, after: str, wait_s: float) -> tuple[list[LogChunk], str, bool]:
        """Chunks after cursor ``after`` ("" from the start), waiting up to ``wait_s`` for some;
        (chunks, cursor, ended)."""
        start = int(after) if after.isdigit() else 0
        deadline = time.monotonic() + wait_s
        with self._cond:
            while True:
                chunks, _, ended = self._logs.get(job_id, ([], 0, None))
                if len(chunks) > start or ended is not None or time.monotonic() >= deadline:
                    return chunks[start:], str(len(chunks)), ended is not None
                self._cond.wait(deadline - time.monotonic())


class ResultBus(ABC):
    """Publishes finished jobs. Listeners run on the publisher's thread and must not block."""

    # The Redis the bus runs on, where every worker of the grid shares grid-wide counts (the AI token budget);
    # None: the bus is in this process, and so are those counts.
    redis: redis.Redis | None = None

    @abstractmethod
    def publish(self, job: JobRecord) -> None: ...

    @abstractmethod
    def subscribe(self, job_ids: list[str], listener: Listener) -> Callable[[], None]:
        """Call ``listener`` with each of these jobs once it finishes; returns an unsubscribe function.

        Subscribe before checking the registry, so a result that lands in between is not missed.
        """

    @abstractmethod
    def request_cancel(self, job_id: str) -> None:
        """Ask whichever worker runs this job to stop it."""

    @abstractmethod
    def on_cancel(self, callback: Callable[[str], object]) -> None:
        """A worker's hook for cancel requests."""

    @abstractmethod
    def append_log(self, job_id: str, stream: str, data: bytes) -> None:
        """What a running job printed (a worker calls this as the sandbox sends it)."""

    @abstractmethod
    def end_log(self, job_id: str) -> None:
        """The job finished: readers stop waiting for more."""

    @abstractmethod
    def read_log(self, job_id: str, after: str, wait_s: float) -> tuple[list[LogChunk], str, bool]:
        """(chunks after the opaque cursor ``after``, the next cursor, whether the log has ended)."""

    @abstractmethod
    def heartbeat(self, worker_id: str, info: dict, ttl_s: float) -> None:
        """A worker is alive; ``info`` (slots, pool, counters) is shown by /system/status until ``ttl_s`` passes."""

    @abstractmethod
    def workers(self) -> list[dict]:
        """The live workers' latest heartbeats."""

    def token_buckets(self) -> TokenBuckets:
        """The API keys' rate-limit buckets, shared as widely as the bus is (every controller, on Redis)."""
        return LocalTokenBuckets()

    def close(self) -> None:
        """Stop listening and let go of connections (nothing to let go of in process)."""
        return None
