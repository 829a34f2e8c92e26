"""Retention: output files and blobs are deleted once they are older than the grid's ``output_retention_s``."""

from __future__ import annotations

import logging
import threading
import time

from nanogrid_backend.store.base import BlobStore, Expired

log = logging.getLogger(__name__)


class Janitor:
    """A thread that deletes expired outputs every ``interval_s`` and logs the space it freed.

    ``totals`` keeps what every pass together deleted since the grid started.
    """

    def __init__(self, store: BlobStore, retention_s: float, interval_s: float) -> None:
        self.store = store
        self.retention_s = retention_s
        self.interval_s = interval_s
        self.totals = Expired()
        self.last: Expired | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="output-janitor", daemon=True)

    def start(self) -> None:
        if self.retention_s > 0:  # 0: keep outputs for ever
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def sweep(self) -> Expired:
        """One pass now: delete what is past retention; what was deleted."""
        expired = self.store.expire(time.time() - self.retention_s)
        self.last = expired
        self.totals.jobs += expired.jobs
        self.totals.blobs += expired.blobs
        self.totals.bytes += expired.bytes
        if expired.jobs or expired.blobs:
            log.info(
                "retention: deleted the outputs of %d jobs and %d blobs older than %g days, freeing %.1f MiB",
                expired.jobs,
                expired.blobs,
                self.retention_s / 86400,
                expired.bytes / (1 << 20),
            )
        return expired

    def _run(self) -> None:
        while True:
            try:
                self.sweep()
            # a failed pass is retried at the next interval; it never stops the grid
            except Exception:
                log.exception("retention: the pass failed")
            if self._stop.wait(self.interval_s):
                return
