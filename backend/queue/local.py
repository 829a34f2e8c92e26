from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from backend.models import JobMessage
from backend.queue.base import JobQueue


class LocalQueue(JobQueue):
    """The embedded grid's queue: in memory, in the process that runs controller and worker.

    Fair between owners: each owner has its own FIFO, and owners are served in turn, so one owner's
    backlog of a thousand calls delays another owner's single call by at most one call per slot.
    ``limit(owner)`` caps how many of an owner's jobs may be out at once (taken and not yet acked):
    an owner at its cap is passed over, so it never holds every slot. Durability comes from the
    registry: pending jobs are stored there and put back on start.
    """

    def __init__(self, limit: Callable[[str], int | None] | None = None) -> None:
        self._limit = limit or (lambda owner: None)
        self._waiting: OrderedDict[str, deque[JobMessage]] = OrderedDict()  # owner -> its FIFO; next to serve first
        self._out: dict[str, int] = {}  # owner -> jobs taken and not yet acked
        self._out_owner: dict[str, str] = {}  # job id -> its owner, while it is out
        self._count = 0
        self._changed = threading.Condition()

    def put(self, messages: list[JobMessage]) -> None:
        with self._changed:
            for message in messages:
                if message.owner not in self._waiting:
                    self._waiting[message.owner] = deque()  # a new owner joins the end of the turn
                self._waiting[message.owner].append(message)
            self._count += len(messages)
            self._changed.notify_all()

    def get(self, timeout: float, want: int = 1) -> JobMessage | None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while (message := self._next()) is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)
            return message

    def _next(self) -> JobMessage | None:
        """The head of the first owner in turn who is under its cap; that owner goes to the end of the turn."""
        for owner in list(self._waiting):
            cap = self._limit(owner)
            if cap is not None and self._out.get(owner, 0) >= cap:
                continue
            fifo = self._waiting.pop(owner)
            message = fifo.popleft()
            if fifo:
                self._waiting[owner] = fifo  # re-inserted: last in turn
            self._count -= 1
            self._out[owner] = self._out.get(owner, 0) + 1
            self._out_owner[message.job_id] = owner
            return message
        return None

    def depth(self) -> int:
        return self._count

    def depth_of(self, owner: str) -> int | None:
        with self._changed:
            return len(self._waiting.get(owner, ()))

    def running_of(self, owner: str) -> int:
        """The owner's jobs taken by a worker and not yet acked."""
        with self._changed:
            return self._out.get(owner, 0)

    def ack(self, message: JobMessage) -> None:
        """The job is done: its owner's share of the slots is free again."""
        with self._changed:
            owner = self._out_owner.pop(message.job_id, None)
            if owner is None:
                return
            left = self._out[owner] - 1
            if left:
                self._out[owner] = left
            else:
                del self._out[owner]
            self._changed.notify_all()

    def extend(self, message: JobMessage, seconds: float) -> None:
        pass  # nothing else can take it
