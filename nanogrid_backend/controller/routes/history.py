"""``/v1/history`` and a function's ``history``, ``windows`` and ``autotune``: what the caller's calls did.

The AutoTuner routes advise (and apply) a memory size from them (nanogrid_backend/controller/history.py)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, Field

from nanogrid_backend.controller.history import (
    TEXT_CAP,
    advise,
    apply_memory,
    history_entry,
    page,
    rates_for,
)
from nanogrid_backend.controller.routes.deps import Caller, CurrentGrid, resolve_function
from nanogrid_backend.controller.routes.jobs import JobStatus
from nanogrid_backend.grid import Grid
from nanogrid_backend.models import ApiKey, FunctionRecord

router = APIRouter(prefix="/v1", tags=["operations"])

Limit = Annotated[int, Query(ge=1, le=500, description="calls per page")]
Before = Annotated[
    str | None, Query(description="next_before of the previous page (a job id), or a Unix time")
]
Status = Annotated[JobStatus | None, Query()]


class ApplyRequest(BaseModel):
    memory_mib: int | None = Field(
        None, ge=16, description="the size to apply (default: the AutoTuner's advice)"
    )


def owned_function(grid: Grid, function_id: str, key: ApiKey) -> FunctionRecord:
    # a NanoGrid id or a seed function's uuid
    function = resolve_function(grid, key.name, function_id)
    if function is None:
        raise HTTPException(404, f"no function {function_id!r}")
    return function


def cursor(grid: Grid, before: str | None, key: ApiKey) -> tuple[float, str] | None:
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


@router.get("/history")
def owner_history(
    key: Caller,
    grid: CurrentGrid,
    limit: Limit = 50,
    before: Before = None,
    status: Status = None,
    function_id: Annotated[str | None, Query(max_length=64)] = None,
) -> dict:
    """The caller's calls, newest first: status, times, duration, peak memory, cold/warm, worker, exit reason."""
    entries = grid.registry.list_history(
        key.name, function_id, status, limit, cursor(grid, before, key), TEXT_CAP
    )
    return page(entries, limit)


@router.get("/functions/{function_id}/history")
def function_history(
    function_id: str,
    key: Caller,
    grid: CurrentGrid,
    limit: Limit = 50,
    before: Before = None,
    status: Status = None,
) -> dict:
    """One function's calls, newest first (stdout/stderr cut to 2,048 characters: ``/v1/history/{job_id}``)."""
    # a seed function's uuid: its newest version
    resolved = resolve_function(grid, key.name, function_id)
    function_id = resolved.function_id if resolved is not None else function_id
    entries = grid.registry.list_history(
        key.name, function_id, status, limit, cursor(grid, before, key), TEXT_CAP
    )
    return page(entries, limit)


@router.get("/history/{job_id}")
def one_call(job_id: str, key: Caller, grid: CurrentGrid) -> dict:
    """One call with its whole stdout and stderr."""
    job = grid.registry.get_job(job_id)
    if job is None or job.owner != key.name:
        raise HTTPException(404, f"no job {job_id!r}")
    return history_entry(job)


@router.get("/functions/{function_id}/windows")
def function_windows(function_id: str, key: Caller, grid: CurrentGrid) -> dict:
    """Count, error rate, p50/p95/p99 duration, peak memory distribution and cold-start share over 1h/24h/7d/30d."""
    owned_function(grid, function_id, key)
    return {"function_id": function_id, "windows": grid.registry.function_windows(function_id)}


@router.get("/functions/{function_id}/autotune")
def autotune(
    function_id: str,
    key: Caller,
    grid: CurrentGrid,
    lambda_gb_s: Annotated[float | None, Query(gt=0)] = None,
    ec2_hourly: Annotated[float | None, Query(gt=0)] = None,
    ec2_memory_gib: Annotated[float | None, Query(gt=0)] = None,
) -> dict:
    """A memory size from the observed peaks, why, and the saving per million calls (rates: the grid's or these)."""
    return advise(
        grid,
        owned_function(grid, function_id, key),
        rates_for(grid, lambda_gb_s, ec2_hourly, ec2_memory_gib),
    )


@router.post("/functions/{function_id}/autotune/apply", status_code=201)
def autotune_apply(function_id: str, body: ApplyRequest, key: Caller, grid: CurrentGrid) -> dict:
    """Make the version with the advised (or given) memory; returns it. Calls by the new id use it."""
    function = owned_function(grid, function_id, key)
    memory = body.memory_mib or advise(grid, function, rates_for(grid))["recommended_mib"]
    if memory is None:
        raise HTTPException(
            409,
            "the AutoTuner has too few measured calls of this function to advise a size; "
            "give memory_mib to apply one anyway",
        )
    return apply_memory(grid, function, memory).to_dict()
