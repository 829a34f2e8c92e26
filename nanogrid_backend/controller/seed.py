"""The seed platform's HTTP contract (controller.js v2.8), for its UI, BFF, scripts and tests, unchanged.

Mounted twice, at the root and under ``/api``, next to NanoGrid's own API under ``/v1``. Every route here
translates: requests into the same core as ``/v1`` (``jobs.deploy``, ``jobs.submit``, the registry, the same
keys, owners and token buckets), results back into the seed's shapes. Nothing is decided twice.

What differs from ``/v1`` on purpose, because the seed's clients depend on it:
- errors are ``{"error": message}`` (``SeedRoute``), authentication failures ``{"error": "Unauthorized"}``;
- every authenticated route spends a rate-limit token (the original limited only ``/upload`` and ``/run``, which
  let a key poll the others without bound) and says so in ``X-RateLimit-Limit``/``-Remaining``;
- a function id is stable across ``PUT /functions/:id``: each update is a new content-addressed version with
  the same ``stable_id``, so queued calls run the code they were submitted for and the history stays whole;
- ``GET /status/:jobId`` answers 200 ``{"status": "pending"}`` for a job that has not finished *and* for one
  that does not exist (or is another owner's): the seed's clients poll while the status is ``pending``.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import sqlite3
import time
import uuid
import zipfile
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import quote, unquote

import httpx
from fastapi import APIRouter, Depends, File, Form, Header, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanogrid_backend import package_checks as packages
from nanogrid_backend.controller import jobs
from nanogrid_backend.controller.errors import DISK_FULL, disk_full
from nanogrid_backend.controller.function_metrics import render_all
from nanogrid_backend.controller.links import LinkSigner
from nanogrid_backend.controller.ratelimit import TokenBuckets, key_limits
from nanogrid_backend.grid import Grid
from nanogrid_backend.keys import AuthError
from nanogrid_backend.models import COMPLETED, ApiKey, FunctionRecord, JobRecord
from nanogrid_backend.package_checks import PackageError
from nanogrid_backend.registry.base import FunctionStats, RegistryBusy
from nanogrid_backend.secretbox import VARIABLE_PATTERN
from nanogrid_contract import __version__
from nanogrid_contract.packages import build_zip

log = logging.getLogger(__name__)

SEED_VERSION = "v2.8"  # the controller.js version whose contract this is
SEED_RUNTIMES = ("python", "cpp", "nodejs", "go")
MIN_MEMORY_MB = 128
MAX_MEMORY_MB = {"python": 10240}  # others: 1024, as the original validates
SEED_MB_PRICE = 0.00005  # the seed AutoTuner's dollars per MB-hour
SNAKE_MEMORY_MB = 512  # seed 004's executor ran every container with mem_limit='512m'
SEED_TIMEOUT_S = 300.0  # the original's fixed timeoutMs
SYNC_WAIT_S = 290.0  # then {"status": "TIMEOUT"}, as the original
WORKER_TIMEOUT_S = 30.0  # a worker that posted no heartbeat for this long is gone
LOG_FEED = 100  # GET /logs: the newest finished calls, as the original's ring buffer of 100
MESSAGE_PREVIEW = 200
EXIT_CODES = {"timeout": -1, "cancelled": -1, "interrupted": -1, "memory": 137}  # else 1 for a failure
SNAKE_POLL = "Job submitted. Poll GET /status/{} for results."
NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")


class SeedRoute(APIRoute):
    """Errors as the seed's clients read them: ``{"error": message}`` with the fitting status (and headers)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                response = await handler(request)
            except StarletteHTTPException as exc:
                response = seed_error(exc.status_code, str(exc.detail), dict(exc.headers or {}))
            except RequestValidationError as exc:
                problems = "; ".join(f"{'.'.join(map(str, p.get('loc', ())))}: {p.get('msg')}" for p in exc.errors())
                response = seed_error(400, problems or "invalid request")
            except (PackageError, jobs.BadRequest) as exc:
                response = seed_error(exc.status, str(exc))
            except RegistryBusy:
                response = seed_error(503, "the grid's registry is locked by another process; try again in a few "
                                           "seconds", {"Retry-After": "5"})
            except (sqlite3.OperationalError, OSError) as exc:
                if not disk_full(exc):
                    raise
                log.error("%s %s: the disk is full: %s", request.method, request.url.path, exc)
                response = seed_error(507, DISK_FULL)
            for name, value in getattr(request.state, "rate_headers", {}).items():  # set by rate_limited
                response.headers.setdefault(name, value)
            return response

        return route


def seed_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def open_key(request: Request) -> str | None:
    """The local owner's key for a request that presents none, on a grid started with ``nanogrid up --open``
    (loopback only: ``GridConfig.check`` refuses it on any other address); else None.

    Never for a browser's request (it sends ``Origin`` or ``Sec-Fetch-Site``; curl and scripts send neither):
    any web page open on this machine could otherwise post code to the loopback address, or read results
    through a rebound DNS name, as the local owner."""
    state = request.app.state
    if not state.config.open_access or "origin" in request.headers or "sec-fetch-site" in request.headers:
        return None
    return state.grid.api_key


async def seed_caller(request: Request, x_api_key: Annotated[str | None, Header()] = None) -> ApiKey:
    """The seed's auth: the ``x-api-key`` header, any of the grid's keys (its owner's functions and jobs only)."""
    try:
        return request.app.state.authenticator.check(x_api_key or open_key(request))
    except AuthError:
        raise HTTPException(401, "Unauthorized") from None


Authenticated = Annotated[ApiKey, Depends(seed_caller)]


async def rate_limited(request: Request, caller: Authenticated) -> ApiKey:
    """Every authenticated route takes a token from the caller's key's bucket, the same bucket as /v1 (429 when
    empty); the answer carries ``X-RateLimit-Limit``/``-Remaining`` (``SeedRoute`` adds them)."""
    state = request.app.state
    rate, burst = key_limits(caller, state.config)
    try:
        if isinstance(state.buckets, TokenBuckets):  # this process's memory: microseconds, no thread needed
            wait, left = state.buckets.take_counted(caller.key_id, rate, burst)
        else:  # Redis: a network round trip, off the event loop
            wait, left = await asyncio.to_thread(state.buckets.take_counted, caller.key_id, rate, burst)
    except Exception as exc:  # as the original: a broken limiter lets requests through
        log.warning("rate limiter failed, letting the request through: %s", exc)
        return caller
    headers = {"X-RateLimit-Limit": str(burst), "X-RateLimit-Remaining": str(max(0, int(left)))}
    request.state.rate_headers = headers
    if wait:
        raise HTTPException(429, "Too Many Requests (Token Bucket Exhausted)",
                            headers={**headers, "Retry-After": str(max(1, int(wait + 0.999)))})
    return caller


Caller = Annotated[ApiKey, Depends(rate_limited)]
router = APIRouter(route_class=SeedRoute, tags=["seed contract"])


def grid_of(request: Request) -> Grid:
    return request.app.state.grid


def iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


# functions and their versions

def seed_id_of(function: FunctionRecord) -> str:
    return function.stable_id or function.function_id


def versions_of(grid: Grid, caller: ApiKey, seed_id: str) -> list[FunctionRecord]:
    """The caller's versions of a seed function, newest first; [] if it has none (or another owner has it)."""
    if seed_id.startswith("fn-"):  # a NanoGrid function id: itself, plus any versions made by seed updates
        own = grid.registry.get_function(seed_id)
        if own is None or own.owner != caller.name:
            return []
        if not own.stable_id:
            return [f for f in grid.registry.list_functions(owner=caller.name) if seed_id_of(f) == seed_id] or [own]
    return [f for f in grid.registry.list_functions(owner=caller.name) if seed_id_of(f) == seed_id]


def resolve_function(grid: Grid, owner: str, function_id: str) -> FunctionRecord | None:
    """The function any surface means by an id: a NanoGrid id (``fn-...``) as it is, or a seed function's id (the
    uuid ``POST /upload`` answered), meaning its newest version. None if ``owner`` has no such function.

    For the ``/v1`` routes, ``nanogrid loadtest`` and the dashboard, so the seed's id works wherever NanoGrid's does.
    """
    if function_id.startswith("fn-"):
        function = grid.registry.get_function(function_id)
        return function if function is not None and function.owner == owner else None
    return next((f for f in grid.registry.list_functions(owner=owner) if f.stable_id == function_id), None)


def current_or_404(grid: Grid, caller: ApiKey, seed_id: str) -> list[FunctionRecord]:
    versions = versions_of(grid, caller, seed_id)
    if not versions:
        raise HTTPException(404, "Function not found")
    return versions


def seed_runtime(runtime: str) -> str:
    return "python" if runtime.startswith("python") else runtime


def grid_runtime(grid: Grid, runtime: str) -> tuple[str, str | None]:
    """The grid's runtime for a seed runtime name, and a warning when it runs another version than named.

    The bare ``python`` is the grid's own Python; ``python3.9``, ``nodejs18.x``, ``go1.x``: ``packages.seed_runtime``.
    """
    if runtime == "python":
        own = grid.config.python_runtime
        return own if own in grid.runtimes else next((r for r in grid.runtimes if r.startswith("python")), own), None
    return packages.seed_runtime(runtime, grid.runtimes)


def function_summary(versions: list[FunctionRecord], stats: dict[str, list[FunctionStats]]) -> dict[str, Any]:
    """GET /functions's item: the newest version's settings, invocations and averages over every version."""
    current, first = versions[0], versions[-1]
    rows = [row for v in versions for row in stats.get(v.function_id, [])]
    count = sum(row.count for row in rows)
    handler_count = sum(row.handler_count for row in rows)
    return {
        "functionId": seed_id_of(current), "name": current.function_name, "description": current.description,
        "runtime": seed_runtime(current.runtime), "memoryMb": current.memory_mib, "invocations": count,
        "avgDuration": round(sum(row.total_ms for row in rows) / count) if count else 0,
        "avgHandlerDuration": round(sum(row.handler_ms for row in rows) / handler_count, 3) if handler_count else None,
        "uploadedAt": iso(first.created_at), "updatedAt": iso(current.created_at),
    }


def grouped(functions: list[FunctionRecord]) -> list[list[FunctionRecord]]:
    """Handler functions by seed id, each group newest first (list_functions is newest first already)."""
    groups: dict[str, list[FunctionRecord]] = {}
    for function in functions:
        if function.kind == "handler":
            groups.setdefault(seed_id_of(function), []).append(function)
    return list(groups.values())


# Each seed runtime's source file (as the seed's UI zips its editor) and handler: the UI's templates define them.
SEED_SOURCES = {"python": ("main.py", "main.handler"), "nodejs": ("index.js", "index.handler"),
                "go": ("main.go", "main.Handler"), "cpp": ("main.cpp", "main.handler")}


def code_files(filename: str, data: bytes, runtime: str = "python") -> tuple[str, bytes]:
    """The seed's upload as (name, bytes) for the core: a zip as it is, a lone source file as the runtime's
    source file (main.py, index.js, main.go, main.cpp)."""
    if data[:4] == b"PK\x03\x04" or filename.endswith(".zip"):
        return "package.zip", data
    return SEED_SOURCES.get(runtime, SEED_SOURCES["python"])[0], data


def function_name_of(header: str | None, filename: str | None) -> str:
    """x-function-name (URL-encoded by the seed's UI), else the file name, as a NanoGrid name (1-64 safe characters)."""
    raw = unquote(header) if header else (filename or "function").rsplit(".", 1)[0]
    return NAME_CHARS.sub("-", raw).strip("-._")[:64] or "function"


def parse_env_vars(text: str) -> dict[str, str]:
    if not text.strip():
        return {}
    try:
        values = json.loads(text)
    except ValueError:
        raise HTTPException(400, "envVars must be a JSON object, e.g. {\"API_URL\": \"https://...\"}") from None
    if not isinstance(values, dict):
        raise HTTPException(400, "envVars must be a JSON object of NAME: value")
    for key in values:
        if not VARIABLE_PATTERN.match(str(key)):
            raise HTTPException(400, f"envVars: {key!r} is not an environment variable name")
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}


# results

def seed_result(job: JobRecord, seed_id: str) -> dict[str, Any]:
    """A finished job as the seed's worker reported it (models.py ExecutionResult), plus the value as ``result``.

    The original's runner printed the handler's return value as JSON on stdout, so its clients read the
    value there: ``stdout`` is what the function printed, then that JSON line.
    """
    completed = job.status == COMPLETED
    value = json.loads(job.result) if completed and job.result is not None and job.result_format == "json" else None
    error = job.error or {}
    stdout = job.stdout + (json.dumps(value) + "\n" if completed else "")
    stderr = job.stderr
    if not completed:
        stderr += error.get("traceback") or f"{error.get('message', job.status)}\n"
    total_ms = (job.finished_at - job.started_at) * 1000 if job.finished_at and job.started_at else None
    tokens = sum(v for k, v in (job.ai_usage or {}).items() if k.endswith("tokens") and isinstance(v, int))
    return {
        "requestId": job.job_id, "jobId": job.job_id, "functionId": seed_id,
        "status": "SUCCESS" if completed else "FAILED",
        "exitCode": 0 if completed else EXIT_CODES.get(error.get("kind", ""), 1),
        "stdout": stdout, "stderr": stderr, "result": value,
        "error": None if completed else error.get("message", job.status),
        "durationMs": round(total_ms if total_ms is not None else job.execution_time_ms or 0),
        "handlerDurationMs": job.execution_time_ms, "peakMemoryBytes": job.peak_memory_bytes,
        "allocatedMemoryMb": job.memory_limit_mib, "outputFiles": [f["name"] for f in job.output_files],
        "workerId": job.worker_id, "llm_token_count": tokens, **run_tip(job),
    }


def run_tip(job: JobRecord) -> dict[str, Any]:
    """The seed worker's per-run AutoTuner (metrics_collector.py): this run's peak against its memory.

    Below 30 % of it: "Resource Waste", twice the peak; above 85 %: "Memory Risk", 1.2 times the peak; savings
    are the difference in MB at $0.00005 per MB-month-hour, 730 hours a month, as the original priced it. The
    recommendation is at least the seed's minimum of 128 MB (its "Apply" sends it back as ``PUT memoryMb``).
    ``GET /functions/:id/auto-tuner`` advises from every call instead (NanoGrid's AutoTuner).
    """
    peak, allocated = job.peak_memory_bytes, job.memory_limit_mib
    none = {"optimizationTip": None, "recommendedMemoryMb": None, "estimatedSavings": None}
    if not peak or not allocated:
        return none
    peak_mb = peak / 1048576
    ratio = peak_mb / allocated
    if ratio < 0.3:
        recommended = max(MIN_MEMORY_MB, round(2 * peak_mb))
        tip = (f"Resource Waste: this run peaked at {peak_mb:.0f} MB of {allocated} MB ({ratio:.0%}); "
               f"{recommended} MB would do")
    elif ratio > 0.85:
        recommended = max(MIN_MEMORY_MB, round(1.2 * peak_mb))
        tip = f"Memory Risk: this run peaked at {peak_mb:.0f} MB of {allocated} MB ({ratio:.0%}); give it {recommended} MB"
    else:
        return none
    if recommended == allocated:
        return none
    savings = round((allocated - recommended) * SEED_MB_PRICE * 730, 4)
    return {"optimizationTip": tip, "recommendedMemoryMb": recommended, "estimatedSavings": savings}


def snake_job_id() -> str:
    """A job id of seed 004's dialect: ``job-`` and a dashed uuid (the native ids are ``job-`` and 32 hex digits).

    The id itself says which dialect a job was submitted in, so ``GET /status/:job_id`` answers in it on every
    controller and after restarts, with nothing more stored."""
    return f"job-{uuid.uuid4()}"


def is_snake_job(job_id: str) -> bool:
    return job_id.count("-") == 5 and job_id.startswith("job-")


def snake_result(job: JobRecord, seed_id: str, request: Request) -> dict[str, Any]:
    """A finished job as seed 004's worker published it: ``{job_id, status, result, output_files, ...}``.

    ``output_files`` are URLs (the seed's were S3 URLs): signed links to the grid's copies, as ``/v1`` gives them.
    """
    completed = job.status == COMPLETED
    value = json.loads(job.result) if completed and job.result is not None and job.result_format == "json" else None
    total_ms = (job.finished_at - job.started_at) * 1000 if job.finished_at and job.started_at else None
    base, owner = str(request.base_url).rstrip("/"), job.owner
    links = LinkSigner(grid_of(request).secrets.link_key)
    answer: dict[str, Any] = {
        "job_id": job.job_id, "function_id": seed_id, "status": "completed" if completed else "failed",
        "result": value,
        "output_files": [f"{base}/v1/jobs/{job.job_id}/outputs/{quote(f['name'])}?"
                         + links.query(job.job_id, f["name"], owner) for f in job.output_files],
        "execution_time_ms": round(total_ms if total_ms is not None else job.execution_time_ms or 0),
        "logs": job.stdout + job.stderr,
    }
    if not completed:
        answer["error"] = (job.error or {}).get("message", job.status)
    return answer


def log_entry(job: JobRecord, seed_id: str) -> dict[str, Any]:
    result = seed_result(job, seed_id)
    message = job.stderr or result["stdout"] or (result["error"] or "")  # nothing printed: the value's JSON line
    return {
        "id": job.job_id, "requestId": job.job_id, "timestamp": iso(job.finished_at), "status": result["status"],
        "duration": result["durationMs"], "handlerDurationMs": job.execution_time_ms,
        "memory": round((job.peak_memory_bytes or 0) / 1048576), "functionId": seed_id,
        "message": message[:MESSAGE_PREVIEW] + ("..." if len(message) > MESSAGE_PREVIEW else ""),
    }


def seed_ids(grid: Grid, owner: str) -> dict[str, str]:
    return {f.function_id: seed_id_of(f) for f in grid.registry.list_functions(owner=owner)}


# routes

@router.get("/", summary="discovery")
def discovery(request: Request) -> dict[str, Any]:
    return {"service": "FaaS Controller API (NanoGrid)", "version": SEED_VERSION, "nanogrid": __version__,
            "status": "OK" if healthy(grid_of(request)) else "ERROR",
            "endpoints": {"health": "/health", "metrics": "/metrics", "functions": "/api/functions",
                          "workers": "/api/workers", "nanogrid_api": "/v1", "openapi": "/openapi.json"},
            "authentication": "Protected endpoints require the x-api-key header."}


def healthy(grid: Grid) -> bool:
    redis = getattr(grid.bus, "redis", None)
    if redis is None:
        return True
    try:
        return bool(redis.ping())
    except Exception:
        return False


@router.get("/health")
def health(request: Request) -> JSONResponse:
    ok = healthy(grid_of(request))
    return JSONResponse({"status": "OK" if ok else "ERROR", "version": SEED_VERSION}, status_code=200 if ok else 503)


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(request: Request) -> PlainTextResponse:
    return PlainTextResponse(render_all(request, grid_of(request)), media_type="text/plain; version=0.0.4")


@router.post("/upload")
async def upload(
    request: Request, caller: Caller,
    file: Annotated[UploadFile | None, File()] = None,
    description: Annotated[str, Form(max_length=1000)] = "",
    envVars: Annotated[str, Form(max_length=65536)] = "",  # noqa: N803  (the seed's field name)
    function_name: Annotated[str | None, Form(max_length=200)] = None,  # seed 004's snake_case fields
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
    snake = function_name is not None or handler is not None or (runtime is not None and x_runtime is None)
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
        raise HTTPException(400, f"Invalid memoryMb for {family}. Must be between {MIN_MEMORY_MB} and {memory_max} MB.")
    if file is None:
        raise HTTPException(400, "No file provided")
    source, entry = SEED_SOURCES[family]
    entry = handler or entry
    filename, data = code_files(file.filename or "", await file.read(), family)
    if handler and filename != "package.zip":  # a lone source file is the module its handler names
        filename = entry.rsplit(".", 1)[0].replace(".", "/") + "." + source.rsplit(".", 1)[1]
    if filename != "package.zip" and not filename.endswith(".py"):  # the core takes a lone .py; others as a zip
        filename, data = "package.zip", build_zip({filename: data})
    seed_id = str(uuid.uuid4())
    form = {"name": function_name_of(function_name or x_function_name, file.filename), "runtime": own_runtime,
            "handler": entry, "kind": "handler", "memory": memory_mb, "description": description,
            "env": parse_env_vars(envVars), "stable_id": seed_id,
            "timeout": seed_timeout(grid, caller, timeout),
            "ai": grid.config.seed_ai, "model": modelId}  # as on the seed platform, every function may reach the AI node
    record, _ = await asyncio.to_thread(jobs.deploy, grid, caller, filename, data, form)
    headers = {"Warning": f'299 nanogrid "{warning}"'} if warning else None
    if not snake:
        return JSONResponse({"success": True, "functionId": seed_id}, headers=headers)
    return JSONResponse({"function_id": seed_id, "function_name": record.function_name, "runtime": name,
                         "handler": record.handler, "s3_key": f"functions/{seed_id}/{record.function_id}.zip",
                         "created_at": iso(record.created_at)}, status_code=201, headers=headers)


def seed_timeout(grid: Grid, caller: ApiKey, asked: str | None = None) -> float:
    """The original's fixed 300 s (or seed 004's ``timeout`` field), within the grid's and the key's maximum."""
    timeout = SEED_TIMEOUT_S
    if asked not in (None, ""):
        try:
            timeout = float(asked)
        except ValueError:
            timeout = -1
        if not 0 < timeout <= SEED_TIMEOUT_S:
            raise HTTPException(400, f"timeout must be 1..{SEED_TIMEOUT_S:g} seconds, not {asked!r}")
    return min(timeout, grid.config.max_timeout_s, caller.max_timeout_s or SEED_TIMEOUT_S)


@router.post("/run")
async def run(request: Request, caller: Caller, x_async: Annotated[str | None, Header()] = None) -> JSONResponse:
    """``{functionId, inputData, modelId}`` answered as the original, or seed 004's ``{function_id, payload}``
    answered in snake_case (``job_id``, ``status: completed|failed``, ``result``, ``output_files``, ...)."""
    grid = grid_of(request)
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        raise HTTPException(400, "the body must be JSON: {\"functionId\": ..., \"inputData\": {...}}") from None
    snake = isinstance(body, dict) and "functionId" not in body and "function_id" in body
    if not isinstance(body, dict) or not body.get("function_id" if snake else "functionId"):
        raise HTTPException(400, "functionId is required")
    seed_id = str(body["function_id" if snake else "functionId"])
    function = (await asyncio.to_thread(current_or_404, grid, caller, seed_id))[0]
    if function.kind != "handler":
        raise HTTPException(400, f"function {seed_id} was packaged by NanoGrid's Python client; call it with .remote()")
    model = body.get("modelId") if isinstance(body.get("modelId"), str) else None
    event = body.get("payload" if snake else "inputData") or {}
    payloads = jobs.encode_payloads(function, [event], None, grid.config.max_payload_bytes)
    (job,) = jobs.new_jobs(function, payloads, caller.name)
    if snake:
        job.job_id = snake_job_id()
    if (x_async or "").lower() == "true":
        await asyncio.to_thread(jobs.submit, grid, function, [job], model, caller.max_timeout_s)
        if snake:
            return JSONResponse({"job_id": job.job_id, "status": "pending", "message": SNAKE_POLL.format(job.job_id)},
                                status_code=202)
        return JSONResponse({"status": "ACCEPTED", "jobId": job.job_id}, status_code=202)
    finished, unsubscribe = jobs.subscribe(grid, [job.job_id])  # before queueing: no result slips past
    try:
        await asyncio.to_thread(jobs.submit, grid, function, [job], model, caller.max_timeout_s)
        done = await jobs.next_result(grid, job.job_id, finished, min(function.timeout_s + 30, SYNC_WAIT_S))
    finally:
        unsubscribe()
    if done is None and snake:
        return JSONResponse({"job_id": job.job_id, "status": "running", "message": SNAKE_POLL.format(job.job_id)},
                            status_code=202)
    if done is None:
        return JSONResponse({"status": "TIMEOUT", "message": "Processing timed out.", "jobId": job.job_id})
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
            return {"job_id": job_id, "status": "running" if job and job.status == "running" else "pending"}
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
    return [function_summary(versions, stats) for versions in grouped(grid.registry.list_functions(owner=caller.name))]


@router.get("/functions/{function_id}")
def get_function(function_id: str, request: Request, caller: Caller) -> dict[str, Any]:
    versions = current_or_404(grid_of(request), caller, function_id)
    current = versions[0]
    return {"id": seed_id_of(current), "name": current.function_name, "description": current.description,
            "runtime": seed_runtime(current.runtime), "memoryMb": current.memory_mib,
            "s3Key": f"functions/{seed_id_of(current)}/{current.function_id}.zip",
            "uploadedAt": iso(versions[-1].created_at), "updatedAt": iso(current.created_at),
            "versions": len(versions)}


@router.put("/functions/{function_id}")
async def update_function(
    function_id: str, request: Request, caller: Caller,
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
            raise HTTPException(400, "the body must be JSON: {\"description\": ..., \"memoryMb\": 256}") from None
        if not isinstance(body, dict):
            raise HTTPException(400, "the body must be a JSON object: {\"description\": ..., \"memoryMb\": 256}")
        description = str(body.get("description") or "")[:1000]
        memoryMb = "" if body.get("memoryMb") in (None, "") else str(body["memoryMb"])  # noqa: N806
    current = (await asyncio.to_thread(current_or_404, grid, caller, function_id))[0]
    if current.kind != "handler":
        raise HTTPException(400, f"function {function_id} was packaged by NanoGrid's Python client; redeploy it from there")
    old = await asyncio.to_thread(grid.store.get_package, current.function_id)
    with zipfile.ZipFile(io.BytesIO(old)) as zf:
        files = {name: zf.read(name) for name in zf.namelist()}
    manifest = json.loads(files.pop("manifest.json"))
    if file is not None:
        name, data = code_files(file.filename or "", await file.read(), seed_runtime(current.runtime))
        if name != "package.zip":
            files = {name: data}
        else:
            try:
                with zipfile.ZipFile(io.BytesIO(data)) as zf:
                    files = {n: zf.read(n) for n in zf.namelist() if not n.endswith("/") and n != "manifest.json"}
            except zipfile.BadZipFile:
                raise HTTPException(400, "the upload is neither a source file nor a valid zip archive") from None
    if description:
        manifest["description"] = description
    if memoryMb or memory:
        try:
            manifest["memory"] = int(memoryMb or memory)
        except ValueError:
            raise HTTPException(400, f"memoryMb must be a whole number of MB, not {memoryMb or memory!r}") from None
        family = seed_runtime(current.runtime)
        if not MIN_MEMORY_MB <= manifest["memory"] <= MAX_MEMORY_MB.get(family, 1024):
            raise HTTPException(400, f"Invalid memoryMb for {family}. Must be between {MIN_MEMORY_MB} and "
                                     f"{MAX_MEMORY_MB.get(family, 1024)} MB.")
    manifest["stable_id"] = function_id
    files["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    await asyncio.to_thread(jobs.deploy, grid, caller, "package.zip", build_zip(files), {})
    return JSONResponse({"success": True, "functionId": function_id})


@router.delete("/functions/{function_id}")
def delete_function(function_id: str, request: Request, caller: Caller) -> JSONResponse:
    grid = grid_of(request)
    versions = versions_of(grid, caller, function_id)
    if not versions:
        return JSONResponse({"error": "Function not found", "functionId": function_id}, status_code=404)
    for version in versions:
        grid.registry.delete_function(version.function_id)
        grid.store.delete_package(version.function_id)
    return JSONResponse({"success": True, "deletedId": function_id})


@router.get("/logs")
def recent_logs(request: Request, caller: Caller) -> list[dict[str, Any]]:
    """The caller's newest finished calls (the original kept a ring buffer of its last 100 log lines)."""
    grid = grid_of(request)
    ids = seed_ids(grid, caller.name)
    finished = [job for job in grid.registry.list_jobs(LOG_FEED * 2, None, caller.name) if job.finished][:LOG_FEED]
    entries = []
    for job in finished:
        entry = log_entry(job, ids.get(job.function_id, job.function_id))
        entries.append({**entry, "level": "INFO" if entry["status"] == "SUCCESS" else "ERROR",
                        "msg": f"Function Executed: {entry['functionId']}", "exitCode": seed_result(job, "")["exitCode"]})
    return entries


def function_jobs(grid: Grid, caller: ApiKey, function_id: str, limit: int) -> list[JobRecord]:
    """The finished calls of every version of a function, newest first (from the caller's newest jobs)."""
    versions = {v.function_id for v in current_or_404(grid, caller, function_id)}
    recent = grid.registry.list_jobs(max(limit, 1000), None, caller.name)
    return [job for job in recent if job.function_id in versions and job.finished][:limit]


@router.get("/functions/{function_id}/logs")
def function_logs(function_id: str, request: Request, caller: Caller, limit: int = 1000,
                  startTime: str | None = None) -> list[dict[str, Any]]:  # noqa: N803
    entries = [log_entry(job, function_id) for job in function_jobs(grid_of(request), caller, function_id, limit)]
    return [e for e in entries if startTime is None or (e["timestamp"] or "") >= startTime]


@router.get("/functions/{function_id}/logs/{request_id}")
def function_log(function_id: str, request_id: str, request: Request, caller: Caller) -> dict[str, str]:
    grid = grid_of(request)
    job = grid.registry.get_job(request_id)
    versions = {v.function_id for v in current_or_404(grid, caller, function_id)}
    if job is None or job.owner != caller.name or job.function_id not in versions or not job.finished:
        raise HTTPException(404, "Log not found")
    result = seed_result(job, function_id)
    return {"message": job.stderr or result["stdout"] or (result["error"] or "")}


@router.post("/worker/heartbeat")
async def heartbeat(request: Request, caller: Caller) -> dict[str, bool]:
    """A seed worker's heartbeat (the original's NAT-free health check); kept in this controller's memory."""
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        raise HTTPException(400, "the body must be JSON") from None
    if not isinstance(body, dict) or not body.get("workerId"):
        raise HTTPException(400, "workerId is required")
    request.app.state.seed_workers[str(body["workerId"])] = {
        "workerId": str(body["workerId"]), "status": str(body.get("status") or "healthy"),
        "pools": body.get("pools") if isinstance(body.get("pools"), dict) else {},
        "activeJobs": int(body.get("activeJobs") or 0), "uptimeSeconds": float(body.get("uptimeSeconds") or 0),
        "lastSeen": time.time(), "receivedAt": iso(time.time()), "owner": caller.name,
    }
    return {"ok": True}


def seed_workers(request: Request) -> list[dict[str, Any]]:
    """Heartbeats posted here, and the grid's own workers (their capacity and warm sandboxes, never whose)."""
    now = time.time()
    posted: dict[str, dict] = request.app.state.seed_workers
    for worker_id in [w for w, data in posted.items() if now - data["lastSeen"] > WORKER_TIMEOUT_S]:
        posted.pop(worker_id, None)
    workers = [{k: v for k, v in data.items() if k != "owner"} for data in list(posted.values())]
    started = request.app.state.started_at
    grid = grid_of(request)
    for info in jobs.live_workers(grid):
        workers.append({"workerId": info["worker_id"], "status": "healthy", "pools": pools_by_runtime(grid, info),
                        "activeJobs": int(info.get("running", 0)), "uptimeSeconds": round(now - started),
                        "lastSeen": now, "receivedAt": iso(now)})
    for worker in workers:
        age = now - worker["lastSeen"]
        worker["healthStatus"] = "healthy" if age < WORKER_TIMEOUT_S else "unhealthy"
        worker["lastSeenAgo"] = f"{round(age)}s"
        worker["lastSeen"] = round(worker["lastSeen"] * 1000)  # milliseconds, as Date.now()
    return workers


def pools_by_runtime(grid: Grid, info: dict[str, Any]) -> dict[str, int]:
    """A worker's warm sandboxes (stem cells and idle ones) by seed runtime: a stem cell by its environment
    (``runtime-nodejs``, ``runtime-go``, ``runtime-cpp``; any other is Python's), an idle one by its function's."""
    pool = info.get("pool", {})
    pools = {runtime: 0 for runtime in SEED_RUNTIMES}
    by_environment = pool.get("stem_cells_by_environment", {})
    for env_id, count in by_environment.items():
        pools[next((r for r in SEED_RUNTIMES if env_id == f"runtime-{r}"), "python")] += int(count)
    pools["python"] += int(pool.get("stem_cells", 0)) - sum(int(n) for n in by_environment.values())
    for function_id, count in pool.get("idle_by_function", {}).items():
        function = grid.registry.get_function(function_id)
        pools[seed_runtime(function.runtime) if function else "python"] += int(count)
    return pools


@router.get("/workers")
@router.get("/worker/status")
def workers(request: Request, caller: Caller) -> dict[str, Any]:
    found = seed_workers(request)
    return {"totalWorkers": len(found), "healthyWorkers": sum(w["healthStatus"] == "healthy" for w in found),
            "workers": found}


@router.get("/system/status")
def system_status(request: Request, caller: Caller) -> dict[str, Any]:
    found = [w for w in seed_workers(request) if w["healthStatus"] == "healthy"]
    pools = {runtime: 0 for runtime in SEED_RUNTIMES}
    for worker in found:
        for runtime in pools:
            pools[runtime] += int(worker["pools"].get(runtime, 0) or 0)
    if not found:
        return {"pools": pools, "active_jobs": 0, "status": "offline"}
    return {"status": "online", "worker_count": len(found), "active_jobs": sum(w["activeJobs"] for w in found),
            "pools": pools, "uptime_seconds": max(w["uptimeSeconds"] for w in found), "timestamp": time.time()}


@router.get("/models")
async def models(request: Request, caller: Caller) -> dict[str, Any]:
    """The AI node's models (2 s timeout); the default model as a fallback, as the original."""
    config = grid_of(request).config
    default = config.ai_model or "llama3:8b"
    try:
        if not config.ai_endpoint:
            raise httpx.ConnectError("this grid has no AI node (--ai-endpoint)")
        async with httpx.AsyncClient(timeout=2) as http:
            response = await http.get(f"{config.ai_endpoint.rstrip('/')}/api/tags")
            response.raise_for_status()
        return {"models": [{"id": m.get("name"), "name": m.get("name"), "size": m.get("size"),
                            "details": m.get("details") or {}, "status": "available"}
                           for m in response.json().get("models", [])]}
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        log.info("model catalog: %s", exc)
        return {"models": [{"id": default, "name": f"{default} (Default)", "status": "fallback", "details": {}}],
                "warning": "Could not fetch dynamic model list from AI Node. showing default."}

