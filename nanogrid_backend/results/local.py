"""The in-process result bus: the embedded grid's controller and worker share one process."""

from __future__ import annotations

import time
from collections.abc import Callable

from nanogrid_backend.models import JobRecord
from nanogrid_backend.results.base import Listener, Listeners, LogBook, LogChunk, ResultBus


class LocalResultBus(ResultBus):
    """In-process delivery for the embedded grid, where controller and worker share a process."""

    def __init__(self) -> None:
        self._listeners = Listeners()
        self._cancel_hooks: list[Callable[[str], object]] = []
        self._heartbeats: dict[str, tuple[dict, float]] = {}
        self._logs = LogBook()

    def publish(self, job: JobRecord) -> None:
        for listener in self._listeners.take(job.job_id):
            listener(job)

    def subscribe(self, job_ids: list[str], listener: Listener) -> Callable[[], None]:
        return self._listeners.add(job_ids, listener)

    def request_cancel(self, job_id: str) -> None:
        for hook in self._cancel_hooks:
            hook(job_id)

    def on_cancel(self, callback: Callable[[str], object]) -> None:
        self._cancel_hooks.append(callback)

    def append_log(self, job_id: str, stream: str, data: bytes) -> None:
        self._logs.append(job_id, stream, data)

    def end_log(self, job_id: str) -> None:
        self._logs.end(job_id)

    def read_log(self, job_id: str, after: str, wait_s: float) -> tuple[list[LogChunk], str, bool]:
        return self._logs.read(job_id, after, wait_s)

    def heartbeat(self, worker_id: str, info: dict, ttl_s: float) -> None:
        self._heartbeats[worker_id] = (info, time.monotonic() + ttl_s)

    def workers(self) -> list[dict]:
        now = time.monotonic()
        return [info for info, expires in list(self._heartbeats.values()) if expires > now]
