"""The seed platform's dialect, shared by its routes beside this module.

Its errors (``SeedRoute``), keys and rate limits, function ids and versions, and the shapes its clients read."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import uuid
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import quote, unquote

from fastapi import Depends, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanogrid_backend import package_checks as packages
from nanogrid_backend.controller import jobs
from nanogrid_backend.controller.errors import DISK_FULL, disk_full
from nanogrid_backend.controller.links import LinkSigner
from nanogrid_backend.controller.ratelimit import key_limits
from nanogrid_backend.controller.routes.deps import open_key
from nanogrid_backend.grid import Grid
from nanogrid_backend.keys import AuthError
from nanogrid_backend.models import COMPLETED, ApiKey, FunctionRecord, JobRecord
from nanogrid_backend.package_checks import PackageError
from nanogrid_backend.registry.base import FunctionStats, RegistryBusy
from nanogrid_backend.secretbox import VARIABLE_PATTERN

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
EXIT_CODES = {
    "timeout": -1,
    "cancelled": -1,
    "interrupted": -1,
    "memory": 137,
}  # else 1 for a failure
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
                problems = "; ".join(
                    f"{'.'.join(map(str, p.get('loc', ())))}: {p.get('msg')}" for p in exc.errors()
                )
                response = seed_error(400, problems or "invalid request")
            except (PackageError, jobs.BadRequest) as exc:
                response = seed_error(exc.status, str(exc))
            except RegistryBusy:
                response = seed_error(
                    503,
                    "the grid's registry is locked by another process; try again in a few seconds",
                    {"Retry-After": "5"},
                )
            except (sqlite3.OperationalError, OSError) as exc:
                if not disk_full(exc):
                    raise
                log.error("%s %s: the disk is full: %s", request.method, request.url.path, exc)
                response = seed_error(507, DISK_FULL)
            # set by rate_limited
            for name, value in getattr(request.state, "rate_headers", {}).items():
                response.headers.setdefault(name, value)
            return response

        return route


def seed_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def seed_caller(
    request: Request, x_api_key: Annotated[str | None, Header()] = None
) -> ApiKey:
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
        if state.buckets_in_process:  # this process's memory: microseconds, no thread needed
            wait, left = state.buckets.take_counted(caller.key_id, rate, burst)
        else:  # Redis: a network round trip, off the event loop
            wait, left = await asyncio.to_thread(
                state.buckets.take_counted, caller.key_id, rate, burst
            )
    except Exception as exc:  # as the original: a broken limiter lets requests through
        log.warning("rate limiter failed, letting the request through: %s", exc)
        return caller
    headers = {"X-RateLimit-Limit": str(burst), "X-RateLimit-Remaining": str(max(0, int(left)))}
    request.state.rate_headers = headers
    if wait:
        raise HTTPException(
            429,
            "Too Many Requests (Token Bucket Exhausted)",
            headers={**headers, "Retry-After": str(max(1, int(wait + 0.999)))},
        )
    return caller


Caller = Annotated[ApiKey, Depends(rate_limited)]


def iso(timestamp: float | None) -> str | None:
    return (
        None
        if timestamp is None
        else datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")
    )


# functions and their versions


def seed_id_of(function: FunctionRecord) -> str:
    return function.stable_id or function.function_id


def versions_of(grid: Grid, caller: ApiKey, seed_id: str) -> list[FunctionRecord]:
    """The caller's versions of a seed function, newest first; [] if it has none (or another owner has it)."""
    # a NanoGrid function id: itself, plus any versions made by seed updates
    if seed_id.startswith("fn-"):
        own = grid.registry.get_function(seed_id)
        if own is None or own.owner != caller.name:
            return []
        if not own.stable_id:
            return [
                f
                for f in grid.registry.list_functions(owner=caller.name)
                if seed_id_of(f) == seed_id
            ] or [own]
    return [f for f in grid.registry.list_functions(owner=caller.name) if seed_id_of(f) == seed_id]


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
        return own if own in grid.runtimes else next(
            (r for r in grid.runtimes if r.startswith("python")), own
        ), None
    return packages.seed_runtime(runtime, grid.runtimes)


def function_summary(
    versions: list[FunctionRecord], stats: dict[str, list[FunctionStats]]
) -> dict[str, Any]:
    """GET /functions's item: the newest version's settings, invocations and averages over every version."""
    current, first = versions[0], versions[-1]
    rows = [row for v in versions for row in stats.get(v.function_id, [])]
    count = sum(row.count for row in rows)
    handler_count = sum(row.handler_count for row in rows)
    return {
        "functionId": seed_id_of(current),
        "name": current.function_name,
        "description": current.description,
        "runtime": seed_runtime(current.runtime),
        "memoryMb": current.memory_mib,
        "invocations": count,
        "avgDuration": round(sum(row.total_ms for row in rows) / count) if count else 0,
        "avgHandlerDuration": round(sum(row.handler_ms for row in rows) / handler_count, 3)
        if handler_count
        else None,
        "uploadedAt": iso(first.created_at),
        "updatedAt": iso(current.created_at),
    }


def grouped(functions: list[FunctionRecord]) -> list[list[FunctionRecord]]:
    """Handler functions by seed id, each group newest first (list_functions is newest first already)."""
    groups: dict[str, list[FunctionRecord]] = {}
    for function in functions:
        if function.kind == "handler":
            groups.setdefault(seed_id_of(function), []).append(function)
    return list(groups.values())


# Each seed runtime's source file (as the seed's UI zips its editor) and handler: the UI's templates define them.
SEED_SOURCES = {
    "python": ("main.py", "main.handler"),
    "nodejs": ("index.js", "index.handler"),
    "go": ("main.go", "main.Handler"),
    "cpp": ("main.cpp", "main.handler"),
}


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
        raise HTTPException(
            400, 'envVars must be a JSON object, e.g. {"API_URL": "https://..."}'
        ) from None
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
    value = (
        json.loads(job.result)
        if completed and job.result is not None and job.result_format == "json"
        else None
    )
    error = job.error or {}
    stdout = job.stdout + (json.dumps(value) + "\n" if completed else "")
    stderr = job.stderr
    if not completed:
        stderr += error.get("traceback") or f"{error.get('message', job.status)}\n"
    total_ms = (
        (job.finished_at - job.started_at) * 1000 if job.finished_at and job.started_at else None
    )
    tokens = sum(
        v for k, v in (job.ai_usage or {}).items() if k.endswith("tokens") and isinstance(v, int)
    )
    return {
        "requestId": job.job_id,
        "jobId": job.job_id,
        "functionId": seed_id,
        "status": "SUCCESS" if completed else "FAILED",
        "exitCode": 0 if completed else EXIT_CODES.get(error.get("kind", ""), 1),
        "stdout": stdout,
        "stderr": stderr,
        "result": value,
        "error": None if completed else error.get("message", job.status),
        "durationMs": round(total_ms if total_ms is not None else job.execution_time_ms or 0),
        "handlerDurationMs": job.execution_time_ms,
        "peakMemoryBytes": job.peak_memory_bytes,
        "allocatedMemoryMb": job.memory_limit_mib,
        "outputFiles": [f["name"] for f in job.output_files],
        "workerId": job.worker_id,
        "llm_token_count": tokens,
        **run_tip(job),
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
        tip = (
            f"Resource Waste: this run peaked at {peak_mb:.0f} MB of {allocated} MB ({ratio:.0%}); "
            f"{recommended} MB would do"
        )
    elif ratio > 0.85:
        recommended = max(MIN_MEMORY_MB, round(1.2 * peak_mb))
        tip = (
            f"Memory Risk: this run peaked at {peak_mb:.0f} MB of {allocated} MB ({ratio:.0%}); "
            f"give it {recommended} MB"
        )
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
    value = (
        json.loads(job.result)
        if completed and job.result is not None and job.result_format == "json"
        else None
    )
    total_ms = (
        (job.finished_at - job.started_at) * 1000 if job.finished_at and job.started_at else None
    )
    base, owner = str(request.base_url).rstrip("/"), job.owner
    links: LinkSigner = request.app.state.links  # the app's one signer, as /v1 signs them
    answer: dict[str, Any] = {
        "job_id": job.job_id,
        "function_id": seed_id,
        "status": "completed" if completed else "failed",
        "result": value,
        "output_files": [
            f"{base}/v1/jobs/{job.job_id}/outputs/{quote(f['name'])}?"
            + links.query(job.job_id, f["name"], owner)
            for f in job.output_files
        ],
        "execution_time_ms": round(
            total_ms if total_ms is not None else job.execution_time_ms or 0
        ),
        "logs": job.stdout + job.stderr,
    }
    if not completed:
        answer["error"] = (job.error or {}).get("message", job.status)
    return answer


def log_entry(job: JobRecord, seed_id: str) -> dict[str, Any]:
    result = seed_result(job, seed_id)
    # nothing printed: the value's JSON line
    message = job.stderr or result["stdout"] or (result["error"] or "")
    return {
        "id": job.job_id,
        "requestId": job.job_id,
        "timestamp": iso(job.finished_at),
        "status": result["status"],
        "duration": result["durationMs"],
        "handlerDurationMs": job.execution_time_ms,
        "memory": round((job.peak_memory_bytes or 0) / 1048576),
        "functionId": seed_id,
        "message": message[:MESSAGE_PREVIEW] + ("..." if len(message) > MESSAGE_PREVIEW else ""),
    }


def seed_ids(grid: Grid, owner: str) -> dict[str, str]:
    return {f.function_id: seed_id_of(f) for f in grid.registry.list_functions(owner=owner)}
