"""Submitting jobs and waiting for them: the controller's logic, kept out of the routes."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import threading
import time
import zipfile
from collections.abc import AsyncIterator
from typing import Any

from nanogrid_backend.grid import Grid
from nanogrid_backend.models import (
    CANCELLED,
    PENDING,
    RUNNING,
    ApiKey,
    FunctionRecord,
    JobMessage,
    JobRecord,
    new_job_id,
)
from nanogrid_backend.package_checks import Package, PackageError, from_upload, owned_function_id
from nanogrid_backend.store.blobs import (
    BLOB_FORMAT,
    MAX_BLOBS_PER_CALL,
    blobs_of,
    is_sha256,
    join_payload,
)

log = logging.getLogger(__name__)

RECHECK_S = 2.0  # how often a waiter asks the registry when the bus has said nothing
RECHECK_BATCH = 100  # jobs of a silent /map stream looked up per recheck


class BadRequest(ValueError):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def deploy(
    grid: Grid, caller: ApiKey, filename: str, data: bytes, form: dict[str, Any]
) -> tuple[FunctionRecord, bool]:
    """Check an upload, store its package and record the function; (record, False) if the owner has it already.

    The manifest's ``description`` and ``stable_id`` (the seed contract's function id, kept across updates)
    go on the record; ``env`` and ``secrets`` stay in the package, read by the worker when it loads it.
    """
    config = grid.config
    package = from_upload(
        filename, data, form, max_bytes=config.max_package_bytes, runtimes=grid.runtimes
    )
    manifest = package.manifest
    memory_mib = int(manifest.get("memory") or config.default_memory_mib)
    max_timeout_s = min(config.max_timeout_s, caller.max_timeout_s or config.max_timeout_s)
    timeout_s = float(manifest.get("timeout") or min(config.default_timeout_s, max_timeout_s))
    if not 16 <= memory_mib <= config.max_memory_mib:
        raise PackageError(f"memory must be 16..{config.max_memory_mib} MiB, not {memory_mib}")
    disk_mib = manifest.get("disk")
    if disk_mib is not None and not 16 <= disk_mib <= config.max_disk_mib:
        raise PackageError(
            f"disk must be 16..{config.max_disk_mib} MiB, not {disk_mib} (the grid's max_disk_mib)"
        )
    if not 0 < timeout_s <= max_timeout_s:
        limit = "this key's" if max_timeout_s < config.max_timeout_s else "the grid's"
        raise PackageError(
            f"timeout must be more than 0 and at most {max_timeout_s:g} s ({limit} max timeout), "
            f"not {timeout_s:g}"
        )
    function_id = owned_function_id(caller.name, package.function_id)
    existing = grid.registry.get_function(function_id)
    if existing is not None:
        return existing, False
    grid.store.put_package(function_id, package.data)
    record = FunctionRecord(
        function_id=function_id,
        owner=caller.name,
        function_name=manifest["name"],
        runtime=manifest["runtime"],
        handler=manifest["handler"],
        kind=manifest["kind"],
        memory_mib=memory_mib,
        timeout_s=timeout_s,
        package_size=len(package.data),
        python=manifest["python"],
        source=_source_of(package),
        description=str(manifest.get("description") or "")[:1000],
        stable_id=str(manifest.get("stable_id") or ""),
    )
    grid.registry.put_function(record)
    return record, True


def _source_of(package: Package) -> str:
    with zipfile.ZipFile(io.BytesIO(package.data)) as zf:
        names = zf.namelist()
        if "source.py" in names:
            return zf.read("source.py").decode(errors="replace")[:20000]
        module = package.manifest["handler"].rsplit(".", 1)[0].replace(".", "/") + ".py"
        return zf.read(module).decode(errors="replace")[:20000] if module in names else ""


# a JSON payload or inline args pickle; larger values travel as blobs (/v1/blobs)
INLINE_CAP_BYTES = 16 << 20


def inline_cap(config: Any) -> int:
    return min(config.max_payload_bytes, INLINE_CAP_BYTES)


def checked_blobs(
    grid: Grid, owner: str, refs: list[list[str]] | None, pickles: list[str] | None
) -> list[list[str]] | None:
    """Per call, the blobs its args pickle references, each one this owner's and stored; 400 otherwise."""
    if not refs or not any(refs):
        return None
    if pickles is None or len(refs) != len(pickles):
        raise BadRequest(
            "'blobs' needs one list per args_pickle (references for pickled arguments only)", 422
        )
    space = blobs_of(grid)
    for call in refs:
        if len(call) > MAX_BLOBS_PER_CALL or not all(
            isinstance(sha, str) and is_sha256(sha) for sha in call
        ):
            raise BadRequest(
                f"a call references at most {MAX_BLOBS_PER_CALL} blobs, each a SHA-256 in hex", 422
            )
    for sha in {sha for call in refs for sha in call}:
        if space.size(owner, sha) is None:
            raise BadRequest(
                f"no blob {sha[:12]}…: upload it first (PUT /v1/blobs/{{sha256}}); blobs are "
                "deleted after the grid's retention",
                404,
            )
    return refs


def encode_payloads(
    function: FunctionRecord,
    payloads: list[Any] | None,
    pickles: list[str] | None,
    max_bytes: int,
    blobs: list[list[str]] | None = None,
) -> list[tuple[str, bytes]]:
    """Each call's payload as (format, bytes), checked against the function's kind and the size cap.

    ``blobs``: per call, the blobs its args pickle references (checked by ``checked_blobs``); such a call's
    payload is in the ``pickle+blobs`` format (nanogrid_backend/store/blobs.py)."""
    if pickles is not None:
        if function.kind != "pickle":
            raise BadRequest(
                f"function {function.function_id} is a handler function: send 'payload', not 'args_pickle'"
            )
        encoded = []
        for item in pickles:
            try:
                encoded.append(("pickle", base64.b64decode(item, validate=True)))
            except (binascii.Error, ValueError):
                raise BadRequest("args_pickle must be base64") from None
        if blobs:
            encoded = [
                (BLOB_FORMAT, join_payload(refs, data)) if refs else (fmt, data)
                for (fmt, data), refs in zip(encoded, blobs, strict=True)
            ]
    else:
        if function.kind == "pickle":
            raise BadRequest(
                f"function {function.function_id} was packaged by the Python client: "
                "call it with args_pickle (use nanogrid's .remote())"
            )
        encoded = [("json", json.dumps(p).encode()) for p in (payloads or [])]
    for _, data in encoded:
        if len(data) > max_bytes:
            raise BadRequest(
                f"payload is {len(data)} bytes, over the {max_bytes}-byte limit; "
                "pass large data by reference (a URL or an object store key)",
                413,
            )
    return encoded


def new_jobs(
    function: FunctionRecord, payloads: list[tuple[str, bytes]], owner: str
) -> list[JobRecord]:
    return [
        JobRecord(new_job_id(), function.function_id, payload_format=fmt, payload=data, owner=owner)
        for fmt, data in payloads
    ]


def submit(
    grid: Grid,
    function: FunctionRecord,
    jobs: list[JobRecord],
    model: str | None = None,
    max_timeout_s: float | None = None,
) -> None:
    """Record the jobs, then queue them: a restart after this point loses none of them.

    Each call runs at most the owner's max timeout (and ``max_timeout_s``, the calling key's), whatever the
    function was uploaded with: a key limited to less than the grid's maximum stays limited.
    """
    grid.registry.create_jobs(jobs)
    _queue(grid, function, jobs, model, max_timeout_s)


async def submit_from_loop(
    grid: Grid,
    function: FunctionRecord,
    jobs: list[JobRecord],
    model: str | None = None,
    max_timeout_s: float | None = None,
) -> None:
    """``submit`` from the event loop. On the embedded grid it is a local SQLite write of tens of microseconds and
    an in-memory queue: made here when the registry can take it at once, which spares a warm call the two thread
    switches of a worker thread (about 100 µs); otherwise (another write under way, DynamoDB, SQS) on a thread,
    so the loop never waits."""
    if grid.local_queue is not None and grid.registry.create_jobs_now(jobs):
        _queue(grid, function, jobs, model, max_timeout_s)
    else:
        await asyncio.to_thread(submit, grid, function, jobs, model, max_timeout_s)


def _queue(
    grid: Grid,
    function: FunctionRecord,
    jobs: list[JobRecord],
    model: str | None,
    max_timeout_s: float | None,
) -> None:
    grid.queue.put(_messages(grid, function, jobs, model, max_timeout_s))


def _messages(
    grid: Grid,
    function: FunctionRecord,
    jobs: list[JobRecord],
    model: str | None,
    max_timeout_s: float | None,
) -> list[JobMessage]:
    timeouts = {
        owner: min(
            function.timeout_s, grid.owners.max_timeout(owner), max_timeout_s or float("inf")
        )
        for owner in {job.owner for job in jobs}
    }
    return [
        JobMessage(
            job.job_id,
            function.function_id,
            job.payload_format,
            job.payload,
            timeouts[job.owner],
            function.memory_mib,
            model,
            owner=job.owner,
            created_at=job.created_at,
        )
        for job in jobs
    ]


def subscribe(grid: Grid, job_ids: list[str]) -> tuple[asyncio.Queue[JobRecord], Any]:
    """An asyncio queue that receives each of these jobs once it finishes (from any worker thread)."""
    loop = asyncio.get_running_loop()
    finished: asyncio.Queue[JobRecord] = asyncio.Queue()
    arrived: list[JobRecord] = []  # delivered by worker threads, not yet handed to the loop
    lock = threading.Lock()

    def hand_over() -> None:
        with lock:
            jobs = arrived[:]
            arrived.clear()
        for job in jobs:
            finished.put_nowait(job)

    def deliver(job: JobRecord) -> None:
        # A worker announces a batch of calls at once: the loop is woken once for all that arrive before it runs.
        with lock:
            arrived.append(job)
            if len(arrived) > 1:
                return
        loop.call_soon_threadsafe(hand_over)

    unsubscribe = grid.bus.subscribe(job_ids, deliver)
    return finished, unsubscribe


class JobWaiter:
    """One job's end, for a request on the event loop that waits for it (a sync ``/v1/run``).

    The bus announces the job from whichever thread finished it; the announcement wakes the waiting request in one
    turn of the loop (no queue, no task of its own, no ``asyncio.wait`` between them), and so do its timer and
    ``stop()``. Made before the job is queued, so no announcement slips past; ``close()`` unsubscribes."""

    def __init__(self, grid: Grid, job_id: str) -> None:
        self.loop = asyncio.get_running_loop()
        self.job_id = job_id
        self.job: JobRecord | None = None  # once announced
        self.stopped = False
        self._woken: asyncio.Future[None] | None = None
        self.close = grid.bus.subscribe([job_id], self._announced)

    def _announced(self, job: JobRecord) -> None:  # any thread
        self.loop.call_soon_threadsafe(self._settle, job)

    def _settle(self, job: JobRecord) -> None:
        if self.job is None:
            self.job = job
        self._wake()

    def _wake(self) -> None:
        woken = self._woken
        if woken is not None and not woken.done():
            woken.set_result(None)

    def stop(self) -> None:
        """End the wait now (the caller went away). From the loop's thread."""
        self.stopped = True
        self._wake()

    async def wait(self, seconds: float) -> None:
        """Until the job is announced, ``stop()`` is called or ``seconds`` have passed."""
        if self.job is not None or self.stopped:
            return
        self._woken = self.loop.create_future()
        timer = self.loop.call_later(seconds, self._wake)
        try:
            await self._woken
        finally:
            timer.cancel()
            self._woken = None


async def until_finished(grid: Grid, waiter: JobWaiter, timeout: float) -> JobRecord | None:
    """The finished job, or None after ``timeout`` seconds or once the waiter is stopped. The registry is asked too
    every RECHECK_S, so an announcement lost to a bus outage (a Redis restart) costs seconds, not the whole wait."""
    deadline = waiter.loop.time() + timeout
    while (left := deadline - waiter.loop.time()) > 0:
        await waiter.wait(min(left, RECHECK_S))
        if waiter.job is not None:
            return waiter.job
        if waiter.stopped:
            return None
        job = await asyncio.to_thread(grid.registry.get_job, waiter.job_id)
        if job is not None and job.finished:
            return job
    return None


async def wait_for(
    grid: Grid, job_id: str, timeout: float, known: JobRecord | None = None
) -> JobRecord | None:
    """The job once finished, or as it stands after ``timeout`` seconds; None if there is no such job.

    ``known``: the record the caller just read, so a job that is already finished costs no second read.
    """
    if known is not None and (known.finished or timeout <= 0):
        return known
    finished, unsubscribe = subscribe(grid, [job_id])
    try:
        # read again after subscribing: the result may have landed between
        job = grid.registry.get_job(job_id)
        if job is None or job.finished or timeout <= 0:
            return job
        return await next_result(grid, job_id, finished, timeout) or grid.registry.get_job(job_id)
    finally:
        unsubscribe()


async def next_result(
    grid: Grid, job_id: str, finished: asyncio.Queue[JobRecord], timeout: float
) -> JobRecord | None:
    """The finished job from the bus; the registry is asked too every RECHECK_S, so an announcement
    lost to a bus outage (a Redis restart) costs seconds, not the whole wait."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            return await asyncio.wait_for(finished.get(), min(left, RECHECK_S))
        except TimeoutError:
            job = await asyncio.to_thread(grid.registry.get_job, job_id)
            if job is not None and job.finished:
                return job
    return None


async def stream_results(
    grid: Grid, job_ids: list[str], finished: asyncio.Queue[JobRecord], unsubscribe: Any
) -> AsyncIterator[list[tuple[int, JobRecord]]]:
    """(index, job) for the jobs as they finish, in completion order, as many at a time as have finished (a worker
    records a batch of calls at once: they go out together); stalls are checked in the registry.

    [] after each RECHECK_S without news: the stream shows it is alive, so a client times out on silence only."""
    index = {job_id: i for i, job_id in enumerate(job_ids)}
    remaining = set(job_ids)
    try:
        while remaining:
            try:
                found = [await asyncio.wait_for(finished.get(), RECHECK_S)]
                while not finished.empty():
                    found.append(finished.get_nowait())
            except TimeoutError:
                oldest = sorted(remaining, key=index.__getitem__)[:RECHECK_BATCH]
                found = await asyncio.to_thread(_finished_among, grid, oldest)
            news = []
            for job in found:
                if job.job_id in remaining:
                    remaining.discard(job.job_id)
                    news.append((index[job.job_id], job))
            yield news
    finally:
        unsubscribe()


def _finished_among(grid: Grid, job_ids: list[str]) -> list[JobRecord]:
    jobs = (grid.registry.get_job(job_id) for job_id in job_ids)
    return [job for job in jobs if job is not None and job.finished]


def cancel(grid: Grid, job: JobRecord) -> bool:
    """Cancel a job: a queued one is marked cancelled and leaves the queue, a running one has its sandbox killed."""
    return cancel_all(grid, [job]) == 1


def cancel_all(grid: Grid, records: list[JobRecord]) -> int:
    """Cancel these jobs (see ``cancel``); how many were still unfinished. The queue is walked once for them all."""
    count, dequeued = 0, set[str]()
    for job in records:
        if job.finished:
            continue
        if job.status == RUNNING:
            # the worker running it stops its sandbox and records it
            grid.bus.request_cancel(job.job_id)
            count += 1
            continue
        job.status, job.finished_at = CANCELLED, time.time()
        job.error = {"kind": "cancelled", "message": "cancelled by the user before it started"}
        if grid.registry.finish_job(job):
            grid.bus.publish(job)
            grid.bus.request_cancel(job.job_id)  # in case a worker took it in the meantime
            dequeued.add(job.job_id)
            count += 1
    if dequeued:
        grid.queue.discard(dequeued)
    return count


def cancel_unwatched(grid: Grid, job_ids: list[str]) -> None:
    """The client that waited for these calls is gone (a killed kernel, a closed script): those still queued are
    cancelled, so nobody's calls run for nobody; those already running finish and keep their outcome. In a thread
    of its own: it is called as the request ends, where nothing may wait."""

    def cancel_queued() -> None:
        try:
            queued = [
                job
                for job in map(grid.registry.get_job, job_ids)
                if job is not None and job.status == PENDING
            ]
            if queued:
                cancel_all(grid, queued)
                log.info("cancelled %d queued calls whose client went away", len(queued))
        except Exception:
            log.exception("could not cancel the queued calls of a client that went away")

    threading.Thread(target=cancel_queued, name="nanogrid-cancel-unwatched", daemon=True).start()


async def until_disconnected(request: Any, every_s: float = 0.5) -> None:
    """Returns once the client of ``request`` has gone (a request whose answer it no longer waits for)."""
    while not await request.is_disconnected():
        await asyncio.sleep(every_s)


def live_workers(grid: Grid) -> list[dict]:
    """The workers' latest reports: exact and current for the embedded grid, heartbeats for many machines."""
    if grid.worker is not None and not grid.config.redis_host:
        return [grid.worker.info()]
    return grid.bus.workers()
