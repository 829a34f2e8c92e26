"""The dashboard's jobs: the owner's calls, newest first, and one call with its output, result and files."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse

from nanogrid_backend.controller.dashboard import forms
from nanogrid_backend.controller.dashboard.state import PAGE, board_of, result_text
from nanogrid_backend.controller.history import TEXT_CAP, history_entry, page
from nanogrid_backend.controller.schemas import JobView

router = APIRouter(prefix="/ui", include_in_schema=False)


@router.get("/jobs")
def job_list(request: Request, status: str = "", before: str = "") -> HTMLResponse:
    board = board_of(request)
    session = board.signed_in(request)
    entries = board.grid.registry.list_history(
        session.owner, None, status or None, PAGE, board.cursor(before, session), TEXT_CAP
    )
    return board.page_of(
        session,
        "jobs.html",
        "Jobs",
        title="Jobs",
        history=page(entries, PAGE),
        status=status,
        names=board.names(session.owner),
    )


@router.get("/jobs/{job_id}")
def job(request: Request, job_id: str) -> HTMLResponse:
    board = board_of(request)
    session, grid = board.signed_in(request), board.grid
    record = grid.registry.get_job(job_id)
    if record is None or record.owner != session.owner:
        raise HTTPException(404, f"no job {job_id!r}")
    function = grid.registry.get_function(record.function_id)
    manifest = board.manifest(function) if function is not None else {}
    links = request.app.state.links  # signed: the page has no key
    files = JobView.of(record, with_result=False, links=links).body()["output_files"]
    return board.page_of(
        session,
        "job.html",
        "Jobs",
        title=job_id,
        call=history_entry(record),
        function=function,
        name=function.function_name if function else record.function_id,
        files=files,
        result=result_text(record),
        environment=forms.environment_of(manifest),
        python=manifest.get("python"),
        refresh=None if record.finished else 2,
    )
