"""The seed platform's workers: heartbeats, ``/workers``, ``/system/status``, and the AI node's ``/models``."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import httpx
from fastapi import APIRouter, HTTPException, Request

from nanogrid_backend.controller import jobs
from nanogrid_backend.controller.routes.deps import grid_of
from nanogrid_backend.controller.routes.seed.contract import (
    SEED_RUNTIMES,
    WORKER_TIMEOUT_S,
    Caller,
    SeedRoute,
    iso,
    seed_runtime,
)
from nanogrid_backend.grid import Grid

log = logging.getLogger(__name__)

router = APIRouter(route_class=SeedRoute, tags=["seed contract"])


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
        "workerId": str(body["workerId"]),
        "status": str(body.get("status") or "healthy"),
        "pools": body.get("pools") if isinstance(body.get("pools"), dict) else {},
        "activeJobs": int(body.get("activeJobs") or 0),
        "uptimeSeconds": float(body.get("uptimeSeconds") or 0),
        "lastSeen": time.time(),
        "receivedAt": iso(time.time()),
        "owner": caller.name,
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
        workers.append(
            {
                "workerId": info["worker_id"],
                "status": "healthy",
                "pools": pools_by_runtime(grid, info),
                "activeJobs": int(info.get("running", 0)),
                "uptimeSeconds": round(now - started),
                "lastSeen": now,
                "receivedAt": iso(now),
            }
        )
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
    return {
        "totalWorkers": len(found),
        "healthyWorkers": sum(w["healthStatus"] == "healthy" for w in found),
        "workers": found,
    }


@router.get("/system/status")
def system_status(request: Request, caller: Caller) -> dict[str, Any]:
    found = [w for w in seed_workers(request) if w["healthStatus"] == "healthy"]
    pools = {runtime: 0 for runtime in SEED_RUNTIMES}
    for worker in found:
        for runtime in pools:
            pools[runtime] += int(worker["pools"].get(runtime, 0) or 0)
    if not found:
        return {"pools": pools, "active_jobs": 0, "status": "offline"}
    return {
        "status": "online",
        "worker_count": len(found),
        "active_jobs": sum(w["activeJobs"] for w in found),
        "pools": pools,
        "uptime_seconds": max(w["uptimeSeconds"] for w in found),
        "timestamp": time.time(),
    }


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
        return {
            "models": [
                {
                    "id": m.get("name"),
                    "name": m.get("name"),
                    "size": m.get("size"),
                    "details": m.get("details") or {},
                    "status": "available",
                }
                for m in response.json().get("models", [])
            ]
        }
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        log.info("model catalog: %s", exc)
        return {
            "models": [
                {"id": default, "name": f"{default} (Default)", "status": "fallback", "details": {}}
            ],
            "warning": "Could not fetch dynamic model list from AI Node. showing default.",
        }
