from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class SandboxError(Exception):
    """A call could not finish inside its sandbox; ``kind`` says why (timeout, memory, crash, ...)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass
class CallResult:
    reply: dict[str, Any]  # the bootstrap's header: ok, error, stdout, stderr, duration_ms, ...
    body: bytes  # the pickled or JSON-encoded value (or the pickled exception)
    peak_memory_bytes: int | None
    output_dir: Path  # files the call wrote, to be collected before the next call
    baseline_memory_bytes: int | None = None  # the sandbox's own usage when the call began (the peak includes it)


class Sandbox(ABC):
    """One isolated bootstrap process. Starts unspecialised; ``load`` binds it to one function for life."""

    id: str
    function_id: str | None = None
    python: str = ""

    @abstractmethod
    def load(self, function_id: str, package: bytes, memory_mib: int) -> None: ...

    @abstractmethod
    def call(self, job_id: str, payload: bytes, timeout_s: float, model: str | None = None) -> CallResult:
        """Run one call; raises SandboxError when the sandbox failed (it is then dead)."""

    @abstractmethod
    def kill(self, reason: str) -> None:
        """Stop the sandbox now (from any thread); a call in progress fails with ``reason``."""

    @abstractmethod
    def close(self) -> None:
        """Stop and clean up; safe to call twice."""

    @property
    @abstractmethod
    def alive(self) -> bool: ...
