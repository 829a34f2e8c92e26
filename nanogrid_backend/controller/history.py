"""Operations API under ``/v1``: invocation history, metrics windows and the AutoTuner, scoped to the caller's owner.

Included by ``nanogrid_backend/controller/app.py`` through ``install``, which also adds the webhook and load-test routes
and the dashboard (nanogrid_backend/controller/webhooks.py, loadtests.py, ui.py) and runs the history's retention
(finished calls older than ``history_retention_s`` are deleted, in batches, once an hour).
"""

# No ``from __future__ import annotations``: FastAPI reads the routes' annotations, some of them local names.
import dataclasses
import io
import json
import logging
import threading
import time
import zipfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, HTTPException, Query
from pydantic import BaseModel, Field

from nanogrid_backend.controller import loadtests, seed, webhooks
from nanogrid_backend.controller.autotune import Rates, recommend
from nanogrid_backend.grid import Grid
from nanogrid_backend.models import ApiKey, FunctionRecord, JobRecord
from nanogrid_backend.package_checks import function_id_for, owned_function_id
from nanogrid_backend.registry.base import HistoryEntry
from nanogrid_contract.packages import build_zip

log = logging.getLogger(__name__)

TEXT_CAP = 2048  # stdout/stderr characters in a history page; the whole text is one request away
PRUNE_EVERY_S = 3600.0
JobStatus = Literal["pending", "running", "completed", "failed", "cancelled"]


class ApplyRequest(BaseModel):
    memory_mib: int | None = Field(None, ge=16, description="the size to apply (default: the AutoTuner's advice)")


def history_entry(job: JobRecord, stdout_size: int | None = None, stderr_size: int | None = None) -> dict[str, Any]:
    """One call as the history shows it: what happened, how long, how much memory, where, and why it ended."""
    stdout_size = len(job.stdout) if stdout_size is None else stdout_size
    stderr_size = len(job.stderr) if stderr_size is None else stderr_size
    error = job.error or {}
    return {
        "job_id": job.job_id, "function_id": job.function_id, "status": job.status, "attempt": job.attempt,
        "retry_of": job.retry_of, "trigger": job.trigger, "created_at": job.created_at, "started_at": job.started_at,
        "finished_at": job.finished_at, "duration_ms": job.execution_time_ms,
        "peak_memory_bytes": job.peak_memory_bytes, "memory_limit_mib": job.memory_limit_mib, "cold": job.cold,
        "worker_id": job.worker_id, "sandbox_id": job.sandbox_id,
        "exit_reason": error.get("kind") or ("ok" if job.status == "completed" else None),
        "error": job.error, "stdout": job.stdout, "stderr": job.stderr,
        "stdout_size": stdout_size, "stderr_size": stderr_size,
        "truncated": len(job.stdout) < stdout_size or len(job.stderr) < stderr_size,
    }


def page(entries: list[HistoryEntry], limit: int) -> dict[str, Any]:
    items = [history_entry(e.job, e.stdout_size, e.stderr_size) for e in entries]
    return {"items": items, "next_before": items[-1]["job_id"] if len(items) == limit else None}


def rates_for(grid: Grid, lambda_gb_s: float | None = None, ec2_hourly: float | None = None,
              ec2_memory_gib: float | None = None) -> Rates:
    config = grid.config
    return Rates(lambda_gb_s if lambda_gb_s is not None else config.price_lambda_gb_s,
                 ec2_hourly if ec2_hourly is not None else config.price_ec2_hourly,
                 ec2_memory_gib if ec2_memory_gib is not None else config.price_ec2_memory_gib)


def advise(grid: Grid, function: FunctionRecord, rates: Rates,
           windows: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The AutoTuner's advice, with the measured sizes of the function's other versions (same name and owner);
    ``windows``: the function's, if the caller has them already."""
    versions = [f for f in grid.registry.list_functions(owner=function.owner)
                if f.function_name == function.function_name and f.function_id != function.function_id
                and f.memory_mib != function.memory_mib]
    return recommend(function, windows or grid.registry.function_windows(function.function_id), rates,
                     [(f, grid.registry.function_windows(f.function_id, names=("30d",))["30d"]) for f in versions])


def apply_memory(grid: Grid, function: FunctionRecord, memory_mib: int) -> FunctionRecord:
    """A new version of the function with another memory size: the same package with the manifest's memory changed,
    so its id is a content hash like any upload's (workers verify it) and the old version's history stays its own."""
    if not 16 <= memory_mib <= grid.config.max_memory_mib:
        raise HTTPException(422, f"memory must be 16..{grid.config.max_memory_mib} MiB, not {memory_mib}")
    with zipfile.ZipFile(io.BytesIO(grid.store.get_package(function.function_id))) as zf:
        files = {name: zf.read(name) for name in zf.namelist()}
    manifest = json.loads(files["manifest.json"])
    manifest["memory"] = memory_mib
    files["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    data = build_zip(files)
    function_id = owned_function_id(function.owner, function_id_for(data))
    existing = grid.registry.get_function(function_id)
    if existing is not None:
        return existing
    grid.store.put_package(function_id, data)
    version = dataclasses.replace(function, function_id=function_id, memory_mib=memory_mib, created_at=time.time(),
                                  package_size=len(data))
    grid.registry.put_function(version)
    return version


def router(grid: Grid, caller: Any) -> APIRouter:
    """The routes; ``caller`` is the app's dependency that authenticates a request and returns its ``ApiKey``."""
    api = APIRouter(prefix="/v1", tags=["operations"])

    def owned_function(function_id: str, key: ApiKey) -> FunctionRecord:
        function = seed.resolve_function(grid, key.name, function_id)  # a NanoGrid id or a seed function's uuid
        if function is None:
            raise HTTPException(404, f"no function {function_id!r}")
        return function

    def cursor(before: str | None, key: ApiKey) -> tuple[float, str] | None:
        """``before``: a job id from the previous page's ``next_before``, or a Unix time."""
        if before is None:
            return None
        try:
            return float(before), ""
        except ValueError:
            job = grid.registry.get_job(before)
            if job is None or job.owner != key.name:
                raise HTTPException(404, f"no job {before!r} to page from") from None
            return job.created_at, job.job_id

    Limit = Annotated[int, Query(ge=1, le=500, description="calls per page")]
    Before = Annotated[str | None, Query(description="next_before of the previous page (a job id), or a Unix time")]
    Status = Annotated[JobStatus | None, Query()]

    @api.get("/history")
    def owner_history(key: caller, limit: Limit = 50, before: Before = None, status: Status = None,
                      function_id: Annotated[str | None, Query(max_length=64)] = None) -> dict:
        """The caller's calls, newest first: status, times, duration, peak memory, cold/warm, worker, exit reason."""
        entries = grid.registry.list_history(key.name, function_id, status, limit, cursor(before, key), TEXT_CAP)
        return page(entries, limit)

    @api.get("/functions/{function_id}/history")
    def function_history(function_id: str, key: caller, limit: Limit = 50, before: Before = None,
                         status: Status = None) -> dict:
        """One function's calls, newest first (stdout/stderr cut to 2,048 characters: ``/v1/history/{job_id}``)."""
        resolved = seed.resolve_function(grid, key.name, function_id)  # a seed function's uuid: its newest version
        function_id = resolved.function_id if resolved is not None else function_id
        entries = grid.registry.list_history(key.name, function_id, status, limit, cursor(before, key), TEXT_CAP)
        return page(entries, limit)

    @api.get("/history/{job_id}")
    def one_call(job_id: str, key: caller) -> dict:
        """One call with its whole stdout and stderr."""
        job = grid.registry.get_job(job_id)
        if job is None or job.owner != key.name:
            raise HTTPException(404, f"no job {job_id!r}")
        return history_entry(job)

    @api.get("/functions/{function_id}/windows")
    def function_windows(function_id: str, key: caller) -> dict:
        """Count, error rate, p50/p95/p99 duration, peak memory distribution and cold-start share over 1h/24h/7d/30d."""
        owned_function(function_id, key)
        return {"function_id": function_id, "windows": grid.registry.function_windows(function_id)}

    @api.get("/functions/{function_id}/autotune")
    def autotune(function_id: str, key: caller, lambda_gb_s: Annotated[float | None, Query(gt=0)] = None,
                 ec2_hourly: Annotated[float | None, Query(gt=0)] = None,
                 ec2_memory_gib: Annotated[float | None, Query(gt=0)] = None) -> dict:
        """A memory size from the observed peaks, why, and the saving per million calls (rates: the grid's or these)."""
        return advise(grid, owned_function(function_id, key), rates_for(grid, lambda_gb_s, ec2_hourly, ec2_memory_gib))

    @api.post("/functions/{function_id}/autotune/apply", status_code=201)
    def autotune_apply(function_id: str, body: ApplyRequest, key: caller) -> dict:
        """Make the version with the advised (or given) memory; returns it. Calls by the new id use it."""
        function = owned_function(function_id, key)
        memory = body.memory_mib or advise(grid, function, rates_for(grid))["recommended_mib"]
        if memory is None:
            raise HTTPException(409, "the AutoTuner has too few measured calls of this function to advise a size; "
                                     "give memory_mib to apply one anyway")
        return apply_memory(grid, function, memory).to_dict()

    return api


class HistoryJanitor:
    """Deletes calls older than the retention once an hour, on its own thread, for as long as the app runs."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="history-janitor", daemon=True)

    def start(self) -> None:
        if self.grid.config.history_retention_s > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def sweep(self) -> int:
        deleted = self.grid.registry.prune_history(time.time() - self.grid.config.history_retention_s)
        if deleted:
            log.info("history: deleted %d calls older than %g days", deleted,
                     self.grid.config.history_retention_s / 86400)
        return deleted

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sweep()
            except Exception:  # a failed pass is tried again in an hour; it never stops the grid
                log.exception("history: the retention pass failed")
            self._stop.wait(PRUNE_EVERY_S)


def install(app: FastAPI, grid: Grid, caller: Any) -> None:
    """Add the routes, and run the history's retention while the app runs (around the app's own lifespan)."""
    app.include_router(router(grid, caller))
    app.include_router(webhooks.router(grid, caller))
    app.state.loadtests = loadtests.LoadTests(grid)
    app.include_router(loadtests.router(grid, caller, app.state.loadtests))
    from nanogrid_backend.controller import ui  # it builds on this module's helpers

    ui.install(app, grid, app.state.loadtests)
    janitor, inner = HistoryJanitor(grid), app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[Any]:
        async with inner(app) as state:
            janitor.start()
            try:
                yield state
            finally:
                janitor.stop()

    app.router.lifespan_context = lifespan
