from __future__ import annotations

import threading
import time
from collections.abc import Callable

from backend.models import JobRecord
from backend.results.base import Listener, ResultBus


class LocalResultBus(ResultBus):
    """In-process delivery for the embedded grid, where controller and worker share a process."""

    def __init__(self) -> None:
        self._listeners: dict[str, list[Listener]] = {}
        self._lock = threading.Lock()
        self._cancel_hooks: list[Callable[[str], object]] = []
        self._heartbeats: dict[str, tuple[dict, float]] = {}

    def publish(self, job: JobRecord) -> None:
        with self._lock:
            listeners = self._listeners.pop(job.job_id, [])
        for listener in listeners:
            listener(job)

    def subscribe(self, job_ids: list[str], listener: Listener) -> Callable[[], None]:
        with self._lock:
            for job_id in job_ids:
                self._listeners.setdefault(job_id, []).append(listener)

        def unsubscribe() -> None:
            with self._lock:
                for job_id in job_ids:
                    remaining = [fn for fn in self._listeners.get(job_id, []) if fn is not listener]
                    if remaining:
                        self._listeners[job_id] = remaining
                    else:
                        self._listeners.pop(job_id, None)

        return unsubscribe

    def request_cancel(self, job_id: str) -> None:
        for hook in self._cancel_hooks:
            hook(job_id)

    def on_cancel(self, callback: Callable[[str], object]) -> None:
        self._cancel_hooks.append(callback)

    def heartbeat(self, worker_id: str, info: dict, ttl_s: float) -> None:
        self._heartbeats[worker_id] = (info, time.monotonic() + ttl_s)

    def workers(self) -> list[dict]:
        now = time.monotonic()
        return [info for info, expires in list(self._heartbeats.values()) if expires > now]
