"""The dashboard's functions: the list, a function's page, and the forms that deploy, change and delete them.

A function's page shows its calls and errors over time, its history and the AutoTuner's advice; its forms deploy,
update, test-run, apply a memory size and delete (what they do: forms.py)."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from nanogrid_backend.controller import jobs
from nanogrid_backend.controller.dashboard import forms
from nanogrid_backend.controller.dashboard.charts import TIMELINES, charts, timeline
from nanogrid_backend.controller.dashboard.state import (
    PAGE,
    Dashboard,
    Session,
    board_of,
    grouped,
    summed,
)
from nanogrid_backend.controller.history import TEXT_CAP, advise, apply_memory, page, rates_for
from nanogrid_backend.package_checks import PackageError

TEST_WAIT_S = (
    10.0  # a test run's form waits this long for the call before showing its (refreshing) job page
)

router = APIRouter(prefix="/ui", include_in_schema=False)


@router.get("")
def functions(request: Request) -> HTMLResponse:
    board = board_of(request)
    session, grid = board.signed_in(request), board.grid
    rows = []
    for versions in grouped(grid.registry.list_functions(owner=session.owner)):
        days = [
            grid.registry.function_windows(v.function_id, names=("24h",))["24h"] for v in versions
        ]
        rows.append(
            {
                "current": versions[0],
                "day": days[0],
                "all": summed(days),
                "versions": list(zip(versions, days, strict=True)),
            }
        )
    return board.page_of(session, "functions.html", "Functions", title="Functions", rows=rows)


@router.get("/functions/{function_id}")
def function(
    request: Request,
    function_id: str,
    status: str = "",
    before: str = "",
    error: str = "",
    code: int = 200,
) -> HTMLResponse:
    board = board_of(request)
    session, grid = board.signed_in(request), board.grid
    record = board.owned(function_id, session)
    windows = grid.registry.function_windows(function_id)
    entries = grid.registry.list_history(
        session.owner, function_id, status or None, PAGE, board.cursor(before, session), TEXT_CAP
    )
    now = time.time()
    # 24h and 7d are counted by the hour too
    hourly = grid.registry.function_timeline(function_id, "30d", now)
    timelines = {
        w: timeline(
            w, grid.registry.function_timeline(function_id, w, now) if w == "1h" else hourly, now
        )
        for w in TIMELINES
    }
    manifest = board.manifest(record)
    return board.page_of(
        session,
        "function.html",
        "Functions",
        code,
        title=record.function_name,
        function=record,
        windows=windows,
        charts=charts(windows),
        timelines=timelines,
        history=page(entries, PAGE),
        status=status,
        advice=advise(grid, record, rates_for(grid), windows),
        versions=board.versions_of(record),
        error=error,
        environment=forms.environment_of(manifest),
        env_names=sorted(manifest.get("env") or {}),
        secret_names=manifest.get("secrets") or [],
        example="[]" if record.kind == "pickle" else '{"name": "grid"}',
    )


@router.post("/functions/{function_id}/autotune")
def autotune(
    request: Request, function_id: str, csrf: str = Form(""), memory_mib: str = Form("")
) -> Response:
    board = board_of(request)
    session, _ = board.changing(request, csrf)
    if not memory_mib.isdigit():
        raise HTTPException(422, f"memory is a whole number of MiB, not {memory_mib[:20]!r}")
    version = apply_memory(board.grid, board.owned(function_id, session), int(memory_mib))
    return RedirectResponse(f"/ui/functions/{version.function_id}", status_code=303)


@router.post("/functions/{function_id}/update")
def update(
    request: Request,
    function_id: str,
    csrf: str = Form(""),
    memory: str = Form("", max_length=16),
    description: str = Form("", max_length=1000),
) -> Response:
    board = board_of(request)
    session, key = board.changing(request, csrf)
    record = board.owned(function_id, session)
    try:
        version = forms.new_version(board.grid, key, record, memory, description)
    except (PackageError, jobs.BadRequest) as exc:
        return function(request, function_id, error=str(exc), code=exc.status)
    return RedirectResponse(f"/ui/functions/{version.function_id}", status_code=303)


@router.post("/functions/{function_id}/run")
async def test_run(
    request: Request,
    function_id: str,
    csrf: str = Form(""),
    input: str = Form("", max_length=1 << 20),
) -> Response:
    board = board_of(request)
    session, key = board.changing(request, csrf)
    record = board.owned(function_id, session)
    try:
        job = await asyncio.to_thread(forms.test_call, board.grid, key, record, input)
    except (PackageError, jobs.BadRequest) as exc:
        return await asyncio.to_thread(
            function, request, function_id, error=str(exc), code=exc.status
        )
    # then the job page, which refreshes itself until it ends
    await jobs.wait_for(board.grid, job.job_id, TEST_WAIT_S)
    return RedirectResponse(f"/ui/jobs/{job.job_id}", status_code=303)


@router.post("/functions/{function_id}/delete")
def delete(request: Request, function_id: str, csrf: str = Form("")) -> Response:
    board = board_of(request)
    session, _ = board.changing(request, csrf)
    forms.delete(board.grid, board.versions_of(board.owned(function_id, session)))
    return RedirectResponse("/ui", status_code=303)


def deploy_page(
    board: Dashboard,
    session: Session,
    runtime: str,
    code: int = 200,
    error: str = "",
    values: dict[str, str] | None = None,
) -> HTMLResponse:
    config = board.grid.config
    runtimes = sorted(board.grid.runtimes)
    runtime = runtime if runtime in runtimes else config.python_runtime
    starter = forms.starter_for(runtime)
    values = values or {
        "code": starter.code,
        "memory": str(config.default_memory_mib),
        "timeout": f"{config.default_timeout_s:g}",
    }
    return board.page_of(
        session,
        "deploy.html",
        "Deploy",
        code,
        title="Deploy",
        runtimes=runtimes,
        runtime=runtime,
        starter=starter,
        values=values,
        error=error,
        max_memory=config.max_memory_mib,
    )


@router.get("/deploy")
def deploy_form(request: Request, runtime: str = "") -> HTMLResponse:
    board = board_of(request)
    return deploy_page(board, board.signed_in(request), runtime)


@router.post("/deploy")
async def deploy(
    request: Request,
    csrf: str = Form(""),
    file: UploadFile | None = File(None),
    name: str = Form("", max_length=64),
    runtime: str = Form("", max_length=32),
    handler: str = Form("", max_length=200),
    memory: str = Form("", max_length=16),
    timeout: str = Form("", max_length=16),
    description: str = Form("", max_length=1000),
    env: str = Form("", max_length=65536),
    secrets_: str = Form("", alias="secrets", max_length=8192),
    code: str = Form("", max_length=forms.MAX_EDITOR_CHARS),
) -> Response:
    board = board_of(request)
    session, key = board.changing(request, csrf)
    fields = {
        "name": name,
        "runtime": runtime,
        "handler": handler,
        "memory": memory,
        "timeout": timeout,
        "description": description,
        "env": env,
        "secrets": secrets_,
        "code": code,
    }
    data = await file.read() if file is not None else b""
    try:
        record = await asyncio.to_thread(
            forms.deploy, board.grid, key, fields, file.filename or "" if file else "", data
        )
    except (PackageError, jobs.BadRequest) as exc:
        return deploy_page(board, session, runtime, exc.status, str(exc), fields)
    return RedirectResponse(f"/ui/functions/{record.function_id}", status_code=303)
