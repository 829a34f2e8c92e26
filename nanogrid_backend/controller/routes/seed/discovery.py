"""The seed platform's discovery, ``/health`` and ``/metrics`` (no key needed)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from nanogrid_backend.controller.function_metrics import render_all
from nanogrid_backend.controller.routes.deps import grid_of
from nanogrid_backend.controller.routes.seed.contract import SEED_VERSION, SeedRoute
from nanogrid_backend.grid import Grid
from nanogrid_contract import __version__

log = logging.getLogger(__name__)

router = APIRouter(route_class=SeedRoute, tags=["seed contract"])


@router.get("/", summary="discovery")
def discovery(request: Request) -> dict[str, Any]:
    return {
        "service": "FaaS Controller API (NanoGrid)",
        "version": SEED_VERSION,
        "nanogrid": __version__,
        "status": "OK" if healthy(grid_of(request)) else "ERROR",
        "endpoints": {
            "health": "/health",
            "metrics": "/metrics",
            "functions": "/api/functions",
            "workers": "/api/workers",
            "nanogrid_api": "/v1",
            "openapi": "/openapi.json",
        },
        "authentication": "Protected endpoints require the x-api-key header.",
    }


def healthy(grid: Grid) -> bool:
    redis = grid.bus.redis
    if redis is None:
        return True
    try:
        return bool(redis.ping())
    except Exception:
        return False


@router.get("/health")
def health(request: Request) -> JSONResponse:
    ok = healthy(grid_of(request))
    return JSONResponse(
        {"status": "OK" if ok else "ERROR", "version": SEED_VERSION}, status_code=200 if ok else 503
    )


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(request: Request) -> PlainTextResponse:
    return PlainTextResponse(
        render_all(request, grid_of(request)), media_type="text/plain; version=0.0.4"
    )
