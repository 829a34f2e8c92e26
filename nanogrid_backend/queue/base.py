"""The job queue's interface: what the controller puts and workers take, whichever backend carries it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from nanogrid_backend.models import JobMessage


class JobQueue(ABC):
    """Carries jobs from the controller to workers, at least once."""

    redelivers = False  # True: a message not acked comes back (and ends in a dead-letter queue)
    # True: an ack is a step in this process's memory (the embedded queue), not a request to a service (SQS)
    acks_in_memory = False

    @abstractmethod
    def put(self, messages: list[JobMessage]) -> None: ...

    @abstractmethod
    def get(self, timeout: float, want: int = 1) -> JobMessage | None:
        """The next job, or None after ``timeout`` seconds without one (``want``: how many the caller could take)."""

    def get_batch(
        self, timeout: float, most: Callable[[JobMessage, int], int] | None = None, *, want: int = 1
    ) -> list[JobMessage]:
        """The next job and, where the queue can hand out batches (the local queue), up to ``most(first, queued) - 1``
        more calls of its function right behind it; [] after ``timeout`` seconds without one. This default takes one
        message (``want``: how many the caller could take, as for ``get``)."""
        message = self.get(timeout, want)
        return [message] if message is not None else []

    def waiting_here(self) -> list[JobMessage]:
        """Messages fetched ahead and not yet handed out (their visibility must be kept up too)."""
        return []

    @abstractmethod
    def depth(self) -> int:
        """Jobs waiting (approximate where the backend only estimates it)."""

    def depth_of(self, owner: str) -> int | None:
        """Jobs of this owner waiting, where the backend can tell (None: it cannot, as on SQS)."""
        return None

    def discard(self, job_ids: set[str]) -> None:
        """Forget the waiting messages of these jobs, which will never run (cancelled), where the backend can.
        Elsewhere (SQS) they stay until a worker takes each, finds its job no longer pending and acks it."""
        return None

    def release(self, message: JobMessage) -> None:
        """Give the message back for another delivery now (queues that redeliver)."""
        raise NotImplementedError

    def dead_letters(self) -> list[JobMessage]:
        """Messages that were delivered too often without being acked (queues that redeliver)."""
        return []

    def ack_dead(self, message: JobMessage) -> None:
        """Forget a dead letter once its job is recorded as failed."""
        raise NotImplementedError

    @abstractmethod
    def ack(self, message: JobMessage) -> None:
        """The job's result is stored: the queue may forget the message."""

    @abstractmethod
    def extend(self, message: JobMessage, seconds: float) -> None:
        """Still working on it: keep it hidden from other workers for ``seconds`` more."""
