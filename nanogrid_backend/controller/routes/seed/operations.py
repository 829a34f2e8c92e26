"""The seed platform's operations routes: the AutoTuner panel, a function's metrics windows, and load tests.

Beside ``functions.py`` (the same errors, keys and rate limits, at the root and under ``/api``), from NanoGrid's own
pieces: the AutoTuner of ``/v1/functions/{id}/autotune``, the calls in the registry, and the runner and bounds of
``nanogrid loadtest``. Shapes as the seed's BFF and UI read them: ``{invocations, avgDuration, errors, successRate,
coldStarts, recentExecutions}`` for metrics; load tests as the runner's summary plus ``functionId`` and ``running``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse

from nanogrid_backend.controller import history
from nanogrid_backend.controller import load_runner as loadtest
from nanogrid_backend.controller.routes.deps import grid_of
from nanogrid_backend.controller.routes.seed.contract import (
    SEED_MB_PRICE,
    Caller,
    SeedRoute,
    current_or_404,
    log_entry,
)
from nanogrid_backend.controller.routes.seed.functions import function_jobs
from nanogrid_backend.models import ApiKey

LOADTEST_PROGRESS_S = 1.0  # POST /debug/loadtest: a progress line this often
router = APIRouter(route_class=SeedRoute, tags=["seed contract"])


@router.get("/functions/{function_id}/auto-tuner")
def auto_tuner(function_id: str, request: Request, caller: Caller) -> dict[str, Any]:
    """The seed UI's AutoTuner panel, from NanoGrid's AutoTuner over every call of the newest version (30 days)."""
    grid = grid_of(request)
    current = current_or_404(grid, caller, function_id)[0]
    advice = history.advise(grid, current, history.rates_for(grid))
    recommended = advice["recommended_mib"]
    change = None if recommended is None else current.memory_mib - recommended
    return {
        "functionId": function_id,
        "currentMemoryMb": current.memory_mib,
        "recommendedMemoryMb": recommended,
        "optimizationTip": "; ".join(advice["reasons"]) or None,
        "calls": advice["calls"],
        "peakMemoryMb": advice["peak_mib"],
        "avgDurationMs": advice["mean_duration_ms"],
        "estimatedSavings": None if change is None else round(change * SEED_MB_PRICE * 730, 4),
        "savingPerMillionCalls": advice["saving_per_million"],
        "window": advice["window"],
    }


METRIC_RANGES = {"1h": 3600.0, "24h": 86400.0, "7d": 7 * 86400.0, "30d": 30 * 86400.0}


@router.get("/functions/{function_id}/metrics")
def function_metrics(
    function_id: str, request: Request, caller: Caller, range: str = "24h"
) -> dict[str, Any]:  # noqa: A002
    """The BFF's metrics of one function over ``range`` (1h, 24h, 7d, 30d): counts, success rate, cold starts,
    average duration and the newest executions, from its calls (as the BFF computed them from the logs)."""
    if range not in METRIC_RANGES:
        raise HTTPException(400, f"range must be one of {', '.join(METRIC_RANGES)}, not {range!r}")
    since = time.time() - METRIC_RANGES[range]
    calls = [
        job
        for job in function_jobs(grid_of(request), caller, function_id, 10_000)
        if (job.finished_at or 0) >= since
    ]
    entries = [log_entry(job, function_id) for job in calls]
    errors = sum(entry["status"] != "SUCCESS" for entry in entries)
    durations = [entry["duration"] for entry in entries if entry["duration"]]
    return {
        "functionId": function_id,
        "range": range,
        "invocations": len(entries),
        "errors": errors,
        "successRate": round((len(entries) - errors) / len(entries) * 100, 2) if entries else 100,
        "avgDuration": round(sum(durations) / len(durations)) if durations else 0,
        "coldStarts": sum(bool(job.cold) for job in calls),
        "recentExecutions": [
            {
                "timestamp": e["timestamp"],
                "duration": e["duration"],
                "status": e["status"],
                "memory": e["memory"],
            }
            for e in entries[:10]
        ],
    }


class SeedLoadTest:
    """One owner's load test started through the seed's routes: NanoGrid's runner and bounds (``nanogrid
    loadtest``), calls through the grid's own submit path, and a stop the seed's ``/loadtest/stop`` can press."""

    def __init__(self, function_id: str, test: loadtest.LoadTest, stop: threading.Event) -> None:
        self.function_id, self.test, self.stop = function_id, test, stop

    def view(self) -> dict[str, Any]:
        return {
            "functionId": self.function_id,
            "running": not self.test.done,
            **self.test.summary(),
        }


def load_tests(request: Request) -> dict[str, SeedLoadTest]:
    """Each owner's newest load test started here (this controller's memory, as the original's runner)."""
    state = request.app.state
    if getattr(state, "seed_loadtests", None) is None:
        state.seed_loadtests = {}
    return state.seed_loadtests


async def start_load_test(request: Request, caller: ApiKey) -> SeedLoadTest:
    """``{functionId, rps, duration, inputData}`` (``concurrency`` is read as ``rps``), within the CLI's bounds;
    409 while the caller has one running."""
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        raise HTTPException(
            400, 'the body must be JSON: {"functionId": ..., "rps": 10, "duration": 10}'
        ) from None
    if not isinstance(body, dict) or not body.get("functionId"):
        raise HTTPException(400, "functionId is required")
    try:
        rps = float(body.get("rps") or body.get("concurrency") or 10)
        duration = float(body.get("duration") or body.get("durationSeconds") or 10)
        loadtest.check_bounds(rps, duration)
    except (TypeError, ValueError) as exc:  # InvalidArgument is a ValueError
        raise HTTPException(
            400, str(exc).replace("--rps", "rps").replace("--duration", "duration")
        ) from None
    grid, seed_id = grid_of(request), str(body["functionId"])
    function = (await asyncio.to_thread(current_or_404, grid, caller, seed_id))[0]
    if function.kind != "handler":
        raise HTTPException(
            400,
            f"function {seed_id} was packaged by NanoGrid's Python client; load-test it with "
            "nanogrid loadtest",
        )
    state = request.app.state
    tests = load_tests(request)
    running = tests.get(caller.name)
    if running is not None and not running.test.done:
        raise HTTPException(
            409, "a load test of yours is still running; stop it (POST /loadtest/stop) or wait"
        )
    payload = ("json", json.dumps(body.get("inputData") or {}).encode())
    stop = threading.Event()
    started = SeedLoadTest(
        seed_id, loadtest.LoadTest(rps, duration, loadtest.check_bounds(rps, duration)), stop
    )
    tests[caller.name] = started

    def call() -> str | None:
        return state.loadtests.call(function, payload, caller.name, caller.max_timeout_s)

    def progress(test: loadtest.LoadTest) -> None:
        started.test = test  # the runner's own object, read by status and the stream

    def run() -> None:
        progress(loadtest.run(call, rps, duration, on_progress=progress, stop=stop))

    threading.Thread(target=run, name=f"seed-loadtest-{caller.name}", daemon=True).start()
    return started


@router.post("/debug/loadtest")
async def debug_loadtest(request: Request, caller: Caller) -> StreamingResponse:
    """The controller's stress test, streamed: a progress line about every second, then the summary as JSON.
    A client that goes away stops it."""
    started = await start_load_test(request, caller)

    async def lines() -> AsyncIterator[bytes]:
        try:
            test = started.test
            yield f"load test of {started.function_id}: {test.rps:g} calls/s for {test.duration_s:g} s\n".encode()
            while not started.test.done:
                await asyncio.sleep(LOADTEST_PROGRESS_S)
                now = started.test.summary()
                yield (
                    f"sent {now['sent']}/{now['planned']}, ok {now['completed']}, failed {now['failed']}, "
                    f"p50 {now['p50_ms'] or 0:.1f} ms, p99 {now['p99_ms'] or 0:.1f} ms\n"
                ).encode()
            yield json.dumps(started.view()).encode() + b"\n"
        finally:
            started.stop.set()

    return StreamingResponse(lines(), media_type="text/plain; charset=utf-8")


@router.post("/loadtest/start")
async def loadtest_start(request: Request, caller: Caller) -> JSONResponse:
    started = await start_load_test(request, caller)
    return JSONResponse({"success": True, "status": "running", **started.view()}, status_code=202)


@router.post("/loadtest/stop")
def loadtest_stop(request: Request, caller: Caller) -> dict[str, Any]:
    test = load_tests(request).get(caller.name)
    if test is None:
        return {"success": True, "status": "idle", "running": False}
    test.stop.set()
    return {"success": True, "status": "stopped", **test.view()}


@router.get("/loadtest/status")
def loadtest_status(request: Request, caller: Caller) -> dict[str, Any]:
    test = load_tests(request).get(caller.name)
    if test is None:
        return {"status": "idle", "running": False}
    return {"status": "running" if not test.test.done else "done", **test.view()}
