"""``/v1/run``, ``/v1/map``, ``/v1/status`` and ``/v1/jobs``: calls, their results, live output,
cancels and output files."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, HTTPException, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse

from nanogrid_backend.controller import jobs
from nanogrid_backend.controller.outputs import output_response
from nanogrid_backend.controller.routes.deps import (
    Caller,
    CurrentGrid,
    Links,
    Settings,
    authorize_request,
    base_url,
    function_or_404,
    job_or_404,
)
from nanogrid_backend.controller.schemas import (
    ERROR_RESPONSES,
    Cancelled,
    CancelRequest,
    ErrorDetail,
    JobView,
    LiveLog,
    MapRequest,
    RunRequest,
)
from nanogrid_backend.grid import Grid
from nanogrid_backend.models import ApiKey, FunctionRecord, JobRecord

SYNC_WAIT_CAP_S = 60.0  # a sync /run answers 202 after this; the client then polls /status
JobStatus = Literal["pending", "running", "completed", "failed", "cancelled"]

router = APIRouter(prefix="/v1", responses=ERROR_RESPONSES)  # mounted on the app itself (app.py)


def view(request: Request, job: JobRecord, with_result: bool = True, **extra: Any) -> JobView:
    """The job as the API answers it to this request: output URLs on the host it called, signed for a browser."""
    return JobView.of(job, base_url(request), with_result, request.app.state.links, **extra)


@router.post(
    "/run",
    response_model=JobView,
    responses={202: {"model": JobView, "description": "accepted (async)"}},
)
async def run(
    body: RunRequest,
    request: Request,
    caller: Caller,
    grid: CurrentGrid,
    x_async: Annotated[bool, Header(description="true: answer 202 at once")] = False,
    x_hold: Annotated[
        float | None,
        Header(
            ge=0,
            le=SYNC_WAIT_CAP_S,
            description=(
                "seconds to wait for the result before answering 202 (a client that follows the job's "
                "live output after that)"
            ),
        ),
    ] = None,
) -> JSONResponse:
    function = function_or_404(request, body.function_id, caller)
    payloads = run_payloads(grid, function, caller, body)
    job, status_code = await call(
        grid,
        function,
        caller,
        payloads,
        body.model,
        asynchronous=x_async,
        hold=x_hold,
        gone=lambda: jobs.until_disconnected(request),
    )
    return JSONResponse(view(request, job).body(), status_code)


def run_payloads(
    grid: Grid, function: FunctionRecord, caller: ApiKey, body: RunRequest
) -> list[tuple[str, bytes]]:
    """The call's payload, checked against the function's kind, the size cap and the caller's blobs (BadRequest)."""
    pickles = [body.args_pickle] if body.args_pickle is not None else None
    refs = [body.blobs] if body.blobs else None
    return jobs.encode_payloads(
        function,
        [body.payload],
        pickles,
        jobs.inline_cap(grid.config),
        jobs.checked_blobs(grid, caller.name, refs, pickles),
    )


async def call(
    grid: Grid,
    function: FunctionRecord,
    caller: ApiKey,
    payloads: list[tuple[str, bytes]],
    model: str | None,
    *,
    asynchronous: bool,
    hold: float | None,
    gone: Callable[[], Awaitable[Any]],
) -> tuple[JobRecord, int]:
    """One call of ``POST /v1/run``, checked already: (the finished job, 200), or (the job as it stands, 202) when
    ``asynchronous``, when it is still running after ``hold`` seconds, or when the caller went away (``gone``
    returned) while it waited; a call still queued then is not run for nobody."""
    (job,) = jobs.new_jobs(function, payloads, caller.name)
    if asynchronous:
        await jobs.submit_from_loop(grid, function, [job], model, caller.max_timeout_s)
        return job, 202
    # before queueing: no result slips past
    waiter = jobs.JobWaiter(grid, job.job_id)
    # watched from before the call is queued, so its first step is not between the queue and the worker
    went = asyncio.ensure_future(gone())
    went.add_done_callback(lambda _: waiter.stop())
    try:
        await jobs.submit_from_loop(grid, function, [job], model, caller.max_timeout_s)
        wait = min(
            function.timeout_s + 30, SYNC_WAIT_CAP_S, SYNC_WAIT_CAP_S if hold is None else hold
        )
        done = await jobs.until_finished(grid, waiter, wait)
        if done is None and waiter.stopped:
            jobs.cancel_unwatched(grid, [job.job_id])
            return job, 202
    finally:
        went.cancel()
        waiter.close()
    if done is None:  # still queued or running: the caller polls /status/{job_id}
        return grid.registry.get_job(job.job_id) or job, 202
    return done, 200


@router.post(
    "/map",
    responses={
        200: {
            "content": {"application/x-ndjson": {}},
            "description": "a line {job_ids}, then a JobView line (with index) per call",
        }
    },
)
async def map_(
    body: MapRequest, request: Request, caller: Caller, grid: CurrentGrid, config: Settings
) -> StreamingResponse:
    function = function_or_404(request, body.function_id, caller)
    if (body.payloads is None) == (body.args_pickle is None):
        raise jobs.BadRequest("send exactly one of 'payloads' or 'args_pickle'", 422)
    count = len(body.payloads if body.payloads is not None else body.args_pickle or [])
    if count > config.map_chunk_limit:
        raise jobs.BadRequest(
            f"{count} calls in one request; send at most {config.map_chunk_limit}", 413
        )
    payloads = jobs.encode_payloads(
        function,
        body.payloads,
        body.args_pickle,
        jobs.inline_cap(config),
        jobs.checked_blobs(grid, caller.name, body.blobs, body.args_pickle),
    )
    new = jobs.new_jobs(function, payloads, caller.name)
    job_ids = [job.job_id for job in new]
    finished, unsubscribe = jobs.subscribe(grid, job_ids)
    await asyncio.to_thread(jobs.submit, grid, function, new, body.model, caller.max_timeout_s)
    url, links = base_url(request), request.app.state.links  # once for the whole stream

    async def lines() -> AsyncIterator[bytes]:
        unreported = set(job_ids)
        try:
            yield json.dumps({"job_ids": job_ids}).encode() + b"\n"
            async for news in jobs.stream_results(grid, job_ids, finished, unsubscribe):
                unreported.difference_update(job.job_id for _, job in news)
                # one write for all that finished together; an empty line when nothing did, so clients can time
                # out on silence
                yield (
                    b"".join(
                        json.dumps(
                            {"index": index, **JobView.plain(job, url, links=links)}
                        ).encode()
                        + b"\n"
                        for index, job in news
                    )
                    or b"\n"
                )
        finally:
            # the client stopped reading (gone): its calls still queued are not run for nobody
            if unreported:
                jobs.cancel_unwatched(grid, sorted(unreported))

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.get("/status/{job_id}", response_model=JobView)
async def status(
    job_id: str,
    request: Request,
    caller: Caller,
    grid: CurrentGrid,
    wait: Annotated[float, Query(ge=0, le=60, description="seconds to wait for it to finish")] = 0,
) -> JobView:
    job = job_or_404(grid, job_id, caller)
    return view(request, await jobs.wait_for(grid, job_id, wait, job) or job)


@router.get("/jobs/{job_id}/logs", response_model=LiveLog)
async def live_log(
    job_id: str,
    request: Request,
    caller: Caller,
    grid: CurrentGrid,
    after: Annotated[str, Query(max_length=64, description="the cursor of the last answer")] = "",
    wait: Annotated[float, Query(ge=0, le=5, description="seconds to wait for new output")] = 0,
    watched: Annotated[
        bool,
        Query(
            description=(
                "the caller waits for this job (a sync call): if it goes away during the wait while "
                "the job is still queued, the job is cancelled"
            )
        ),
    ] = False,
) -> dict:
    """What a job printed since ``after``, as it prints it (long-poll with ``wait``); ``ended`` once it finished."""
    job_or_404(grid, job_id, caller)
    # a job that never prints ends its wait too
    finished, unsubscribe = jobs.subscribe(grid, [job_id])
    try:
        job = await asyncio.to_thread(grid.registry.get_job, job_id)
        if job is None or job.finished:
            chunks, cursor, _ = await asyncio.to_thread(grid.bus.read_log, job_id, after, 0)
            ended = True
        else:
            reading = asyncio.ensure_future(
                asyncio.to_thread(grid.bus.read_log, job_id, after, wait)
            )
            ending = asyncio.ensure_future(finished.get())
            gone = asyncio.ensure_future(
                jobs.until_disconnected(request) if watched else asyncio.Event().wait()
            )
            await asyncio.wait(
                {reading, ending, gone}, timeout=wait + 1, return_when=asyncio.FIRST_COMPLETED
            )
            # the one waiting for it went away: a call still queued is not run for nobody
            if gone.done():
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
    return {
        "chunks": [
            {"stream": stream, "text": data.decode("utf-8", "replace")} for stream, data in chunks
        ],
        "cursor": cursor,
        "ended": ended,
    }


@router.get(
    "/jobs",
    response_model=list[JobView],
    responses={403: {"model": ErrorDetail, "description": "all_owners without an admin key"}},
)
def list_jobs(
    request: Request,
    caller: Caller,
    grid: CurrentGrid,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    status: Annotated[JobStatus | None, Query()] = None,
    all_owners: Annotated[bool, Query(description="every owner's jobs (admin keys only)")] = False,
) -> list[JobView]:
    if all_owners and not caller.admin:
        raise HTTPException(
            403, "all_owners=true needs an admin key (`nanogrid keys create NAME --admin`)"
        )
    listed = grid.registry.list_jobs(limit, status, None if all_owners else caller.name)
    # another owner's result is never sent, even to an admin: a client unpickles what it gets
    functions = {f: grid.registry.get_function(f) for f in {job.function_id for job in listed}}
    return [
        view(
            request,
            job,
            with_result=job.owner == caller.name,
            function_name=getattr(functions[job.function_id], "function_name", None),
        )
        for job in listed
    ]


@router.post("/jobs/{job_id}/cancel", response_model=JobView)
async def cancel(job_id: str, request: Request, caller: Caller, grid: CurrentGrid) -> JobView:
    job = job_or_404(grid, job_id, caller)
    jobs.cancel(grid, job)
    return view(request, await jobs.wait_for(grid, job_id, 5.0) or job)


@router.post("/jobs/cancel", response_model=Cancelled)
def cancel_many(body: CancelRequest, caller: Caller, grid: CurrentGrid) -> dict:
    """Cancel many jobs at once (an interrupted .map()); unknown and finished ids are passed over."""
    owned = [
        job
        for job in map(grid.registry.get_job, body.job_ids)
        if job is not None and job.owner == caller.name
    ]
    return {"cancelled": jobs.cancel_all(grid, owned)}


@router.get(
    "/jobs/{job_id}/outputs/{name:path}",
    responses={
        200: {"content": {"application/octet-stream": {}}},
        410: {"model": ErrorDetail, "description": "deleted after the retention"},
    },
)
async def download_output(
    job_id: str,
    name: str,
    request: Request,
    grid: CurrentGrid,
    links: Links,
    expires: Annotated[int | None, Query(description="a signed link's expiry")] = None,
    sig: Annotated[
        str | None, Query(max_length=64, description="a signed link's signature")
    ] = None,
) -> Response:
    """With the API key, or through the signed link a job view gives (for a browser: no key in it)."""
    job = await asyncio.to_thread(grid.registry.get_job, job_id)
    presents_key = "x-api-key" in request.headers or "authorization" in request.headers
    if sig is not None and not presents_key:  # a browser following a job view's link
        why = (
            links.check(job_id, name, job.owner, expires or 0, sig)
            if job is not None
            else "no such job"
        )
        if why:
            raise HTTPException(403, why)
        owner = job.owner if job is not None else ""
    else:
        owner = (await authorize_request(request)).name
    if job is None or job.owner != owner or name not in {f["name"] for f in job.output_files}:
        raise HTTPException(404, f"job {job_id!r} has no output file {name!r}")
    direct = grid.store.output_url(job_id, name)
    if direct:
        # a presigned URL: bytes never pass through here
        return RedirectResponse(direct, status_code=307)
    try:
        chunks = grid.store.open_output(job_id, name)
    except FileNotFoundError:
        raise HTTPException(
            410,
            f"output file {name!r} of job {job_id!r} was deleted: outputs are kept "
            f"{grid.config.output_retention_s / 86400:g} days",
        ) from None
    # images, PDFs and text open in the browser; the rest downloads
    return output_response(name, chunks)
