from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable

from backend.models import JobRecord

Listener = Callable[[JobRecord], None]


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


class ResultBus(ABC):
    """Publishes finished jobs. Listeners run on the publisher's thread and must not block."""

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
    def heartbeat(self, worker_id: str, info: dict, ttl_s: float) -> None:
        """A worker is alive; ``info`` (slots, pool, counters) is shown by /system/status until ``ttl_s`` passes."""

    @abstractmethod
    def workers(self) -> list[dict]:
        """The live workers' latest heartbeats."""
