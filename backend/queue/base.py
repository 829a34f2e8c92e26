from __future__ import annotations

from abc import ABC, abstractmethod

from backend.models import JobMessage


class JobQueue(ABC):
    """Carries jobs from the controller to workers, at least once."""

    @abstractmethod
    def put(self, messages: list[JobMessage]) -> None: ...

    @abstractmethod
    def get(self, timeout: float) -> JobMessage | None:
        """The next job, or None after ``timeout`` seconds without one."""

    @abstractmethod
    def depth(self) -> int:
        """Jobs waiting (approximate where the backend only estimates it)."""

    @abstractmethod
    def ack(self, message: JobMessage) -> None:
        """The job's result is stored: the queue may forget the message."""

    @abstractmethod
    def extend(self, message: JobMessage, seconds: float) -> None:
        """Still working on it: keep it hidden from other workers for ``seconds`` more."""
