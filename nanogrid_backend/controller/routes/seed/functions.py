"""The seed platform's functions and calls: ``/upload``, ``/run``, ``/status``, ``/functions`` and ``/logs``."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import uuid
import zipfile
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Header, HTTPException, Request, UploadFile
from fastapi.responses import JSONResponse

from nanogrid_backend import package_checks as packages
from nanogrid_backend.controller import jobs
from nanogrid_backend.controller.routes.deps import grid_of
from nanogrid_backend.controller.routes.seed.contract import (
    LOG_FEED,
    MAX_MEMORY_MB,
    MIN_MEMORY_MB,
    SEED_RUNTIMES,
    SEED_SOURCES,
    SEED_TIMEOUT_S,
    SNAKE_MEMORY_MB,
    SNAKE_POLL,
    SYNC_WAIT_S,
    Caller,
    SeedRoute,
    code_files,
    current_or_404,
    function_name_of,
    function_summary,
    grid_runtime,
    grouped,
    is_snake_job,
    iso,
    log_entry,
    parse_env_vars,
    seed_id_of,
    seed_ids,
    seed_result,
    seed_runtime,
    snake_job_id,
    snake_result,
    versions_of,
)
from nanogrid_backend.grid import Grid
from nanogrid_backend.models import ApiKey, JobRecord
from nanogrid_backend.registry.base import FunctionStats
from nanogrid_contract.packages import build_zip

log = logging.getLogger(__name__)

router = APIRouter(route_class=SeedRoute, tags=["seed contract"])


@router.post("/upload")
async def upload(
    request: Request,
    caller: Caller,
    file: Annotated[UploadFile | None, File()] = None,
    description: Annotated[str, Form(max_length=1000)] = "",
    envVars: Annotated[str, Form(max_length=65536)] = "",  # noqa: N803  (the seed's field name)
    function_name: Annotated[
        str | None, Form(max_length=200)
    ] = None,  # seed 004's snake_case fields
    runtime: Annotated[str | None, Form(max_length=32)] = None,
    handler: Annotated[str | None, Form(max_length=200)] = None,
    timeout: Annotated[str | None, Form(max_length=16)] = None,
    modelId: Annotated[str | None, Form(max_length=200)] = None,  # noqa: N803  (the AI node's model by default)
    x_runtime: Annotated[str | None, Header()] = None,
    x_memory_mb: Annotated[str | None, Header()] = None,
    x_function_name: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    """Either dialect: headers ``x-runtime``/``x-memory-mb``/``x-function-name`` answered ``{success, functionId}``,
    or seed 004's form fields ``function_name``/``runtime``/``handler``/``timeout`` answered 201 in snake_case."""
    grid = grid_of(request)
    snake = (
        function_name is not None
        or handler is not None
        or (runtime is not None and x_runtime is None)
    )
    name = x_runtime or runtime or "python"
    family = seed_runtime(packages.SEED_FAMILIES.get(name, name))
    if not snake and family not in SEED_RUNTIMES and not packages.SEED_RUNTIME_NAME.match(name):
        raise HTTPException(400, f"Invalid runtime. Allowed: {', '.join(SEED_RUNTIMES)}")
    own_runtime, warning = grid_runtime(grid, name)
    family = seed_runtime(own_runtime)
    memory_max = MAX_MEMORY_MB.get(family, 1024)
    try:
        memory_mb = int(x_memory_mb or (SNAKE_MEMORY_MB if snake else MIN_MEMORY_MB))
    except ValueError:
        memory_mb = -1
    if not MIN_MEMORY_MB <= memory_mb <= memory_max:
        raise HTTPException(
            400,
            f"Invalid memoryMb for {family}. Must be between {MIN_MEMORY_MB} and {memory_max} MB.",
        )
    if file is None:
        raise HTTPException(400, "No file provided")
    source, entry = SEED_SOURCES[family]
    entry = handler or entry
    filename, data = code_files(file.filename or "", await file.read(), family)
    if handler and filename != "package.zip":  # a lone source file is the module its handler names
        filename = entry.rsplit(".", 1)[0].replace(".", "/") + "." + source.rsplit(".", 1)[1]
    # the core takes a lone .py; others as a zip
    if filename != "package.zip" and not filename.endswith(".py"):
        filename, data = "package.zip", build_zip({filename: data})
    seed_id = str(uuid.uuid4())
    form = {
        "name": function_name_of(function_name or x_function_name, file.filename),
        "runtime": own_runtime,
        "handler": entry,
        "kind": "handler",
        "memory": memory_mb,
        "description": description,
        "env": parse_env_vars(envVars),
        "stable_id": seed_id,
        "timeout": seed_timeout(grid, caller, timeout),
        "ai": grid.config.seed_ai,
        "model": modelId,
    }  # as on the seed platform, every function may reach the AI node
    record, _ = await asyncio.to_thread(jobs.deploy, grid, caller, filename, data, form)
    headers = {"Warning": f'299 nanogrid "{warning}"'} if warning else None
    if not snake:
        return JSONResponse({"success": True, "functionId": seed_id}, headers=headers)
    return JSONResponse(
        {
            "function_id": seed_id,
            "function_name": record.function_name,
            "runtime": name,
            "handler": record.handler,
            "s3_key": f"functions/{seed_id}/{record.function_id}.zip",
            "created_at": iso(record.created_at),
        },
        status_code=201,
        headers=headers,
    )


def seed_timeout(grid: Grid, caller: ApiKey, asked: str | None = None) -> float:
    """The original's fixed 300 s (or seed 004's ``timeout`` field), within the grid's and the key's maximum."""
    timeout = SEED_TIMEOUT_S
    if asked not in (None, ""):
        try:
            timeout = float(asked)
        except ValueError:
            timeout = -1
        if not 0 < timeout <= SEED_TIMEOUT_S:
            raise HTTPException(
                400, f"timeout must be 1..{SEED_TIMEOUT_S:g} seconds, not {asked!r}"
            )
    return min(timeout, grid.config.max_timeout_s, caller.max_timeout_s or SEED_TIMEOUT_S)


@router.post("/run")
async def run(
    request: Request, caller: Caller, x_async: Annotated[str | None, Header()] = None
) -> JSONResponse:
    """``{functionId, inputData, modelId}`` answered as the original, or seed 004's ``{function_id, payload}``
    answered in snake_case (``job_id``, ``status: completed|failed``, ``result``, ``output_files``, ...)."""
    grid = grid_of(request)
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        raise HTTPException(
            400, 'the body must be JSON: {"functionId": ..., "inputData": {...}}'
        ) from None
    snake = isinstance(body, dict) and "functionId" not in body and "function_id" in body
    if not isinstance(body, dict) or not body.get("function_id" if snake else "functionId"):
        raise HTTPException(400, "functionId is required")
    seed_id = str(body["function_id" if snake else "functionId"])
    function = (await asyncio.to_thread(current_or_404, grid, caller, seed_id))[0]
    if function.kind != "handler":
        raise HTTPException(
            400,
            f"function {seed_id} was packaged by NanoGrid's Python client; call it with .remote()",
        )
    model = body.get("modelId") if isinstance(body.get("modelId"), str) else None
    event = body.get("payload" if snake else "inputData") or {}
    payloads = jobs.encode_payloads(function, [event], None, grid.config.max_payload_bytes)
    (job,) = jobs.new_jobs(function, payloads, caller.name)
    if snake:
        job.job_id = snake_job_id()
    if (x_async or "").lower() == "true":
        await asyncio.to_thread(jobs.submit, grid, function, [job], model, caller.max_timeout_s)
        if snake:
            return JSONResponse(
                {
                    "job_id": job.job_id,
                    "status": "pending",
                    "message": SNAKE_POLL.format(job.job_id),
                },
                status_code=202,
            )
        return JSONResponse({"status": "ACCEPTED", "jobId": job.job_id}, status_code=202)
    # before queueing: no result slips past
    finished, unsubscribe = jobs.subscribe(grid, [job.job_id])
    try:
        await asyncio.to_thread(jobs.submit, grid, function, [job], model, caller.max_timeout_s)
        done = await jobs.next_result(
            grid, job.job_id, finished, min(function.timeout_s + 30, SYNC_WAIT_S)
        )
    finally:
        unsubscribe()
    if done is None and snake:
        return JSONResponse(
            {"job_id": job.job_id, "status": "running", "message": SNAKE_POLL.format(job.job_id)},
            status_code=202,
        )
    if done is None:
        return JSONResponse(
            {"status": "TIMEOUT", "message": "Processing timed out.", "jobId": job.job_id}
        )
    if snake:
        return JSONResponse(snake_result(done, seed_id, request))
    return JSONResponse(seed_result(done, seed_id))


@router.get("/status/{job_id}")
def status(job_id: str, request: Request, caller: Caller) -> dict[str, Any]:
    """The job in the dialect it was submitted in (its id says which); unfinished or unknown: pending."""
    grid = grid_of(request)
    job = grid.registry.get_job(job_id)
    if job is None or job.owner != caller.name:
        job = None
    function = grid.registry.get_function(job.function_id) if job is not None else None
    seed_id = seed_id_of(function) if function else (job.function_id if job else "")
    if is_snake_job(job_id):
        if job is None or not job.finished:
            return {
                "job_id": job_id,
                "status": "running" if job and job.status == "running" else "pending",
            }
        return snake_result(job, seed_id, request)
    if job is None or not job.finished:
        return {"status": "pending", "message": "Running or not found"}
    return seed_result(job, seed_id)


@router.get("/functions")
def list_functions(request: Request, caller: Caller) -> list[dict[str, Any]]:
    grid = grid_of(request)
    stats: dict[str, list[FunctionStats]] = {}
    for row in grid.registry.function_stats(owner=caller.name):
        stats.setdefault(row.function_id, []).append(row)
    return [
        function_summary(versions, stats)
        for versions in grouped(grid.registry.list_functions(owner=caller.name))
    ]


@router.get("/functions/{function_id}")
def get_function(function_id: str, request: Request, caller: Caller) -> dict[str, Any]:
    versions = current_or_404(grid_of(request), caller, function_id)
    current = versions[0]
    return {
        "id": seed_id_of(current),
        "name": current.function_name,
        "description": current.description,
        "runtime": seed_runtime(current.runtime),
        "memoryMb": current.memory_mib,
        "s3Key": f"functions/{seed_id_of(current)}/{current.function_id}.zip",
        "uploadedAt": iso(versions[-1].created_at),
        "updatedAt": iso(current.created_at),
        "versions": len(versions),
    }


@router.put("/functions/{function_id}")
async def update_function(
    function_id: str,
    request: Request,
    caller: Caller,
    file: Annotated[UploadFile | None, File()] = None,
    description: Annotated[str, Form(max_length=1000)] = "",
    memoryMb: Annotated[str, Form(max_length=16)] = "",  # noqa: N803
    memory: Annotated[str, Form(max_length=16)] = "",
) -> JSONResponse:
    """New code, description or memory: a new version under the same id (runtime, name and envVars stay).

    As form fields (with or without a file), or as the seed UI's JSON body ``{description, memoryMb}``."""
    grid = grid_of(request)
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            raise HTTPException(
                400, 'the body must be JSON: {"description": ..., "memoryMb": 256}'
            ) from None
        if not isinstance(body, dict):
            raise HTTPException(
                400, 'the body must be a JSON object: {"description": ..., "memoryMb": 256}'
            )
        description = str(body.get("description") or "")[:1000]
        memoryMb = "" if body.get("memoryMb") in (None, "") else str(body["memoryMb"])  # noqa: N806
    current = (await asyncio.to_thread(current_or_404, grid, caller, function_id))[0]
    if current.kind != "handler":
        raise HTTPException(
            400,
            f"function {function_id} was packaged by NanoGrid's Python client; redeploy it from there",
        )
    old = await asyncio.to_thread(grid.store.get_package, current.function_id)
    with zipfile.ZipFile(io.BytesIO(old)) as zf:
        files = {name: zf.read(name) for name in zf.namelist()}
    manifest = json.loads(files.pop("manifest.json"))
    if file is not None:
        name, data = code_files(
            file.filename or "", await file.read(), seed_runtime(current.runtime)
        )
        if name != "package.zip":
            files = {name: data}
        else:
            try:
                with zipfile.ZipFile(io.BytesIO(data)) as zf:
                    files = {
                        n: zf.read(n)
                        for n in zf.namelist()
                        if not n.endswith("/") and n != "manifest.json"
                    }
            except zipfile.BadZipFile:
                raise HTTPException(
                    400, "the upload is neither a source file nor a valid zip archive"
                ) from None
    if description:
        manifest["description"] = description
    if memoryMb or memory:
        try:
            manifest["memory"] = int(memoryMb or memory)
        except ValueError:
            raise HTTPException(
                400, f"memoryMb must be a whole number of MB, not {memoryMb or memory!r}"
            ) from None
        family = seed_runtime(current.runtime)
        if not MIN_MEMORY_MB <= manifest["memory"] <= MAX_MEMORY_MB.get(family, 1024):
            raise HTTPException(
                400,
                f"Invalid memoryMb for {family}. Must be between {MIN_MEMORY_MB} and "
                f"{MAX_MEMORY_MB.get(family, 1024)} MB.",
            )
    manifest["stable_id"] = function_id
    files["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    await asyncio.to_thread(jobs.deploy, grid, caller, "package.zip", build_zip(files), {})
    return JSONResponse({"success": True, "functionId": function_id})


@router.delete("/functions/{function_id}")
def delete_function(function_id: str, request: Request, caller: Caller) -> JSONResponse:
    grid = grid_of(request)
    versions = versions_of(grid, caller, function_id)
    if not versions:
        return JSONResponse(
            {"error": "Function not found", "functionId": function_id}, status_code=404
        )
    for version in versions:
        grid.registry.delete_function(version.function_id)
        grid.store.delete_package(version.function_id)
    return JSONResponse({"success": True, "deletedId": function_id})


@router.get("/logs")
def recent_logs(request: Request, caller: Caller) -> list[dict[str, Any]]:
    """The caller's newest finished calls (the original kept a ring buffer of its last 100 log lines)."""
    grid = grid_of(request)
    ids = seed_ids(grid, caller.name)
    finished = [
        job for job in grid.registry.list_jobs(LOG_FEED * 2, None, caller.name) if job.finished
    ][:LOG_FEED]
    entries = []
    for job in finished:
        entry = log_entry(job, ids.get(job.function_id, job.function_id))
        entries.append(
            {
                **entry,
                "level": "INFO" if entry["status"] == "SUCCESS" else "ERROR",
                "msg": f"Function Executed: {entry['functionId']}",
                "exitCode": seed_result(job, "")["exitCode"],
            }
        )
    return entries


def function_jobs(grid: Grid, caller: ApiKey, function_id: str, limit: int) -> list[JobRecord]:
    """The finished calls of every version of a function, newest first (from the caller's newest jobs)."""
    versions = {v.function_id for v in current_or_404(grid, caller, function_id)}
    recent = grid.registry.list_jobs(max(limit, 1000), None, caller.name)
    return [job for job in recent if job.function_id in versions and job.finished][:limit]


@router.get("/functions/{function_id}/logs")
def function_logs(
    function_id: str,
    request: Request,
    caller: Caller,
    limit: int = 1000,
    startTime: str | None = None,
) -> list[dict[str, Any]]:  # noqa: N803
    entries = [
        log_entry(job, function_id)
        for job in function_jobs(grid_of(request), caller, function_id, limit)
    ]
    return [e for e in entries if startTime is None or (e["timestamp"] or "") >= startTime]


@router.get("/functions/{function_id}/logs/{request_id}")
def function_log(
    function_id: str, request_id: str, request: Request, caller: Caller
) -> dict[str, str]:
    grid = grid_of(request)
    job = grid.registry.get_job(request_id)
    versions = {v.function_id for v in current_or_404(grid, caller, function_id)}
    if (
        job is None
        or job.owner != caller.name
        or job.function_id not in versions
        or not job.finished
    ):
        raise HTTPException(404, "Log not found")
    result = seed_result(job, function_id)
    return {"message": job.stderr or result["stdout"] or (result["error"] or "")}
