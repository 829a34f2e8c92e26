"""/v1/schedules: an owner's functions that run on their own (nanogrid_backend/schedules.py fires them).

A schedule is named after its function and belongs to the key's owner: another owner's schedule of the same
name is a different schedule, and one that is not yours answers 404 like one that does not exist.
"""

import base64
import binascii
import json
import re
import time
from typing import Any

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, Field

from nanogrid_backend.controller.routes.deps import Caller, CurrentGrid
from nanogrid_backend.grid import Grid
from nanogrid_backend.models import FiringRecord, ScheduleRecord
from nanogrid_backend.schedules import next_due_after, schedule_id_for
from nanogrid_contract.errors import InvalidArgument
from nanogrid_contract.schedules import check_cron, check_overlap, check_period, check_timezone

NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")


class ScheduleRequest(BaseModel):
    function_id: str = Field(description="the version to run (POST /v1/upload's function_id)")
    cron: str | None = Field(None, description="a five-field cron expression, e.g. '0 * * * *'")
    period_s: float | None = Field(None, description="or: run every this many seconds (at least 1)")
    timezone: str = Field("UTC", description="the IANA zone the cron expression is read in")
    overlap: str = Field(
        "skip", description="a run still going when the next is due: 'skip' or 'queue'"
    )
    args_pickle: str | None = Field(
        None, description="base64 arguments of each run (Python clients)"
    )
    payload: Any = Field(
        None, description="or: the JSON event of each run (handler functions; default {})"
    )


class FiringView(BaseModel):
    due_time: float
    fired_at: float
    lateness_s: float = Field(description="fired_at - due_time")
    outcome: str = Field(
        description="started, skipped (a run was still going), queued (waits for it), failed"
    )
    job_id: str | None
    missed: int = Field(
        description="due times this firing stands for; more than 1 after the grid was down"
    )
    catch_up: bool
    detail: str


class ScheduleView(BaseModel):
    name: str
    function_id: str
    cron: str | None
    period_s: float | None
    timezone: str
    overlap: str
    paused: bool
    next_due: float | None = Field(description="the next due time (None while paused)")
    last_job_id: str | None
    created_at: float
    updated_at: float
    firings: list[FiringView] = Field(description="the latest firings, newest first")


def view(schedule: ScheduleRecord, firings: list[FiringRecord]) -> dict[str, Any]:
    return {
        "name": schedule.name,
        "function_id": schedule.function_id,
        "cron": schedule.cron or None,
        "period_s": schedule.period_s or None,
        "timezone": schedule.timezone,
        "overlap": schedule.overlap,
        "paused": schedule.paused,
        "next_due": None if schedule.paused else schedule.next_due,
        "last_job_id": schedule.last_job_id,
        "created_at": schedule.created_at,
        "updated_at": schedule.updated_at,
        "firings": [
            {
                "due_time": f.due_time,
                "fired_at": f.fired_at,
                "lateness_s": f.fired_at - f.due_time,
                "outcome": f.outcome,
                "job_id": f.job_id,
                "missed": f.missed,
                "catch_up": f.catch_up,
                "detail": f.detail,
            }
            for f in firings
        ],
    }


router = APIRouter(prefix="/v1/schedules", tags=["schedules"])


def owned(grid: Grid, name: str, owner: str) -> ScheduleRecord:
    schedule = (
        grid.registry.get_schedule(schedule_id_for(owner, name)) if NAME.fullmatch(name) else None
    )
    if schedule is None:
        raise HTTPException(404, f"no schedule {name!r}; `nanogrid schedules list` shows yours")
    return schedule


def answer(grid: Grid, schedule: ScheduleRecord, limit: int = 20) -> dict[str, Any]:
    if grid.scheduler is not None:
        grid.scheduler.wake()
    return view(schedule, grid.registry.list_firings(schedule.schedule_id, limit))


@router.put("/{name}", response_model=ScheduleView)
def put_schedule(
    name: str, body: ScheduleRequest, key: Caller, grid: CurrentGrid
) -> dict[str, Any]:
    """Make or update the schedule NAME; an unchanged timing keeps its due times, pause and history."""
    if not NAME.fullmatch(name):
        raise HTTPException(
            422, f"a schedule name is 1-128 letters, digits, '_', '.' or '-', not {name!r}"
        )
    function = grid.registry.get_function(body.function_id)
    if function is None or function.owner != key.name:
        raise HTTPException(
            404, f"no function {body.function_id!r}; upload it first (POST /v1/upload)"
        )
    try:
        if (body.cron is None) == (body.period_s is None):
            raise InvalidArgument(
                "give either 'cron' (an expression) or 'period_s' (seconds), not both or neither"
            )
        check_timezone(body.timezone)
        check_overlap(body.overlap)
        if body.period_s is not None:
            check_period(body.period_s)
        else:
            check_cron(str(body.cron), body.timezone)
        payload_format, payload = _payload(function.kind, body)
    except InvalidArgument as exc:
        raise HTTPException(422, str(exc)) from None
    now = time.time()
    schedule = ScheduleRecord(
        schedule_id_for(key.name, name),
        key.name,
        name,
        function.function_id,
        cron=body.cron or "",
        period_s=body.period_s or 0.0,
        timezone=body.timezone,
        overlap=body.overlap,
        payload_format=payload_format,
        payload=payload,
        anchor=now,
        created_at=now,
        updated_at=now,
    )
    earlier = grid.registry.get_schedule(schedule.schedule_id)
    if earlier is not None and (earlier.cron, earlier.period_s, earlier.timezone) == (
        schedule.cron,
        schedule.period_s,
        schedule.timezone,
    ):
        schedule.anchor, schedule.next_due, schedule.paused = (
            earlier.anchor,
            earlier.next_due,
            earlier.paused,
        )
        schedule.last_job_id, schedule.waiting_due = earlier.last_job_id, earlier.waiting_due
        schedule.created_at = earlier.created_at
    else:
        schedule.next_due = next_due_after(schedule, now)
        schedule.created_at = earlier.created_at if earlier else now
    grid.registry.put_schedule(schedule)
    return answer(grid, schedule)


@router.get("", response_model=list[ScheduleView])
def list_schedules(key: Caller, grid: CurrentGrid) -> list[dict[str, Any]]:
    return [
        view(s, grid.registry.list_firings(s.schedule_id, 1))
        for s in grid.registry.list_schedules(key.name)
    ]


@router.get("/{name}", response_model=ScheduleView)
def get_schedule(
    name: str, key: Caller, grid: CurrentGrid, limit: int = Query(20, ge=1, le=1000)
) -> dict[str, Any]:
    return view(
        owned(grid, name, key.name),
        grid.registry.list_firings(schedule_id_for(key.name, name), limit),
    )


@router.post("/{name}/pause", response_model=ScheduleView)
def pause(name: str, key: Caller, grid: CurrentGrid) -> dict[str, Any]:
    schedule = owned(grid, name, key.name)
    grid.registry.set_schedule_paused(schedule.schedule_id, True, schedule.next_due)
    return answer(grid, owned(grid, name, key.name))


@router.post("/{name}/resume", response_model=ScheduleView)
def resume(name: str, key: Caller, grid: CurrentGrid) -> dict[str, Any]:
    """Due times that passed while paused are not made up: the next one is after now."""
    schedule = owned(grid, name, key.name)
    if schedule.paused:
        grid.registry.set_schedule_paused(
            schedule.schedule_id, False, next_due_after(schedule, time.time())
        )
    return answer(grid, owned(grid, name, key.name))


@router.delete("/{name}", response_model=ScheduleView)
def remove(name: str, key: Caller, grid: CurrentGrid) -> dict[str, Any]:
    schedule = owned(grid, name, key.name)
    shown = view(schedule, grid.registry.list_firings(schedule.schedule_id))
    grid.registry.delete_schedule(schedule.schedule_id)
    return shown


def _payload(kind: str, body: ScheduleRequest) -> tuple[str, bytes]:
    """What each run is called with: the client's args pickle for a Python function, else a JSON event."""
    if kind == "pickle":
        if body.args_pickle is None:
            raise InvalidArgument(
                "this function was packaged by the Python client: send 'args_pickle' (the client's "
                "@remote(schedule=...) does)"
            )
        try:
            return "pickle", base64.b64decode(body.args_pickle, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidArgument("args_pickle must be base64") from None
    if body.args_pickle is not None:
        raise InvalidArgument(
            "this is a handler function: send 'payload' (JSON), not 'args_pickle'"
        )
    return "json", json.dumps({} if body.payload is None else body.payload).encode()
