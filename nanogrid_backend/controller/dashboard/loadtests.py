"""The dashboard's load tests: the owner's, newest first (refreshing while one runs), and starting one."""

from __future__ import annotations

import json

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from nanogrid_backend.controller.dashboard.state import board_of
from nanogrid_backend.controller.loadtests import LoadTestRequest, LoadTests

router = APIRouter(prefix="/ui", include_in_schema=False)


def tests_of(request: Request) -> LoadTests:
    return request.app.state.loadtests


@router.get("/loadtests")
def loadtests(request: Request, error: str = "") -> HTMLResponse:
    board = board_of(request)
    session = board.signed_in(request)
    listed = tests_of(request).listing(session.owner)
    return board.page_of(
        session,
        "loadtests.html",
        "Load tests",
        title="Load tests",
        tests=listed,
        functions=board.grid.registry.list_functions(owner=session.owner),
        error=error,
        refresh=2 if any(not t["done"] for t in listed) else None,
    )


@router.post("/loadtests")
def start_loadtest(
    request: Request,
    csrf: str = Form(""),
    function_id: str = Form(""),
    rps: str = Form(""),
    duration_s: str = Form(""),
    input: str = Form("{}"),
) -> Response:
    board = board_of(request)
    session, key = board.changing(request, csrf)
    record = board.owned(function_id, session)
    try:
        value = json.loads(input or "null")
        body = LoadTestRequest(
            function_id=function_id,
            rps=float(rps),
            duration_s=float(duration_s),
            **({"args": value} if record.kind == "pickle" else {"payload": value}),
        )
        tests_of(request).start(session.owner, record, body, key.max_timeout_s)
    except (ValueError, HTTPException) as exc:
        return loadtests(request, error=str(getattr(exc, "detail", exc)))
    return RedirectResponse("/ui/loadtests", status_code=303)
