"""HTTP routes. Thin: each one validates, calls into ``jobs`` or the registry, and shapes the reply."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Literal

import httpx
from fastapi import Depends, FastAPI, File, Form, Header, HTTPException, Query, Request, Security, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from nanogrid_backend.controller import (
    blobs,
    history,
    jobs,
    schedule_routes,
    secret_routes,
    seed,
    seed_operations,
    volume_routes,
)
from nanogrid_backend.controller.errors import install_error_handlers
from nanogrid_backend.controller.function_metrics import RequestDurations, render_all
from nanogrid_backend.controller.limits import RequestGate
from nanogrid_backend.controller.links import LinkSigner
from nanogrid_backend.controller.outputs import output_response
from nanogrid_backend.controller.ratelimit import TokenBuckets, retry_after_header
from nanogrid_backend.controller.schemas import (
    Cancelled,
    CancelRequest,
    Deleted,
    ErrorDetail,
    FunctionView,
    Health,
    JobView,
    LiveLog,
    MapRequest,
    Models,
    RunRequest,
    SystemStatus,
)
from nanogrid_backend.grid import Grid
from nanogrid_backend.health import problems as grid_problems
from nanogrid_backend.keys import Authenticator, AuthError
from nanogrid_backend.models import ApiKey, FunctionRecord, JobRecord
from nanogrid_backend.results.redis import RedisResultBus, RedisTokenBuckets
from nanogrid_backend.store.blobs import blobs_of
from nanogrid_contract import __version__

SYNC_WAIT_CAP_S = 60.0  # a sync /run answers 202 after this; the client then polls /status


async def authorize(
    request: Request,
    x_api_key: Annotated[str | None, Security(APIKeyHeader(name="x-api-key", auto_error=False))] = None,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(HTTPBearer(auto_error=False))] = None,
) -> ApiKey:
    """Every route but /health: a valid key, within its rate limit."""
    state = request.app.state
    try:
        key = state.authenticator.check(x_api_key or (bearer.credentials if bearer else None) or seed.open_key(request))
    except AuthError as exc:
        raise HTTPException(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from None
    rate = state.config.rate_limit if key.rate_limit is None else key.rate_limit
    wait = state.buckets.take(key.key_id, rate, key.rate_burst or state.config.rate_burst)
    if wait:
        raise HTTPException(429, f"rate limit: {rate:g} requests/s for key {key.name!r}; retry in {wait:.2f} s",
                            headers={"Retry-After": retry_after_header(wait)})
    return key


Caller = Annotated[ApiKey, Depends(authorize)]


async def authorize_request(request: Request) -> ApiKey:
    """``authorize`` for a route that also accepts another proof (a signed link) instead of a key."""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    bearer = HTTPAuthorizationCredentials(scheme=scheme, credentials=credentials) if scheme.lower() == "bearer" else None
    return await authorize(request, request.headers.get("x-api-key"), bearer)
JobStatus = Literal["pending", "running", "completed", "failed", "cancelled"]

ERROR_RESPONSES: dict[int | str, dict] = {
    400: {"model": ErrorDetail, "description": "a malformed input (a broken zip, a bad payload)"},
    401: {"model": ErrorDetail, "description": "missing, wrong or revoked API key"},
    404: {"model": ErrorDetail, "description": "no such function, job or file (for this key's owner)"},
    409: {"model": ErrorDetail, "description": "a function pickled by another Python version"},
    413: {"model": ErrorDetail, "description": "too large: body, package, payload or batch"},
    422: {"model": ErrorDetail, "description": "a request that does not fit the schema, or settings out of range"},
    429: {"model": ErrorDetail, "description": "rate limit: see Retry-After",
          "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}},
}


def create_app(grid: Grid, *, manage_grid: bool = True) -> FastAPI:
    config = grid.config

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_grid:
            grid.start()
        yield
        if manage_grid:
            grid.stop()

    app = FastAPI(title="NanoGrid controller", version=__version__, lifespan=lifespan, responses=ERROR_RESPONSES)
    app.state.authenticator = Authenticator(grid.registry)
    app.state.buckets = RedisTokenBuckets(grid.bus.redis) if isinstance(grid.bus, RedisResultBus) else TokenBuckets()
    app.state.config = config
    app.state.grid, app.state.started_at, app.state.seed_workers = grid, time.time(), {}  # for the seed routes
    # Uploads may carry a package plus form overhead; everything else at most a payload batch.
    # One middleware: http_request_duration_seconds on /metrics, and the body cap.
    app.add_middleware(RequestGate, max_bytes=max(config.max_package_bytes, jobs.inline_cap(config)) + (1 << 20),
                       durations=RequestDurations(), streamed=("/v1/blobs/", config.max_payload_bytes))
    install_error_handlers(app)  # every 4xx: {"detail", "error"}; a 500: JSON with a logged request id

    functions: dict[str, FunctionRecord] = {}  # records never change (ids are content hashes); deletes evict
    def function_or_404(function_id: str, caller: ApiKey) -> FunctionRecord:
        function = functions.get(function_id) or seed.resolve_function(grid, caller.name, function_id)  # or a seed id
        if function is None or function.owner != caller.name:  # another owner's function does not exist for you
            raise HTTPException(404, f"no function {function_id!r}; upload it first (POST /v1/upload)")
        functions[function.function_id] = function
        return function

    links = LinkSigner(grid.secrets.link_key)
    view = functools.partial(jobs.job_view, links=links)  # output URLs signed for the browser

    def job_or_404(job_id: str, caller: ApiKey, job: JobRecord | None = None) -> JobRecord:
        job = job or grid.registry.get_job(job_id)
        if job is None or job.owner != caller.name:
            raise HTTPException(404, f"no job {job_id!r}")
        return job

    def base_url(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    @app.get("/v1/health", response_model=Health)
    @app.get("/health", include_in_schema=False)
    def health() -> dict:
        problems = grid_problems(grid)  # said without the host's numbers: /health needs no key
        return {"status": "degraded" if problems else "healthy", "problems": problems,
                "version": __version__, "runtimes": grid.runtimes,
                "sandbox": grid.describe_sandbox(), "max_payload_bytes": config.max_payload_bytes,
                "max_result_bytes": config.max_result_bytes, "blob_threshold_bytes": config.blob_threshold_bytes}

    @app.post("/v1/upload", response_model=FunctionView, status_code=201,
              responses={200: {"model": FunctionView, "description": "identical package already uploaded"}})
    async def upload(
        caller: Caller,
        file: Annotated[UploadFile, File(description="a .py file or a zip package")],
        # Optional, but not nullable: a form field is either sent or not.
        function_name: Annotated[str, Form(max_length=64)] = None,  # type: ignore[assignment]
        runtime: Annotated[str, Form(max_length=32)] = None,  # type: ignore[assignment]
        handler: Annotated[str, Form(max_length=200)] = None,  # type: ignore[assignment]
        timeout: Annotated[float, Form(description="seconds")] = None,  # type: ignore[assignment]
        memory: Annotated[int, Form(description="MiB")] = None,  # type: ignore[assignment]
    ) -> JSONResponse:
        data = await file.read()
        form = {"name": function_name, "runtime": runtime, "handler": handler, "timeout": timeout, "memory": memory}
        record, created = jobs.deploy(grid, caller, file.filename or "package.zip", data, form)
        return JSONResponse(record.to_dict(), status_code=201 if created else 200)

    @app.get("/v1/functions", response_model=list[FunctionView])
    def list_functions(caller: Caller) -> list[dict]:
        return [f.to_dict() for f in grid.registry.list_functions(owner=caller.name)]

    @app.get("/v1/functions/{function_id}", response_model=FunctionView)
    def get_function(function_id: str, caller: Caller) -> dict:
        return function_or_404(function_id, caller).to_dict()

    @app.delete("/v1/functions/{function_id}", response_model=Deleted)
    def delete_function(function_id: str, caller: Caller) -> dict:
        function_id = function_or_404(function_id, caller).function_id
        functions.pop(function_id, None)
        grid.registry.delete_function(function_id)
        grid.store.delete_package(function_id)
        return {"function_id": function_id, "deleted": True}

    @app.post("/v1/run", response_model=JobView, responses={202: {"model": JobView, "description": "accepted (async)"}})
    async def run(body: RunRequest, request: Request, caller: Caller,
                  x_async: Annotated[bool, Header(description="true: answer 202 at once")] = False,
                  x_hold: Annotated[float | None, Header(ge=0, le=SYNC_WAIT_CAP_S, description=(
                      "seconds to wait for the result before answering 202 (a client that follows the job's "
                      "live output after that)"))] = None) -> JSONResponse:
        function = function_or_404(body.function_id, caller)
        pickles = [body.args_pickle] if body.args_pickle is not None else None
        refs = [body.blobs] if body.blobs else None
        payloads = jobs.encode_payloads(function, [body.payload], pickles, jobs.inline_cap(config),
                                        jobs.checked_blobs(grid, caller.name, refs, pickles))
        (job,) = jobs.new_jobs(function, payloads, caller.name)
        if x_async:
            await asyncio.to_thread(jobs.submit, grid, function, [job], body.model, caller.max_timeout_s)
            return JSONResponse(view(job, base_url(request)), status_code=202)
        finished, unsubscribe = jobs.subscribe(grid, [job.job_id])  # before queueing: no result slips past
        try:
            await asyncio.to_thread(jobs.submit, grid, function, [job], body.model, caller.max_timeout_s)
            hold = min(function.timeout_s + 30, SYNC_WAIT_CAP_S, SYNC_WAIT_CAP_S if x_hold is None else x_hold)
            result = asyncio.ensure_future(jobs.next_result(grid, job.job_id, finished, hold))
            gone = asyncio.ensure_future(jobs.until_disconnected(request))
            await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
            gone.cancel()
            if not result.done():  # the caller went away while it waited: a call still queued is not run for nobody
                result.cancel()
                jobs.cancel_unwatched(grid, [job.job_id])
                return JSONResponse(view(job, base_url(request)), 202)
            done = result.result()
        finally:
            unsubscribe()
        if done is None:  # still queued or running: the caller polls /status/{job_id}
            return JSONResponse(view(grid.registry.get_job(job.job_id) or job, base_url(request)), 202)
        return JSONResponse(view(done, base_url(request)))

    @app.post("/v1/map", responses={200: {"content": {"application/x-ndjson": {}},
                                       "description": "a line {job_ids}, then a JobView line (with index) per call"}})
    async def map_(body: MapRequest, request: Request, caller: Caller) -> StreamingResponse:
        function = function_or_404(body.function_id, caller)
        if (body.payloads is None) == (body.args_pickle is None):
            raise jobs.BadRequest("send exactly one of 'payloads' or 'args_pickle'", 422)
        count = len(body.payloads if body.payloads is not None else body.args_pickle or [])
        if count > config.map_chunk_limit:
            raise jobs.BadRequest(f"{count} calls in one request; send at most {config.map_chunk_limit}", 413)
        payloads = jobs.encode_payloads(function, body.payloads, body.args_pickle, jobs.inline_cap(config),
                                        jobs.checked_blobs(grid, caller.name, body.blobs, body.args_pickle))
        new = jobs.new_jobs(function, payloads, caller.name)
        job_ids = [job.job_id for job in new]
        finished, unsubscribe = jobs.subscribe(grid, job_ids)
        await asyncio.to_thread(jobs.submit, grid, function, new, body.model, caller.max_timeout_s)
        url = base_url(request)

        async def lines() -> AsyncIterator[bytes]:
            unreported = set(job_ids)
            try:
                yield json.dumps({"job_ids": job_ids}).encode() + b"\n"
                async for news in jobs.stream_results(grid, job_ids, finished, unsubscribe):
                    unreported.difference_update(job.job_id for _, job in news)
                    # one write for all that finished together; an empty line when nothing did, so clients can time
                    # out on silence
                    yield b"".join(json.dumps({"index": index, **view(job, url)}).encode() + b"\n"
                                   for index, job in news) or b"\n"
            finally:
                if unreported:  # the client stopped reading (gone): its calls still queued are not run for nobody
                    jobs.cancel_unwatched(grid, sorted(unreported))

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.get("/v1/status/{job_id}", response_model=JobView)
    async def status(job_id: str, request: Request, caller: Caller,
                     wait: Annotated[float, Query(ge=0, le=60, description="seconds to wait for it to finish")] = 0,
                     ) -> dict:
        job = job_or_404(job_id, caller)
        return view(await jobs.wait_for(grid, job_id, wait, job) or job, base_url(request))

    @app.get("/v1/jobs/{job_id}/logs", response_model=LiveLog)
    async def live_log(job_id: str, request: Request, caller: Caller,
                       after: Annotated[str, Query(max_length=64, description="the cursor of the last answer")] = "",
                       wait: Annotated[float, Query(ge=0, le=5, description="seconds to wait for new output")] = 0,
                       watched: Annotated[bool, Query(description=(
                           "the caller waits for this job (a sync call): if it goes away during the wait while "
                           "the job is still queued, the job is cancelled"))] = False,
                       ) -> dict:
        """What a job printed since ``after``, as it prints it (long-poll with ``wait``); ``ended`` once it finished."""
        job_or_404(job_id, caller)
        finished, unsubscribe = jobs.subscribe(grid, [job_id])  # a job that never prints ends its wait too
        try:
            job = await asyncio.to_thread(grid.registry.get_job, job_id)
            if job is None or job.finished:
                chunks, cursor, _ = await asyncio.to_thread(grid.bus.read_log, job_id, after, 0)
                ended = True
            else:
                reading = asyncio.ensure_future(asyncio.to_thread(grid.bus.read_log, job_id, after, wait))
                ending = asyncio.ensure_future(finished.get())
                gone = asyncio.ensure_future(jobs.until_disconnected(request) if watched else asyncio.Event().wait())
                await asyncio.wait({reading, ending, gone}, timeout=wait + 1, return_when=asyncio.FIRST_COMPLETED)
                if gone.done():  # the one waiting for it went away: a call still queued is not run for nobody
                    jobs.cancel_unwatched(grid, [job_id])
                gone.cancel()
                ending.cancel()
                if reading.done():
                    chunks, cursor, ended = reading.result()
                else:  # it finished without printing more: what is left is on its record
                    chunks, cursor, _ = await asyncio.to_thread(grid.bus.read_log, job_id, after, 0)
                    ended = True
        finally:
            unsubscribe()
        return {"chunks": [{"stream": stream, "text": data.decode("utf-8", "replace")} for stream, data in chunks],
                "cursor": cursor, "ended": ended}

    @app.get("/v1/jobs", response_model=list[JobView], responses={403: {"model": ErrorDetail,
                                                                      "description": "all_owners without an admin key"}})
    def list_jobs(request: Request, caller: Caller, limit: Annotated[int, Query(ge=1, le=1000)] = 50,
                  status: Annotated[JobStatus | None, Query()] = None,
                  all_owners: Annotated[bool, Query(description="every owner's jobs (admin keys only)")] = False,
                  ) -> list[dict]:
        if all_owners and not caller.admin:
            raise HTTPException(403, "all_owners=true needs an admin key (`nanogrid keys create NAME --admin`)")
        listed = grid.registry.list_jobs(limit, status, None if all_owners else caller.name)
        # another owner's result is never sent, even to an admin: a client unpickles what it gets
        functions = {f: grid.registry.get_function(f) for f in {job.function_id for job in listed}}
        return [{**view(job, base_url(request), with_result=job.owner == caller.name),
                 "function_name": getattr(functions[job.function_id], "function_name", None)} for job in listed]

    @app.post("/v1/jobs/{job_id}/cancel", response_model=JobView)
    async def cancel(job_id: str, request: Request, caller: Caller) -> dict:
        job = job_or_404(job_id, caller)
        jobs.cancel(grid, job)
        return view(await jobs.wait_for(grid, job_id, 5.0) or job, base_url(request))

    @app.post("/v1/jobs/cancel", response_model=Cancelled)
    def cancel_many(body: CancelRequest, caller: Caller) -> dict:
        """Cancel many jobs at once (an interrupted .map()); unknown and finished ids are passed over."""
        owned = [job for job in map(grid.registry.get_job, body.job_ids) if job is not None and job.owner == caller.name]
        return {"cancelled": jobs.cancel_all(grid, owned)}

    @app.get("/v1/jobs/{job_id}/outputs/{name:path}", responses={200: {"content": {"application/octet-stream": {}}},
                                                              410: {"model": ErrorDetail,
                                                                    "description": "deleted after the retention"}})
    async def download_output(job_id: str, name: str, request: Request,
                              expires: Annotated[int | None, Query(description="a signed link's expiry")] = None,
                              sig: Annotated[str | None, Query(max_length=64, description="a signed link's signature")]
                              = None) -> Response:
        """With the API key, or through the signed link a job view gives (for a browser: no key in it)."""
        job = await asyncio.to_thread(grid.registry.get_job, job_id)
        presents_key = "x-api-key" in request.headers or "authorization" in request.headers
        if sig is not None and not presents_key:  # a browser following a job view's link
            why = links.check(job_id, name, job.owner, expires or 0, sig) if job is not None else "no such job"
            if why:
                raise HTTPException(403, why)
            owner = job.owner if job is not None else ""
        else:
            owner = (await authorize_request(request)).name
        if job is None or job.owner != owner or name not in {f["name"] for f in job.output_files}:
            raise HTTPException(404, f"job {job_id!r} has no output file {name!r}")
        direct = grid.store.output_url(job_id, name)
        if direct:
            return RedirectResponse(direct, status_code=307)  # a presigned URL: bytes never pass through here
        try:
            chunks = grid.store.open_output(job_id, name)
        except FileNotFoundError:
            raise HTTPException(410, f"output file {name!r} of job {job_id!r} was deleted: outputs are kept "
                                     f"{config.output_retention_s / 86400:g} days") from None
        return output_response(name, chunks)  # images, PDFs and text open in the browser; the rest downloads

    @app.get("/v1/models", response_model=Models,
             responses={503: {"model": ErrorDetail, "description": "no AI node, or it does not answer"}})
    async def models(caller: Caller) -> dict:
        """What the AI node offers (503 when the grid has none or it does not answer)."""
        if not config.ai_endpoint:
            raise HTTPException(503, "this grid has no AI node: start it with --ai-endpoint URL (AI_ENDPOINT)")
        try:
            async with httpx.AsyncClient(timeout=5) as http:
                response = await http.get(f"{config.ai_endpoint.rstrip('/')}/api/tags")
                response.raise_for_status()
        except httpx.HTTPError as exc:
            raise HTTPException(503, f"the AI node at {config.ai_endpoint} does not answer: {exc}") from None
        names = [m.get("name") or m.get("model") for m in response.json().get("models", [])]
        return {"endpoint": config.ai_endpoint, "default": config.ai_model or None, "models": names}

    @app.get("/v1/system/status", response_model=SystemStatus)
    def system_status(caller: Caller) -> dict:
        """The caller's own jobs and queue, and the workers' capacity; an admin key sees every owner's."""
        counts = grid.registry.count_jobs(owner=None if caller.admin else caller.name)  # all jobs, no rows read
        stored = dataclasses.asdict(blobs_of(grid).space(None if caller.admin else caller.name))  # counted, not walked
        if caller.admin:
            return {"queue_depth": grid.queue.depth(), "workers": live_workers(), "jobs": counts, "blobs": stored}
        depth = grid.queue.depth_of(caller.name)
        owned = {f.function_id for f in grid.registry.list_functions(owner=caller.name)}
        return {"queue_depth": counts.get("pending", 0) if depth is None else depth,
                "workers": [scoped_worker(w, owned) for w in live_workers()], "jobs": counts, "blobs": stored}

    def live_workers() -> list[dict]:
        return jobs.live_workers(grid)

    @app.get("/metrics", response_class=PlainTextResponse, include_in_schema=False)
    def metrics(request: Request) -> PlainTextResponse:
        """Prometheus text format: queue, workers, backlog per worker (the autoscaling signal), pools, jobs;
        then the seed platform's function and HTTP metrics (nanogrid_backend/controller/function_metrics.py)."""
        return PlainTextResponse(render_all(request, grid), media_type="text/plain; version=0.0.4")

    app.include_router(blobs.routes(authorize))  # /v1/blobs: the data plane (nanogrid_backend/controller/blobs.py)
    history.install(app, grid, Caller)  # /v1 history, metrics windows, AutoTuner
    app.include_router(secret_routes.router(grid, Caller))  # /v1/secrets
    app.include_router(schedule_routes.router(grid, Caller))  # /v1/schedules (nanogrid_backend/schedules.py)
    app.include_router(volume_routes.router(grid, Caller))  # /v1/volumes (nanogrid_backend/volumes.py)
    # The seed platform's contract, where its clients call it (nanogrid_backend/controller/seed.py).
    for prefix in ("", "/api"):
        app.include_router(seed.router, prefix=prefix, include_in_schema=False)
        app.include_router(seed_operations.router, prefix=prefix, include_in_schema=False)
    return app


WORKER_FIELDS = ("worker_id", "slots", "running")  # what a non-admin sees of a worker: capacity, never whose work
POOL_FIELDS = ("sandbox", "cap", "specialised", "busy", "stem_cells", "idle")


def scoped_worker(info: dict, owned: set[str]) -> dict:
    """A worker as one owner may see it: its capacity and the warm sandboxes of the owner's own functions.

    An allow-list, so a field added to the worker's report later stays hidden until it is put here."""
    pool = info.get("pool", {})
    return {**{k: info[k] for k in WORKER_FIELDS if k in info},
            "pool": {**{k: pool[k] for k in POOL_FIELDS if k in pool},
                     "idle_by_function": {f: n for f, n in pool.get("idle_by_function", {}).items() if f in owned}}}

