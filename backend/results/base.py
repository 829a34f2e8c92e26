from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from backend.models import JobRecord

Listener = Callable[[JobRecord], None]


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
