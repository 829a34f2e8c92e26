from __future__ import annotations

import queue

from backend.models import JobMessage
from backend.queue.base import JobQueue


class LocalQueue(JobQueue):
    """The embedded grid's queue: in memory, in the process that runs controller and worker.

    Durability comes from the registry: pending jobs are stored there and put back on start.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[JobMessage] = queue.SimpleQueue()

    def put(self, messages: list[JobMessage]) -> None:
        for message in messages:
            self._queue.put(message)

    def get(self, timeout: float, want: int = 1) -> JobMessage | None:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def depth(self) -> int:
        return self._queue.qsize()

    def ack(self, message: JobMessage) -> None:
        pass  # a message taken from memory is gone already

    def extend(self, message: JobMessage, seconds: float) -> None:
        pass  # nothing else can take it
