from __future__ import annotations

import threading
from collections.abc import Callable

from backend.models import JobRecord
from backend.results.base import Listener, ResultBus


class LocalResultBus(ResultBus):
    """In-process delivery for the embedded grid, where controller and worker share a process."""

    def __init__(self) -> None:
        self._listeners: dict[str, list[Listener]] = {}
        self._lock = threading.Lock()

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
