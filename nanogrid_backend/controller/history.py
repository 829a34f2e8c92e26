"""Invocation history as the API and the dashboard show it, the AutoTuner's advice, and the history's retention.

The routes are nanogrid_backend/controller/routes/history.py; ``HistoryJanitor`` deletes finished calls older than
``history_retention_s``, in batches, once an hour, for as long as the app runs (its lifespan starts and stops it).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import threading
import time
import zipfile
from typing import Any

from fastapi import HTTPException

from nanogrid_backend.controller.autotune import Rates, recommend
from nanogrid_backend.grid import Grid
from nanogrid_backend.models import FunctionRecord, JobRecord
from nanogrid_backend.package_checks import function_id_for, owned_function_id
from nanogrid_backend.registry.base import HistoryEntry
from nanogrid_contract.packages import build_zip

log = logging.getLogger(__name__)

TEXT_CAP = 2048  # stdout/stderr characters in a history page; the whole text is one request away
PRUNE_EVERY_S = 3600.0


def history_entry(
    job: JobRecord, stdout_size: int | None = None, stderr_size: int | None = None
) -> dict[str, Any]:
    """One call as the history shows it: what happened, how long, how much memory, where, and why it ended."""
    stdout_size = len(job.stdout) if stdout_size is None else stdout_size
    stderr_size = len(job.stderr) if stderr_size is None else stderr_size
    error = job.error or {}
    return {
        "job_id": job.job_id,
        "function_id": job.function_id,
        "status": job.status,
        "attempt": job.attempt,
        "retry_of": job.retry_of,
        "trigger": job.trigger,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "duration_ms": job.execution_time_ms,
        "peak_memory_bytes": job.peak_memory_bytes,
        "memory_limit_mib": job.memory_limit_mib,
        "cold": job.cold,
        "worker_id": job.worker_id,
        "sandbox_id": job.sandbox_id,
        "exit_reason": error.get("kind") or ("ok" if job.status == "completed" else None),
        "error": job.error,
        "stdout": job.stdout,
        "stderr": job.stderr,
        "stdout_size": stdout_size,
        "stderr_size": stderr_size,
        "truncated": len(job.stdout) < stdout_size or len(job.stderr) < stderr_size,
    }


def page(entries: list[HistoryEntry], limit: int) -> dict[str, Any]:
    items = [history_entry(e.job, e.stdout_size, e.stderr_size) for e in entries]
    return {"items": items, "next_before": items[-1]["job_id"] if len(items) == limit else None}


def rates_for(
    grid: Grid,
    lambda_gb_s: float | None = None,
    ec2_hourly: float | None = None,
    ec2_memory_gib: float | None = None,
) -> Rates:
    config = grid.config
    return Rates(
        lambda_gb_s if lambda_gb_s is not None else config.price_lambda_gb_s,
        ec2_hourly if ec2_hourly is not None else config.price_ec2_hourly,
        ec2_memory_gib if ec2_memory_gib is not None else config.price_ec2_memory_gib,
    )


def advise(
    grid: Grid,
    function: FunctionRecord,
    rates: Rates,
    windows: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The AutoTuner's advice, with the measured sizes of the function's other versions (same name and owner);
    ``windows``: the function's, if the caller has them already."""
    versions = [
        f
        for f in grid.registry.list_functions(owner=function.owner)
        if f.function_name == function.function_name
        and f.function_id != function.function_id
        and f.memory_mib != function.memory_mib
    ]
    return recommend(
        function,
        windows or grid.registry.function_windows(function.function_id),
        rates,
        [
            (f, grid.registry.function_windows(f.function_id, names=("30d",))["30d"])
            for f in versions
        ],
    )


def apply_memory(grid: Grid, function: FunctionRecord, memory_mib: int) -> FunctionRecord:
    """A new version of the function with another memory size: the same package with the manifest's memory changed,
    so its id is a content hash like any upload's (workers verify it) and the old version's history stays its own."""
    if not 16 <= memory_mib <= grid.config.max_memory_mib:
        raise HTTPException(
            422, f"memory must be 16..{grid.config.max_memory_mib} MiB, not {memory_mib}"
        )
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
    version = dataclasses.replace(
        function,
        function_id=function_id,
        memory_mib=memory_mib,
        created_at=time.time(),
        package_size=len(data),
    )
    grid.registry.put_function(version)
    return version


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
        deleted = self.grid.registry.prune_history(
            time.time() - self.grid.config.history_retention_s
        )
        if deleted:
            log.info(
                "history: deleted %d calls older than %g days",
                deleted,
                self.grid.config.history_retention_s / 86400,
            )
        return deleted

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sweep()
            except Exception:  # a failed pass is tried again in an hour; it never stops the grid
                log.exception("history: the retention pass failed")
            self._stop.wait(PRUNE_EVERY_S)
