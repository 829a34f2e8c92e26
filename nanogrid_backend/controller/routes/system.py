"""The grid itself: ``/health`` (no key), ``/metrics``, ``/v1/system/status`` and the AI node's ``/v1/models``."""

from __future__ import annotations

import dataclasses

import httpx
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import PlainTextResponse

from nanogrid_backend.controller import jobs
from nanogrid_backend.controller.function_metrics import render_all
from nanogrid_backend.controller.routes.deps import Caller, CurrentGrid, Settings
from nanogrid_backend.controller.schemas import ErrorDetail, Health, Models, SystemStatus
from nanogrid_backend.health import problems as grid_problems
from nanogrid_backend.store.blobs import blobs_of
from nanogrid_contract import __version__

WORKER_FIELDS = (
    "worker_id",
    "slots",
    "running",
)  # what a non-admin sees of a worker: capacity, never whose work
POOL_FIELDS = ("sandbox", "cap", "specialised", "busy", "stem_cells", "idle")

router = APIRouter()


@router.get("/v1/health", response_model=Health)
@router.get("/health", include_in_schema=False)
def health(grid: CurrentGrid) -> dict:
    config = grid.config
    problems = grid_problems(grid)  # said without the host's numbers: /health needs no key
    return {
        "status": "degraded" if problems else "healthy",
        "problems": problems,
        "version": __version__,
        "runtimes": grid.runtimes,
        "sandbox": grid.describe_sandbox(),
        "max_payload_bytes": config.max_payload_bytes,
        "max_result_bytes": config.max_result_bytes,
        "blob_threshold_bytes": config.blob_threshold_bytes,
    }


@router.get(
    "/v1/models",
    response_model=Models,
    responses={503: {"model": ErrorDetail, "description": "no AI node, or it does not answer"}},
)
async def models(caller: Caller, config: Settings) -> dict:
    """What the AI node offers (503 when the grid has none or it does not answer)."""
    if not config.ai_endpoint:
        raise HTTPException(
            503, "this grid has no AI node: start it with --ai-endpoint URL (AI_ENDPOINT)"
        )
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            response = await http.get(f"{config.ai_endpoint.rstrip('/')}/api/tags")
            response.raise_for_status()
    except httpx.HTTPError as exc:
        raise HTTPException(
            503, f"the AI node at {config.ai_endpoint} does not answer: {exc}"
        ) from None
    names = [m.get("name") or m.get("model") for m in response.json().get("models", [])]
    return {"endpoint": config.ai_endpoint, "default": config.ai_model or None, "models": names}


@router.get("/v1/system/status", response_model=SystemStatus)
def system_status(caller: Caller, grid: CurrentGrid) -> dict:
    """The caller's own jobs and queue, and the workers' capacity; an admin key sees every owner's."""
    # all jobs, no rows read
    counts = grid.registry.count_jobs(owner=None if caller.admin else caller.name)
    # counted, not walked
    stored = dataclasses.asdict(blobs_of(grid).space(None if caller.admin else caller.name))
    if caller.admin:
        return {
            "queue_depth": grid.queue.depth(),
            "workers": jobs.live_workers(grid),
            "jobs": counts,
            "blobs": stored,
        }
    depth = grid.queue.depth_of(caller.name)
    owned = {f.function_id for f in grid.registry.list_functions(owner=caller.name)}
    return {
        "queue_depth": counts.get("pending", 0) if depth is None else depth,
        "workers": [scoped_worker(w, owned) for w in jobs.live_workers(grid)],
        "jobs": counts,
        "blobs": stored,
    }


@router.get("/metrics", response_class=PlainTextResponse, include_in_schema=False)
def metrics(request: Request, grid: CurrentGrid) -> PlainTextResponse:
    """Prometheus text format: queue, workers, backlog per worker (the autoscaling signal), pools, jobs;
    then the seed platform's function and HTTP metrics (nanogrid_backend/controller/function_metrics.py)."""
    return PlainTextResponse(render_all(request, grid), media_type="text/plain; version=0.0.4")


def scoped_worker(info: dict, owned: set[str]) -> dict:
    """A worker as one owner may see it: its capacity and the warm sandboxes of the owner's own functions.

    An allow-list, so a field added to the worker's report later stays hidden until it is put here."""
    pool = info.get("pool", {})
    return {
        **{k: info[k] for k in WORKER_FIELDS if k in info},
        "pool": {
            **{k: pool[k] for k in POOL_FIELDS if k in pool},
            "idle_by_function": {
                f: n for f, n in pool.get("idle_by_function", {}).items() if f in owned
            },
        },
    }
