"""The dashboard's workers: their capacity and the warm sandboxes of the owner's functions, and the owner's queue."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from nanogrid_backend.controller import jobs
from nanogrid_backend.controller.dashboard.state import board_of
from nanogrid_backend.controller.routes.system import scoped_worker

router = APIRouter(prefix="/ui", include_in_schema=False)


@router.get("/workers")
def workers(request: Request) -> HTMLResponse:
    board = board_of(request)
    session, grid = board.signed_in(request), board.grid
    mine = board.names(session.owner)
    depth = grid.queue.depth_of(session.owner)
    if depth is None:
        depth = grid.registry.count_jobs(owner=session.owner).get("pending", 0)
    return board.page_of(
        session,
        "workers.html",
        "Workers",
        title="Workers",
        names=mine,
        queue_depth=depth,
        workers=[scoped_worker(w, set(mine)) for w in jobs.live_workers(grid)],
    )  # as /v1/system/status
