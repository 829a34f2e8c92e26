"""The worker agent: pulls jobs, runs each in a warm sandbox of its function, reports the result."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nanogrid_backend.builds.builder import EnvironmentBuildError
from nanogrid_backend.models import CANCELLED, COMPLETED, FAILED, RUNNING, JobMessage, JobRecord
from nanogrid_backend.notify import Notifier
from nanogrid_backend.package_checks import function_id_for, owned_function_id
from nanogrid_backend.queue.base import JobQueue
from nanogrid_backend.registry.base import Registry
from nanogrid_backend.results.base import ResultBus
from nanogrid_backend.sandbox.base import CallBlobs, CallResult, Sandbox, SandboxError
from nanogrid_backend.secretbox import SecretBox, SecretError
from nanogrid_backend.store.base import BlobStore
from nanogrid_backend.store.blobs import (
    BLOB_FORMAT,
    RESULT_FORMAT,
    BlobError,
    Blobs,
    key_for,
    result_reference,
    split_payload,
    spool_dir_for,
)
from nanogrid_backend.volumes import VolumeError, VolumeStore
from nanogrid_backend.worker.ai_gateway import CHANNEL, AIGateway
from nanogrid_backend.worker.pool import FunctionCode, WarmPool
from nanogrid_backend.worker.retries import Retrier

log = logging.getLogger(__name__)

# Batches: a slot takes up to BATCH_MAX queued calls of one function at once when its calls are short (their recent
# duration times the batch stays under BATCH_BUDGET_MS), runs them in one frame exchange with one sandbox and
# records their outcomes in one registry transaction. Longer calls, and calls of a function not yet
# timed, go one by one.
BATCH_MAX = 32
BATCH_BUDGET_MS = 20.0
TIMINGS_KEPT = 1024


def _manifest(package: bytes) -> dict[str, Any]:
    """The package's manifest, read once per cold start; {} for a package that has none (its load says why)."""
    try:
        with zipfile.ZipFile(io.BytesIO(package)) as zf:
            manifest = json.loads(zf.read("manifest.json"))
    except (KeyError, ValueError, zipfile.BadZipFile):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _disk_mib(manifest: dict[str, Any]) -> int | None:
    """The scratch disk the function asked for (manifest ``disk``, MiB, checked at upload), else None."""
    disk = manifest.get("disk")
    return disk if isinstance(disk, int) and not isinstance(disk, bool) and disk > 0 else None


class Worker:
    """``slots`` threads, each running one call at a time in a sandbox from the shared warm pool."""

    def __init__(
        self,
        *,
        queue: JobQueue,
        registry: Registry,
        store: BlobStore,
        bus: ResultBus,
        pool: WarmPool,
        slots: int,
        max_output_bytes: int,
        visibility_s: float = 30.0,
        heartbeat_s: float = 5.0,
        publish_backlog: Callable[[float], None] | None = None,
        ai: AIGateway | None = None,
        secrets: SecretBox | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.queue = queue
        self.registry = registry
        self.store = store
        self.bus = bus
        self.pool = pool
        self.slots = slots
        self.max_output_bytes = max_output_bytes
        self.visibility_s = visibility_s
        self.heartbeat_s = heartbeat_s
        self.publish_backlog = publish_backlog
        self.ai = ai  # the AI node, reached through this worker by functions with ai=True
        self.secrets = secrets  # opens the secrets a function names, as its sandbox is loaded
        self.volumes: VolumeStore | None = (
            None  # the owner's volumes a function mounts (set by the grid)
        )
        # job id -> its queue message, kept hidden while it runs
        self._in_flight: dict[str, JobMessage] = {}
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._running: dict[str, Sandbox] = {}  # job id -> the sandbox running it, for cancel
        # job id -> the sandbox whose running batch it waits in, for cancel
        self._batched: dict[str, Sandbox] = {}
        self._cancelled: set[str] = set()
        # Live output of running jobs: kept so a call that times out or crashes still shows what it printed.
        self._printed: dict[str, dict[str, bytearray]] = {}
        self._stopping = threading.Event()
        # @remote(retries=N): every try recorded
        self.retrier = Retrier(registry, store, self._stopping)
        # per-owner webhooks, sent from their own thread
        self.notifier = notifier or Notifier(registry)
        self._draining = threading.Event()
        self._threads: list[threading.Thread] = []
        self.stats = {
            "completed": 0,
            "failed": 0,
            "cold_starts": 0,
            "blob_bytes_sent": 0,
            "blobs_kept": 0,
        }
        # function id -> its recent calls' duration (ms): sizes batches
        self._call_ms: dict[str, float] = {}
        # functions whose calls are never batched (they may use the AI node)
        self._one_by_one: set[str] = set()
        self.stats.update(batches=0, batched_calls=0)  # batches run, and the calls they ran
        # Blobs of arguments and large results; a remote store's are fetched into a spool here.
        self._blobs = Blobs(
            store, spool_dir_for(store, Path(tempfile.gettempdir()) / "nanogrid-blob-spool")
        )

    def start(self) -> None:
        self.bus.on_cancel(self.cancel)
        self.notifier.start()
        self._beat()
        threading.Thread(target=self._keepalive, name="worker-keepalive", daemon=True).start()
        for n in range(self.slots):
            thread = threading.Thread(target=self._slot, name=f"worker-slot-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def drain(self, timeout_s: float) -> None:
        """Take no new jobs and give running ones up to ``timeout_s`` to finish."""
        self._draining.set()
        deadline = time.monotonic() + timeout_s
        while self._in_flight and time.monotonic() < deadline:
            time.sleep(0.1)

    def stop(self) -> None:
        self._stopping.set()
        # fetched ahead but never started: let others have them
        for message in self.queue.waiting_here():
            try:
                self.queue.release(message)
            except Exception as exc:
                log.warning("job %s: could not hand back its message: %s", message.job_id, exc)
        for sandbox in list(self._running.values()):
            sandbox.kill("the worker shut down while this job ran")
        for thread in self._threads:
            thread.join(timeout=5)
        self.pool.close()
        self.notifier.stop()

    def info(self) -> dict:
        """What /system/status and /metrics show about this worker."""
        return {
            "worker_id": self.worker_id,
            "slots": self.slots,
            "running": len(self._running),
            "pool": self.pool.snapshot(),
            **self.stats,
        }

    def _beat(self) -> None:
        try:
            self.bus.heartbeat(self.worker_id, self.info(), ttl_s=self.heartbeat_s * 3)
        except Exception as exc:  # a bus outage must not stop the jobs
            log.warning("heartbeat failed: %s", exc)

    def _keepalive(self) -> None:
        """Heartbeats, and more visibility time for the messages of jobs still running."""
        interval = min(self.heartbeat_s, self.visibility_s / 3)
        while not self._stopping.wait(interval):
            self._beat()
            self._report_dead_letters()
            self._publish_backlog()
            for message in list(self._in_flight.values()) + self.queue.waiting_here():
                try:
                    self.queue.extend(message, self.visibility_s)
                except Exception as exc:
                    log.warning("job %s: could not extend its visibility: %s", message.job_id, exc)

    def _publish_backlog(self) -> None:
        """The autoscaling signal the seeds use: visible messages per live worker."""
        if self.publish_backlog is None:
            return
        try:
            self.publish_backlog(self.queue.depth() / max(1, len(self.bus.workers())))
        except Exception as exc:
            log.warning("could not publish the backlog metric: %s", exc)

    def _report_dead_letters(self) -> None:
        """Jobs whose every delivery failed: record them failed, with the last reason, and publish."""
        try:
            for message in self.queue.dead_letters():
                job = self.registry.get_job(message.job_id)
                if job is not None and not job.finished:
                    attempt = job.error or {}
                    last = attempt.get("message", "every worker that took it died or stalled")
                    count = attempt.get("deliveries", "repeated")
                    job.status, job.finished_at = FAILED, time.time()
                    job.error = {
                        "kind": "dead_letter",
                        "message": f"moved to the dead-letter queue after {count} failed deliveries: {last}",
                    }
                    if self.registry.finish_job(job):
                        self.bus.publish(job)
                self.queue.ack_dead(message)
        except Exception as exc:
            log.warning("could not report dead letters: %s", exc)

    def cancel(self, job_id: str) -> bool:
        """Stop a running job's sandbox; True if this worker was running it."""
        if job_id not in self._in_flight:
            return False
        # checked again once its sandbox is ready, if it is still starting
        self._cancelled.add(job_id)
        batch = self._batched.get(job_id)
        if batch is not None and batch.skip(job_id):
            # It waits in a batch: the bootstrap answers it as cancelled instead of starting it, or, if it had
            # started after all (the bootstrap runs ahead of the replies read here), it ends with its own outcome.
            return True
        sandbox = self._running.get(job_id)
        if sandbox is not None:
            sandbox.kill("cancelled by the user")
        return True

    def _slot(self) -> None:
        while not self._stopping.is_set() and not self._draining.is_set():
            # batches of short calls where the queue hands them out (the embedded one), else one call
            taken = self.queue.get_batch(
                0.5, self._batch_size, want=self.slots - len(self._in_flight)
            )
            if not taken:
                continue
            try:
                if len(taken) == 1:
                    self.run(taken[0])
                else:
                    self.run_batch(taken)
            except Exception:
                log.exception("job %s: unexpected worker error", taken[0].job_id)

    def _batch_size(self, first: JobMessage, queued: int) -> int:
        """How many calls of ``first``'s function to take at once (called under the queue's lock: no I/O): one for a
        function not yet timed or with long calls, else what fits BATCH_BUDGET_MS, and never more than this slot's
        share of the owner's queued calls, so the other slots get theirs."""
        ms = self._call_ms.get(first.function_id)
        if (
            ms is None
            or first.payload_format == BLOB_FORMAT
            or first.receive_count > 1
            or first.function_id in self._one_by_one
        ):
            return 1
        share = -(-queued // self.slots)
        return max(1, min(BATCH_MAX, int(BATCH_BUDGET_MS / max(ms, 0.05)), share + 1))

    def _timed(self, job: JobRecord) -> None:
        """Keep the function's recent call duration (a moving average of completed calls), which sizes its batches."""
        if job.status != COMPLETED or job.execution_time_ms is None:
            return
        if len(self._call_ms) >= TIMINGS_KEPT and job.function_id not in self._call_ms:
            self._call_ms.clear()
            self._one_by_one.clear()
        before = self._call_ms.get(job.function_id)
        ms = job.execution_time_ms
        self._call_ms[job.function_id] = ms if before is None else 0.8 * before + 0.2 * ms

    def run(self, message: JobMessage) -> None:
        started = time.time()
        # In flight before it shows as running: a cancel that sees it running always finds this worker's record.
        self._in_flight[message.job_id] = message
        if not self.registry.mark_running(
            message.job_id, self.worker_id, started, retry=message.receive_count > 1
        ):
            self._not_taken(message)
            return
        job = self._running_record(message, started)
        if not self._settle(message, job, self._execute):
            return
        job.finished_at = time.time()
        self.stats["completed" if job.status == COMPLETED else "failed"] += 1
        self._timed(job)
        recorded = announced = False
        try:
            recorded = self._finish(job)
            if recorded and not self.queue.acks_in_memory:
                # the ack is a request to a service (an SQS delete): the caller's answer does not wait for it
                self.bus.publish(job)
                announced = True
            self.notifier.job_finished(job)
        finally:
            try:
                self._done(message, job)
            finally:
                # Else announced last: the waiting request's thread needs the interpreter, which this one keeps
                # until it waits for its next call (an A/B: p50 1.04x with the announcement before the ack).
                if recorded and not announced:
                    self.bus.publish(job)

    def _running_record(self, message: JobMessage, started: float | None) -> JobRecord:
        """The running job's record, as this worker publishes and finishes it."""
        job = JobRecord(
            message.job_id,
            message.function_id,
            status=RUNNING,
            payload_format=message.payload_format,
            worker_id=self.worker_id,
            started_at=started,
            memory_limit_mib=message.memory_mib,
            owner=message.owner,
            trigger=message.trigger,
        )
        # else the record's is now: a queue from before it was carried
        if message.created_at is not None:
            job.created_at = message.created_at
        return job

    def _settle(
        self, message: JobMessage, job: JobRecord, execute: Callable[[JobMessage, JobRecord], None]
    ) -> bool:
        """Run the job's tries (``execute`` for each) until it has its final state; False if its message went back
        to the queue for another delivery instead."""
        try:
            self.retrier.run(execute, message, job)
        except SandboxError as exc:
            if exc.kind == "crash" and self.queue.redelivers:
                # Maybe this machine's fault: let another delivery try; the redrive policy ends it in the DLQ.
                self.registry.note_attempt(
                    job.job_id,
                    {"kind": "crash", "message": exc.message, "deliveries": message.receive_count},
                )
                self.queue.release(message)
                return False
            self._fail(job, exc.kind, exc.message)
        except Exception as exc:  # never leave a job running forever because of a bug of ours
            if isinstance(exc, OSError) and exc.errno in (
                errno.ENOSPC,
                errno.EDQUOT,
            ):  # a result's spool, say
                self._fail(
                    job,
                    "storage",
                    f"the worker's disk is full ({exc.strerror}); nothing of this call was kept",
                )
            else:
                log.exception("job %s: worker error", message.job_id)
                self._fail(
                    job,
                    "internal",
                    f"the worker failed while running this job: {type(exc).__name__}: {exc}",
                )
        finally:
            self._in_flight.pop(message.job_id, None)
            self._cancelled.discard(message.job_id)
        return True

    def _done(self, message: JobMessage, job: JobRecord) -> None:
        # only now: a worker that dies before this leaves the job to another
        self.queue.ack(message)
        if self._printed.pop(job.job_id, None) is not None:
            # followers stop waiting; the job's record has the whole capture
            self.bus.end_log(job.job_id)

    def _not_taken(self, message: JobMessage) -> None:
        """A call whose mark as running failed: cancelled while queued, or already finished; nothing left to do."""
        self._in_flight.pop(message.job_id, None)
        self._cancelled.discard(message.job_id)
        self.queue.ack(message)

    def run_batch(self, messages: list[JobMessage]) -> None:
        """Several queued calls of one function: marked running in one transaction, run in one frame exchange with
        one sandbox (``Sandbox.call_many``), their outcomes recorded in one transaction, then acked. A call the
        batch could not run (after a failed one, or one with output files) runs on its own; a failed call is tried
        again by its retry policy like any other; calls with blobs or another model than the first go one by one."""
        first = messages[0]
        alike = [m for m in messages if m.payload_format != BLOB_FORMAT and m.model == first.model]
        for message in alike:  # in flight before they show as running (see ``run``)
            self._in_flight[message.job_id] = message
        marked = self.registry.mark_running_many(
            [m.job_id for m in alike], self.worker_id, time.time()
        )
        for message in alike:
            if message.job_id not in marked:
                self._not_taken(message)
        batch = [m for m in alike if m.job_id in marked]
        jobs = [self._running_record(m, None) for m in batch]
        outcomes: dict[str, SandboxError | None] = {}
        if batch:
            try:
                outcomes = self._execute_batch(batch, jobs)
            # no sandbox for them (a load that failed): each job is tried on its own
            except SandboxError as exc:
                log.warning(
                    "job %s: a batch of %d calls could not start (%s); running them one by one",
                    first.job_id,
                    len(batch),
                    exc.message,
                )
            except Exception:
                log.exception(
                    "job %s: a batch of %d calls failed; running them one by one",
                    first.job_id,
                    len(batch),
                )
        # Calls that completed are recorded and announced first; then the calls the batch never ran run, one by one;
        # those that failed come last, as they may wait out a retry backoff. Each group is recorded together.
        done = [
            (m, job)
            for m, job in zip(batch, jobs, strict=True)
            if m.job_id in outcomes and outcomes[m.job_id] is None and job.status == COMPLETED
        ]
        completed = {m.job_id for m, _ in done}
        never_ran = [
            (m, job) for m, job in zip(batch, jobs, strict=True) if m.job_id not in outcomes
        ]
        failed = [
            (m, job)
            for m, job in zip(batch, jobs, strict=True)
            if m.job_id in outcomes and m.job_id not in completed
        ]
        for group in (done, never_ran, failed):
            settled = []
            for message, job in group:
                if self._settle(
                    message,
                    job,
                    self._replay(message.job_id in outcomes, outcomes.get(message.job_id)),
                ):
                    settled.append((message, job))
            if settled:
                self._finish_batch(settled)
        batched = {m.job_id for m in alike}
        for message in messages:
            if message.job_id not in batched:
                self.run(message)

    def _replay(
        self, ran: bool, error: SandboxError | None
    ) -> Callable[[JobMessage, JobRecord], None]:
        """An ``execute`` for the retrier whose first try is the batch's (its outcome already on the job, or
        ``error``); any further try, or a call the batch never ran, runs on its own."""
        replays = [error] if ran else []

        def execute(message: JobMessage, job: JobRecord) -> None:
            if not replays:
                job.started_at, job.finished_at = time.time(), None
                self._execute(message, job)
                return
            failed = replays.pop()
            if failed is not None:
                raise failed

        return execute

    def _execute_batch(
        self, messages: list[JobMessage], jobs: list[JobRecord]
    ) -> dict[str, SandboxError | None]:
        """Run the calls in one sandbox; per job id of each call that ran, None (its outcome is recorded on its job)
        or the error it ended with. Calls missing from the answer never ran."""
        first = messages[0]
        sandbox, cold = self.pool.acquire(first.function_id, lambda: self._code(first))
        self.stats["cold_starts"] += cold
        outcomes: dict[str, SandboxError | None] = {}
        # its calls may talk to the AI node, each with its own session: one by one
        if sandbox.ai_allowed:
            self._one_by_one.add(first.function_id)
            self.pool.release(sandbox)
            return outcomes
        for job in jobs:
            # cancelled while the batch was being prepared: it never runs
            if job.job_id in self._cancelled:
                outcomes[job.job_id] = SandboxError("cancelled", "cancelled by the user")
        messages = [m for m in messages if m.job_id not in outcomes]
        jobs = [job for job in jobs if job.job_id not in outcomes]
        if not messages:
            self.pool.release(sandbox)
            return outcomes
        first = messages[0]
        times = [time.time()]
        reusable = False

        def answered(n: int) -> None:  # call n (from 0) runs now: a cancel of it stops the sandbox
            times.append(time.time())
            self._running.pop(messages[n - 1].job_id, None)
            if n < len(messages):
                # no longer waiting: a cancel now stops the sandbox
                self._batched.pop(messages[n].job_id, None)
                self._running[messages[n].job_id] = sandbox

        self._running[first.job_id] = sandbox
        # waiting in the batch: a cancel asks the bootstrap to skip it (Sandbox.skip)
        for message in messages[1:]:
            self._batched[message.job_id] = sandbox
        try:
            with self._volumes_around(sandbox):
                results, error = sandbox.call_many(
                    [(m.job_id, m.payload, m.timeout_s) for m in messages], first.model, answered
                )
            self.stats["batches"] += 1
            self.stats["batched_calls"] += len(results)
            for n, (job, outcome) in enumerate(zip(jobs, results, strict=False)):
                job.cold, job.sandbox_id = cold and n == 0, sandbox.id
                job.started_at, job.finished_at = times[n], times[n + 1]
                # skipped: it never started
                if outcome.reply.get("error", {}).get("kind") == "cancelled":
                    outcomes[job.job_id] = SandboxError("cancelled", "cancelled by the user")
                    continue
                try:
                    # before the sandbox serves again: its output files are moved
                    self._record(job, outcome)
                    outcomes[job.job_id] = None
                except SandboxError as exc:
                    outcomes[job.job_id] = exc
                finally:
                    if outcome.result_file is not None:
                        outcome.result_file.unlink(missing_ok=True)
            if error is not None and error.kind != "unstarted" and len(results) < len(messages):
                job = jobs[len(results)]
                job.cold, job.sandbox_id, job.started_at = (
                    cold and not results,
                    sandbox.id,
                    times[-1],
                )
                if job.job_id in self._cancelled:
                    error = SandboxError("cancelled", "cancelled by the user")
                elif self._stopping.is_set():
                    error = SandboxError(
                        "interrupted", "the worker shut down while this job ran; run it again"
                    )
                outcomes[job.job_id] = error
            reusable = error is None
        finally:
            for message in messages:
                self._running.pop(message.job_id, None)
                self._batched.pop(message.job_id, None)
            if reusable:
                self.pool.release(sandbox)  # drops it if it died meanwhile
            else:
                self.pool.discard(sandbox)
        return outcomes

    def _finish_batch(self, settled: list[tuple[JobMessage, JobRecord]]) -> None:
        """Record the batch's outcomes in one transaction and announce them; then ack each (group commit)."""
        now = time.time()
        for _, job in settled:
            job.finished_at = job.finished_at or now
            self.stats["completed" if job.status == COMPLETED else "failed"] += 1
            self._timed(job)
        try:
            try:
                recorded = self.registry.finish_jobs([job for _, job in settled])
            except Exception:
                log.exception(
                    "could not record a batch of %d outcomes at once; recording each", len(settled)
                )
                recorded = [self._finish(job) for _, job in settled]
            for (_, job), fresh in zip(settled, recorded, strict=True):
                if fresh:
                    self.bus.publish(job)
            for _, job in settled:
                self.notifier.job_finished(job)
        finally:
            for message, job in settled:
                self._done(message, job)

    def _finish(self, job: JobRecord) -> bool:
        """Record the outcome; if the registry cannot take it (a full disk), record the failure. Whether the
        outcome (or the failure) was recorded now, to be announced (False: the job had its final state already)."""
        try:
            return self.registry.finish_job(job)
        except Exception as exc:
            log.exception("job %s: could not record its outcome", job.job_id)
            reason = f"{type(exc).__name__}: {str(exc)[:200]}"
        # A slimmer record (no result, output or captured text) may still fit where the full one did not.
        job.status, job.result, job.result_format, job.output_files = FAILED, None, None, []
        job.stdout = job.stderr = ""
        job.error = {
            "kind": "storage",
            "message": f"the grid could not record this job's outcome ({reason}); run it again",
        }
        for pause in (
            0.0,
            0.2,
            1.0,
        ):  # idle sandboxes may hold the space (a call's files): they go first
            time.sleep(pause)
            if self.pool is not None:
                self.pool.stop_idle(lambda sandbox: True)
            try:
                return self.registry.finish_job(job)
            except Exception:
                log.warning("job %s: could not record its failure yet (%s)", job.job_id, reason)
        log.error(
            "job %s: could not record its failure either; the watchdog will finish it", job.job_id
        )
        return False

    def _execute(self, message: JobMessage, job: JobRecord) -> None:
        """Run the call; a sandbox that died before the call reached it is replaced once (the function never ran)."""
        try:
            self._execute_in_sandbox(message, job)
        except SandboxError as exc:
            if exc.kind != "unstarted":
                raise
            log.warning("job %s: %s; trying once more on a fresh sandbox", job.job_id, exc.message)
            try:
                self._execute_in_sandbox(message, job)
            except SandboxError as again:
                if again.kind != "unstarted":
                    raise
                raise SandboxError(
                    "unstarted",
                    "two sandboxes in a row died before the call reached them; the "
                    "function did not run (is the host out of memory, or the sandbox "
                    "engine restarting?)",
                ) from None

    def _execute_in_sandbox(self, message: JobMessage, job: JobRecord) -> None:
        sandbox, cold = self.pool.acquire(message.function_id, lambda: self._code(message))
        job.cold, job.sandbox_id = cold, sandbox.id
        self.stats["cold_starts"] += cold
        self._running[job.job_id] = sandbox
        reusable = False  # the sandbox goes back to the pool only after a call that ended cleanly
        try:
            if job.job_id in self._cancelled:  # cancelled while its sandbox was being prepared
                raise SandboxError("cancelled", "cancelled by the user")
            ai = (
                self.ai.session(message.owner)
                if self.ai is not None and sandbox.ai_allowed
                else None
            )
            refs: list[str] = []
            payload = message.payload
            # arguments stored as blobs: streamed to the sandbox
            if message.payload_format == BLOB_FORMAT:
                refs, payload = split_payload(payload)
            try:
                with self._call_blobs(message.owner, refs) as blobs, self._volumes_around(sandbox):
                    outcome = sandbox.call(
                        job.job_id,
                        payload,
                        message.timeout_s,
                        message.model,
                        ai=ai,
                        on_output=self._live_output(job.job_id),
                        blobs=blobs,
                    )
                self.stats["blob_bytes_sent"] += outcome.blob_bytes_sent
                # not sent again: the sandbox still had them
                self.stats["blobs_kept"] += outcome.blobs_kept
            except BlobError as exc:
                reusable = True  # the function did not run; a sandbox the call had reached was closed (dropped)
                raise SandboxError("blob", exc.message) from None
            except SandboxError:
                if job.job_id in self._cancelled:
                    raise SandboxError("cancelled", "cancelled by the user") from None
                if self._stopping.is_set():
                    raise SandboxError(
                        "interrupted", "the worker shut down while this job ran; run it again"
                    ) from None
                raise
            try:
                self._record(job, outcome)
            finally:
                if outcome.result_file is not None:
                    # kept as a blob by now, or not at all
                    outcome.result_file.unlink(missing_ok=True)
            reusable = True
        finally:
            self._running.pop(job.job_id, None)
            self._cancelled.discard(job.job_id)
            if reusable:
                self.pool.release(sandbox)  # drops it if it died meanwhile
            else:
                self.pool.discard(sandbox)  # whatever was raised: never a leaked pool place

    @contextmanager
    def _volumes_around(self, sandbox: Sandbox) -> Iterator[None]:
        """The sandbox's volumes made current before its call(s) and, whatever the call did, what it changed kept
        after it, before its outcome is recorded (a no-op where every sandbox shares one filesystem)."""
        if sandbox.volumes is None:
            yield
            return
        try:
            sandbox.volumes.before_call()
        except VolumeError as exc:
            raise SandboxError("volume", str(exc)) from None
        try:
            yield
        finally:
            sandbox.volumes.after_call()

    @contextmanager
    def _call_blobs(self, owner: str, refs: list[str]) -> Iterator[CallBlobs]:
        """A call's blobs. In a local store each is checked against its hash before the call (remembered while the
        file is unchanged), so a damaged one is found, and deleted, at once. From a remote store only those the
        sandbox lacks are fetched (and checked) once it has said which: one it keeps costs a HEAD, not a download."""
        if not refs or self.store.blob_path(key_for(owner, refs[0])) is not None:
            with self._blobs.local_files(owner, refs) as files:
                yield CallBlobs.of_files(files, refs)
            return
        sizes = []
        for sha in refs:
            size = self.store.blob_size(key_for(owner, sha))
            if size is None:
                raise BlobError(
                    f"blob {sha[:12]}… was deleted after the grid's retention; run the call again "
                    "(the client uploads it again)",
                    404,
                )
            sizes.append(size)
        yield CallBlobs(
            refs, sizes, lambda needed: self._blobs.local_files(owner, [refs[n] for n in needed])
        )

    def _live_output(self, job_id: str) -> Callable[[str, bytes], None]:
        """Where a running call's output goes as it is printed: the bus, for whoever follows the job."""

        def publish(stream: str, data: bytes) -> None:
            kept = self._printed.setdefault(job_id, {"stdout": bytearray(), "stderr": bytearray()})
            kept[stream] += data  # bounded by the sandbox channel (twice the capture limit at most)
            self.bus.append_log(job_id, stream, data)

        return publish

    def _code(self, message: JobMessage) -> FunctionCode:
        package = self._verified_package(message)
        manifest = _manifest(package)
        ai = manifest.get("ai") is True and self.ai is not None  # JSON true and nothing else
        env = (
            {
                "AI_ENDPOINT": CHANNEL,
                **({"LLM_MODEL": self.ai.model} if self.ai and self.ai.model else {}),
            }
            if ai
            else None
        )
        # The function's own variables and secrets first: the grid's (FUNCTION_ID, MEMORY_MB, ...) win over them.
        env = {**self._function_environment(message, manifest), **(env or {})}
        # The environment it asks for (packages, Python), built once per grid; the build's progress shows on the job.
        environment, progress_shown = None, []
        if self.pool.environments is not None:

            def progress(text: str) -> None:
                progress_shown.append(text)
                self.registry.note_attempt(message.job_id, {"kind": "progress", "message": text})

            try:
                environment = self.pool.environments.for_manifest(manifest, progress)
            except EnvironmentBuildError as exc:
                raise SandboxError("environment", exc.message) from None
            finally:
                if progress_shown:
                    self.registry.note_attempt(message.job_id, None)  # type: ignore[arg-type]  # progress over
            if environment is not None and environment.variables:
                env = {**environment.variables, **(env or {})}
        volumes = None
        # the owner's volumes, named per owner (nanogrid_backend/volumes.py)
        if manifest.get("volumes"):
            if self.volumes is None:
                raise SandboxError("volume", "this worker keeps no volumes")
            try:
                volumes = self.volumes.attach(message.owner, manifest["volumes"])
            except VolumeError as exc:
                raise SandboxError("volume", str(exc)) from None
            env = {**(env or {}), "NANOGRID_VOLUMES": json.dumps(volumes.names())}
        return FunctionCode(
            package,
            message.memory_mib,
            ai=ai,
            env=env,
            environment=environment,
            disk_mib=_disk_mib(manifest),
            volumes=volumes,
        )

    def _function_environment(
        self, message: JobMessage, manifest: dict[str, Any]
    ) -> dict[str, str]:
        """``env`` and ``secrets`` of the manifest (secrets decrypted only here, into the sandbox), and the
        seed platform's FUNCTION_ID and MEMORY_MB."""
        env = {str(k): str(v) for k, v in (manifest.get("env") or {}).items()}
        for name in manifest.get("secrets") or []:
            secret = self.registry.get_secret(message.owner, str(name))
            if secret is None:
                raise SandboxError(
                    "secret",
                    f"the function asks for secret {name!r}, which its owner has not set: "
                    f"`nanogrid secrets set {name} KEY=VALUE`",
                )
            if self.secrets is None:
                raise SandboxError(
                    "secret",
                    "this worker has no secrets key; it cannot give the function its secrets",
                )
            try:
                env.update(
                    json.loads(self.secrets.open(secret.ciphertext, message.owner, secret.name))
                )
            except SecretError as exc:
                raise SandboxError("secret", str(exc)) from None
        return {
            **env,
            "FUNCTION_ID": str(manifest.get("stable_id") or message.function_id),
            "MEMORY_MB": str(message.memory_mib),
        }

    def _verified_package(self, message: JobMessage) -> bytes:
        """The function's package, checked against its content hash: a changed file in the store never runs."""
        try:
            package = self.store.get_package(message.function_id)
        except FileNotFoundError:
            raise SandboxError("not_found", f"function {message.function_id} was deleted") from None
        if owned_function_id(message.owner, function_id_for(package)) != message.function_id:
            log.error(
                "function %s: the stored package does not match its content hash; refusing to load it",
                message.function_id,
            )
            raise SandboxError(
                "corrupt",
                f"the stored code of function {message.function_id} does not match its "
                "content hash; upload the function again",
            )
        return package

    def _record(self, job: JobRecord, outcome: CallResult) -> None:
        reply = outcome.reply
        job.stdout, job.stderr = reply.get("stdout", ""), reply.get("stderr", "")
        job.execution_time_ms = round(outcome.duration_ms, 3)
        job.peak_memory_bytes = outcome.peak_memory_bytes
        job.baseline_memory_bytes = outcome.baseline_memory_bytes
        job.ai_usage = outcome.ai_usage
        job.output_files = self._store_outputs(
            job.job_id, job.owner, outcome.output_dir, outcome.output_files
        )
        # a large result (or a failed cell's large state): the owner's blob
        if outcome.result_file is not None:
            size = outcome.result_file.stat().st_size
            try:
                self._blobs.store_result(job.owner, outcome.result_file, outcome.result_sha256)
            except OSError as exc:
                raise SandboxError(
                    "storage",
                    "the grid could not store this call's result "
                    f"({os.strerror(exc.errno) if exc.errno else type(exc).__name__})",
                ) from None
            job.result_format = RESULT_FORMAT
            job.result = result_reference(
                outcome.result_sha256, size, reply.get("result_format", "pickle")
            )
            if reply["ok"]:
                job.status = COMPLETED
                return
        elif reply["ok"]:
            job.status, job.result_format, job.result = (
                COMPLETED,
                reply["result_format"],
                outcome.body,
            )
            return
        else:
            job.result_format, job.result = (
                ("pickle", outcome.body) if outcome.body else (None, None)
            )
        error = reply["error"]
        if error.get("kind") == "memory":
            error["message"] = (
                f"out of memory (MemoryError at the sandbox's memory limit): {error.get('message', '')}"
            )
        job.status, job.error = FAILED, error

    def _store_outputs(
        self, job_id: str, owner: str, output_dir: Path, names: list[str]
    ) -> list[dict]:
        """Move the files the host received into the store (they were checked and capped on arrival)."""
        stored = []
        try:
            for name in names:
                size = self.store.save_output(job_id, name, output_dir / name, owner=owner)
                stored.append({"name": name, "size": size})
        except OSError as exc:
            raise SandboxError(
                "storage",
                "the grid could not store this call's output files "
                f"({os.strerror(exc.errno) if exc.errno else type(exc).__name__})",
            ) from None
        return stored

    def _fail(self, job: JobRecord, kind: str, message: str) -> None:
        job.status = CANCELLED if kind == "cancelled" else FAILED
        job.error = {"kind": kind, "message": message}
        printed = self._printed.get(job.job_id)
        if printed and not (job.stdout or job.stderr):  # what it printed before it was stopped
            job.stdout, job.stderr = (
                printed[name].decode("utf-8", "replace") for name in ("stdout", "stderr")
            )
