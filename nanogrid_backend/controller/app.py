"""The controller's app, composed: the grid's state, the routers, one middleware, the error handlers, one lifespan.

The routers are routes/ (one module per resource) and the dashboard; the lifespan starts and stops the grid (when
the app manages it) and the history's retention."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from nanogrid_backend.controller import dashboard, jobs
from nanogrid_backend.controller.errors import install_error_handlers
from nanogrid_backend.controller.fast_run import FastRun
from nanogrid_backend.controller.function_metrics import RequestDurations
from nanogrid_backend.controller.history import HistoryJanitor
from nanogrid_backend.controller.limits import RequestGate
from nanogrid_backend.controller.links import LinkSigner
from nanogrid_backend.controller.loadtests import LoadTests
from nanogrid_backend.controller.routes import (
    blobs,
    functions,
    history,
    loadtests,
    schedules,
    secrets,
    seed,
    system,
    volumes,
    webhooks,
)
from nanogrid_backend.controller.routes import jobs as job_routes
from nanogrid_backend.controller.schemas import ERROR_RESPONSES
from nanogrid_backend.grid import Grid
from nanogrid_backend.keys import Authenticator
from nanogrid_contract import __version__


def create_app(grid: Grid, *, manage_grid: bool = True) -> FastAPI:
    """The app over ``grid``; ``manage_grid``: its lifespan starts and stops the grid too (else its owner does)."""
    config = grid.config
    janitor = HistoryJanitor(grid)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_grid:
            grid.start()
        janitor.start()
        try:
            yield
        finally:
            janitor.stop()
            if manage_grid:
                grid.stop()

    app = FastAPI(
        title="NanoGrid controller",
        version=__version__,
        lifespan=lifespan,
        responses=ERROR_RESPONSES,
    )
    state = app.state
    state.grid, state.config, state.started_at = grid, config, time.time()
    state.authenticator = Authenticator(grid.registry)
    # the API keys' rate limits, shared as widely as the bus is
    state.buckets = grid.bus.token_buckets()
    # taking a token is then a few microseconds, no network
    state.buckets_in_process = grid.bus.redis is None
    state.links = LinkSigner(grid.secrets.link_key)  # output URLs signed for the browser
    state.functions = {}  # function id -> record: records never change (ids are content hashes); deletes evict
    state.loadtests = LoadTests(grid)
    state.seed_workers = {}  # the seed platform's worker heartbeats
    state.dashboard = dashboard.Dashboard(grid)

    # The calls first: a request is matched against the routes in this order, and /v1/run is the warm path. Its
    # routes sit on the app itself: FastAPI resolves an included router's routes again on each request (about
    # 50 µs of a warm call); they carry the app's error responses themselves (routes/jobs.py).
    app.router.routes.extend(job_routes.router.routes)
    for router in (
        functions.router,
        system.router,
        blobs.router,
        history.router,
        webhooks.router,
        loadtests.router,
        dashboard.router,
        secrets.router,
        schedules.router,
        volumes.router,
    ):
        app.include_router(router)
    for prefix in ("", "/api"):  # the seed platform's contract, where its clients call it
        app.include_router(seed.router, prefix=prefix, include_in_schema=False)

    # The warm POST /v1/run is served before the routes (fast_run.py); what it does not take goes on to them.
    app.add_middleware(FastRun, owner=app)
    # Uploads may carry a package plus form overhead; everything else at most a payload batch.
    # One middleware around all (added last, so outermost): http_request_duration_seconds on /metrics, the body cap.
    app.add_middleware(
        RequestGate,
        max_bytes=max(config.max_package_bytes, jobs.inline_cap(config)) + (1 << 20),
        durations=RequestDurations(),
        streamed=("/v1/blobs/", config.max_payload_bytes),
    )
    # every 4xx: {"detail", "error"}; a 500: JSON with a logged request id
    install_error_handlers(app)
    dashboard.install_error_pages(app, state.dashboard)  # the same, as pages on /ui
    return app
