"""Retries on the worker: ``@remote(retries=N)`` tries a failed call again, with backoff, and keeps every try.

What is tried again: a sandbox that crashed, a delivery whose worker was lost (the queue's redelivery counts as a
try), and exceptions whose type the user named (``retry_on``); never a timeout, an out-of-memory, a cancel or a
shutdown, which would only fail the same way. The policy travels in the function's manifest (part of its
content hash), so only a failing call pays for reading it. Each failed try is kept as its own record
(``<job id>-try<N>``, ``retry_of`` the job) in the history and the metrics windows; the job itself ends with the
last try's outcome, recorded once (at-least-once execution, one result).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nanogrid_backend.models import FAILED, RUNNING, JobMessage, JobRecord
from nanogrid_backend.registry.base import Registry
from nanogrid_backend.sandbox.base import SandboxError
from nanogrid_backend.store.base import BlobStore

log = logging.getLogger(__name__)

# the sandbox died under the call: maybe the machine's fault, worth another try
CRASHES = frozenset({"crash"})
MAX_RETRIES = 10
MAX_BACKOFF_S = 60.0
POLICIES_KEPT = 256


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 0
    # exception types as "module.QualName" or a bare class name
    retry_on: frozenset[str] = frozenset()
    backoff_s: float = 1.0  # before the second try; doubled for each one after, up to max_backoff_s
    max_backoff_s: float = 30.0

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> RetryPolicy:
        """The manifest's ``retries`` object, checked strictly (it is user input): anything malformed means none."""
        spec = manifest.get("retries")
        if not isinstance(spec, dict):
            return cls()
        retries, names = spec.get("retries", 0), spec.get("retry_on", [])
        backoff, cap = spec.get("backoff_s", 1.0), spec.get("max_backoff_s", 30.0)
        numbers_ok = all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in (backoff, cap)
        )
        if (
            not isinstance(retries, int)
            or isinstance(retries, bool)
            or not isinstance(names, list)
            or not numbers_ok
            or not all(isinstance(n, str) for n in names)
        ):
            log.warning("ignoring a malformed retry policy: %r", spec)
            return cls()
        return cls(
            max(0, min(retries, MAX_RETRIES)),
            frozenset(names[:200]),
            max(0.0, min(backoff, MAX_BACKOFF_S)),
            max(0.0, min(cap, MAX_BACKOFF_S)),
        )

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed try number ``attempt``."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))

    def covers(self, error: dict[str, Any]) -> bool:
        kind = error.get("kind")
        if kind in CRASHES:
            return True
        if kind != "exception":
            return False
        name, module = str(error.get("type", "")), str(error.get("module", ""))
        return name in self.retry_on or f"{module}.{name}" in self.retry_on


class Retrier:
    """Runs a call's tries in the worker's slot: the queue message stays in flight (its visibility extended), so a
    worker lost during the backoff leaves the job to another delivery, which counts as the next try."""

    def __init__(self, registry: Registry, store: BlobStore, stopping: threading.Event) -> None:
        self.registry = registry
        self.store = store
        self.stopping = stopping
        self._policies: dict[str, RetryPolicy] = {}

    def run(
        self, execute: Callable[[JobMessage, JobRecord], None], message: JobMessage, job: JobRecord
    ) -> None:
        job.attempt = max(job.attempt, message.receive_count)
        while True:
            raised: SandboxError | None = None
            try:
                execute(message, job)
                failure = job.error if job.status == FAILED else None
            except SandboxError as exc:
                raised, failure = exc, {"kind": exc.kind, "message": exc.message}
            if failure is None:
                return
            policy = self.policy(message.function_id)
            if job.attempt > policy.retries or not policy.covers(failure) or self.stopping.is_set():
                if raised is not None:
                    raise raised
                return
            delay = policy.delay(job.attempt)
            self._keep_try(job, failure, delay)
            if self.stopping.wait(delay):
                raise SandboxError(
                    "interrupted",
                    "the worker shut down between two tries of this job; run it again",
                )
            job.attempt += 1
            job.status, job.started_at, job.error, job.result, job.result_format = (
                RUNNING,
                time.time(),
                None,
                None,
                None,
            )
            job.stdout = job.stderr = ""
            job.output_files = []

    def policy(self, function_id: str) -> RetryPolicy:
        policy = self._policies.get(function_id)
        if policy is None:
            try:
                with zipfile.ZipFile(io.BytesIO(self.store.get_package(function_id))) as zf:
                    policy = RetryPolicy.from_manifest(json.loads(zf.read("manifest.json")))
            except (OSError, KeyError, ValueError, zipfile.BadZipFile):
                return RetryPolicy()  # deleted or unreadable: the failure stands
            if len(self._policies) >= POLICIES_KEPT:
                self._policies.clear()
            self._policies[function_id] = policy
        return policy

    def _keep_try(self, job: JobRecord, failure: dict[str, Any], delay: float) -> None:
        """The failed try as its own finished record; the job says it is being tried again."""
        now = time.time()
        kept = dataclasses.replace(
            job,
            job_id=f"{job.job_id}-try{job.attempt}",
            status=FAILED,
            error=failure,
            created_at=job.started_at or now,
            finished_at=now,
            retry_of=job.job_id,
            payload=b"",
            result=None,
            result_format=None,
            output_files=[],
        )
        try:
            self.registry.record_attempt(kept)
            self.registry.note_attempt(
                job.job_id,
                {
                    "kind": "retrying",
                    "message": (
                        f"try {job.attempt} failed ({failure.get('kind')}: {str(failure.get('message', ''))[:200]}); "
                        f"trying again in {delay:g} s"
                    ),
                },
            )
        except Exception as exc:  # the history is worth less than the call: try again anyway
            log.warning("job %s: could not record try %d: %s", job.job_id, job.attempt, exc)
