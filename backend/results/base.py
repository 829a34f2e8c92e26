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
