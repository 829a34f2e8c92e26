"""The dashboard's sign-in and sign-out, and its stylesheet."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from fastapi import APIRouter, Form, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from nanogrid_backend.controller.dashboard.state import (
    COOKIE,
    HERE,
    SESSION_TTL_S,
    Dashboard,
    Session,
    board_of,
)
from nanogrid_backend.keys import LOCAL_KEY_FILE, AuthError
from nanogrid_backend.models import ApiKey

router = APIRouter(prefix="/ui", include_in_schema=False)


@router.get("/static/ui.css")
def css() -> FileResponse:
    return FileResponse(
        HERE / "ui.css", media_type="text/css", headers={"Cache-Control": "max-age=3600"}
    )


def login_page(board: Dashboard, code: int = 200, error: str = "") -> HTMLResponse:
    return board.render(
        "login.html",
        code,
        title="Sign in",
        error=error,
        local_key=Path(board.grid.config.data_dir) / LOCAL_KEY_FILE,
    )


@router.get("/login")
def login_form(request: Request) -> HTMLResponse:
    return login_page(board_of(request))


@router.post("/login")
def login(request: Request, api_key: str = Form("", max_length=200)) -> Response:
    board = board_of(request)
    client = request.client.host if request.client else "?"
    wait = request.app.state.buckets.take(f"ui-login:{client}", 1.0, 10)  # guessing keys is slow
    if wait:
        return login_page(board, 429, f"too many attempts; try again in {wait:.0f} s")
    try:
        key: ApiKey = request.app.state.authenticator.check(api_key)
    except AuthError as exc:
        return login_page(board, 401, str(exc))
    token = secrets.token_urlsafe(32)
    board.sessions[token] = Session(
        key.key_id, key.name, secrets.token_urlsafe(24), time.time() + SESSION_TTL_S
    )
    for stale in [t for t, s in board.sessions.items() if s.expires < time.time()]:
        board.sessions.pop(stale, None)
    response = RedirectResponse("/ui", status_code=303)
    response.set_cookie(
        COOKIE,
        token,
        max_age=SESSION_TTL_S,
        path="/ui",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout")
def logout(request: Request, csrf: str = Form("")) -> Response:
    board = board_of(request)
    board.changing(request, csrf)
    board.sessions.pop(request.cookies.get(COOKIE, ""), None)
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path="/ui")
    return response
