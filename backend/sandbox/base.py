from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend.sandbox.cgroup import MemoryCgroup


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
    cgroup: MemoryCgroup | None = None  # where the per-call peak is read; None: the bootstrap reports VmHWM
    output_dir: Path

    @abstractmethod
    def load(self, function_id: str, package: bytes, memory_mib: int) -> None: ...

    def call(self, job_id: str, payload: bytes, timeout_s: float, model: str | None = None) -> CallResult:
        """Run one call; raises SandboxError when the sandbox failed (it is then dead)."""
        baseline = None
        if self.cgroup:
            self.cgroup.reset_peak()
            baseline = self.cgroup.usage()
        header = {"op": "call", "job_id": job_id, "timeout": timeout_s, "measure_rss": self.cgroup is None,
                  "model": model}
        reply, body = self._roundtrip(header, payload, timeout_s)
        peak = self.cgroup.peak() if self.cgroup else reply.get("peak_rss_bytes")
        if reply.get("output_files"):
            self._collect_outputs()
        if not reply["ok"] and reply["error"].get("kind") == "memory":
            self.close()  # a MemoryError may have left the interpreter in a bad state
        return CallResult(reply, body, peak, self.output_dir, baseline)

    @abstractmethod
    def _roundtrip(self, header: dict[str, Any], body: bytes, timeout_s: float) -> tuple[dict[str, Any], bytes]:
        """Send one frame and read the bootstrap's answer within ``timeout_s``."""

    @abstractmethod
    def _collect_outputs(self) -> None:
        """Bring the call's output files into ``output_dir`` (already there when it is on this machine)."""

    @abstractmethod
    def kill(self, reason: str) -> None:
        """Stop the sandbox now (from any thread); a call in progress fails with ``reason``."""

    @abstractmethod
    def close(self) -> None:
        """Stop and clean up; safe to call twice."""

    @property
    @abstractmethod
    def alive(self) -> bool: ...
