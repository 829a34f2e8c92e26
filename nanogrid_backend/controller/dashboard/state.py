"""The dashboard's state and what every page shares: sessions, templates, the signed-in owner's records, error pages.

Signing in posts an API key once; the grid answers with a random session id in a cookie (HttpOnly,
SameSite=Strict, Secure over HTTPS, path /ui), so the key is never in a URL, a page or the browser's storage.
Sessions live in this controller's memory for ``SESSION_TTL_S`` and end at sign-out, at a restart, or once
the key is revoked. Every form that changes something carries the session's CSRF token.
"""

from __future__ import annotations

import inspect
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from nanogrid_backend.controller.dashboard import forms
from nanogrid_backend.controller.dashboard.charts import _mib, _ms, _num, _pct, _when
from nanogrid_backend.controller.ratelimit import key_limits, retry_after_header
from nanogrid_backend.controller.schemas import JobView
from nanogrid_backend.grid import Grid
from nanogrid_backend.models import ApiKey, FunctionRecord, JobRecord

HERE = Path(__file__).parent
COOKIE = "nanogrid_session"
SESSION_TTL_S = 8 * 3600
PAGE = 50
RESULT_CHARS = 20_000
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dataclass
class Session:
    key_id: str
    owner: str
    csrf: str
    expires: float


class NotSignedIn(Exception):
    pass


def grouped(functions: list[FunctionRecord]) -> list[list[FunctionRecord]]:
    """A function's versions together, newest first: those of one stable id (a seed function's updates and their
    AutoTuner versions), else those of one name."""
    groups: dict[str, list[FunctionRecord]] = {}
    for function in sorted(functions, key=lambda f: -f.created_at):
        groups.setdefault(function.stable_id or f"name:{function.function_name}", []).append(
            function
        )
    return list(groups.values())


def summed(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """Calls and errors of several versions' windows together; the error rate of them all."""
    count, errors = sum(w["count"] for w in windows), sum(w["errors"] for w in windows)
    return {"count": count, "errors": errors, "error_rate": errors / count if count else None}


def result_text(job: JobRecord) -> str:
    """The result as the page shows it: JSON pretty-printed; a Python value is for the client to read."""
    view = JobView.of(job)
    if view.result is not None:
        return json.dumps(view.result, indent=2, ensure_ascii=False)[:RESULT_CHARS]
    if view.result_pickle or view.result_blob:
        return "(a Python value: read it with nanogrid's client, FunctionCall.get())"
    return ""


def board_of(request: Request) -> Dashboard:
    return request.app.state.dashboard


class Dashboard:
    """The dashboard's state: its templates, the signed-in sessions, and what it caches of immutable records."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.templates = Environment(
            loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"])
        )
        self.templates.filters.update(when=_when, ms=_ms, mib=_mib, pct=_pct, num=_num)
        self.sessions: dict[str, Session] = {}
        # function id -> manifest: ids are content hashes
        self.manifests: dict[str, dict[str, Any]] = {}

    def render(self, template: str, code: int = 200, /, **values: Any) -> HTMLResponse:
        return HTMLResponse(
            self.templates.get_template(template).render(**values),
            status_code=code,
            headers=SECURITY_HEADERS,
        )

    def page_of(
        self, session: Session, template: str, section: str, code: int = 200, /, **values: Any
    ) -> HTMLResponse:
        """A page of the signed-in owner (the menu's section marked)."""
        return self.render(
            template, code, owner=session.owner, csrf=session.csrf, section=section, **values
        )

    def session_of(self, request: Request) -> Session | None:
        session = self.sessions.get(request.cookies.get(COOKIE, ""))
        return session if session is not None and session.expires >= time.time() else None

    def signed_in(self, request: Request) -> Session:
        """The request's session, if it is current and its key still valid."""
        session = self.session_of(request)
        if session is None:
            raise NotSignedIn
        key = self.grid.registry.get_key(session.key_id)
        if key is None or key.revoked_at is not None:
            self.sessions.pop(request.cookies.get(COOKIE, ""), None)
            raise NotSignedIn
        # the key's own bucket
        wait = request.app.state.buckets.take(key.key_id, *key_limits(key, self.grid.config))
        if wait:
            raise HTTPException(
                429,
                f"too many requests for this key; try again in {retry_after_header(wait)} s",
                headers={"Retry-After": retry_after_header(wait)},
            )
        return session

    def changing(self, request: Request, csrf: str) -> tuple[Session, ApiKey]:
        """A form that changes something: signed in, with this session's CSRF token; the session's key."""
        session = self.signed_in(request)
        if not secrets.compare_digest(session.csrf, csrf):
            raise HTTPException(
                403, "this form is stale (or came from another site): reload the page and try again"
            )
        key = self.grid.registry.get_key(session.key_id)
        if key is None:
            raise NotSignedIn
        return session, key

    def names(self, owner: str) -> dict[str, str]:
        return {
            f.function_id: f.function_name for f in self.grid.registry.list_functions(owner=owner)
        }

    def owned(self, function_id: str, session: Session) -> FunctionRecord:
        function = self.grid.registry.get_function(function_id)
        if function is None or function.owner != session.owner:
            raise HTTPException(404, f"no function {function_id!r}")
        return function

    def versions_of(self, function: FunctionRecord) -> list[FunctionRecord]:
        mine = self.grid.registry.list_functions(owner=function.owner)
        return next((g for g in grouped(mine) if function in g), [function])

    def cursor(self, before: str | None, session: Session) -> tuple[float, str] | None:
        if not before:
            return None
        job = self.grid.registry.get_job(before)
        return (
            (job.created_at, job.job_id) if job is not None and job.owner == session.owner else None
        )

    def manifest(self, function: FunctionRecord) -> dict[str, Any]:
        if function.function_id not in self.manifests:
            try:
                self.manifests[function.function_id] = forms.manifest_of(self.grid, function)
            except (
                OSError,
                KeyError,
                ValueError,
            ):  # no package (deleted meanwhile): nothing to say of it
                self.manifests[function.function_id] = {}
        return self.manifests[function.function_id]

    def as_page(
        self, api_handler: Callable[[Request, Any], Response | Awaitable[Response]]
    ) -> Callable[[Request, Any], Awaitable[Response]]:
        """The API's error handler, answering an HTML page on /ui paths: the same status, headers and words."""

        async def handle(request: Request, exc: Any) -> Response:
            answer = api_handler(request, exc)
            if inspect.isawaitable(answer):
                answer = await answer
            if not request.url.path.startswith("/ui") or not isinstance(answer, JSONResponse):
                return answer
            detail = json.loads(bytes(answer.body)).get("detail", "")
            if answer.status_code == 404 and detail == "Not Found":
                detail = f"there is no page {request.url.path}"
            session = self.session_of(request)
            headers = {
                k: v
                for k, v in answer.headers.items()
                if k.lower() in ("retry-after", "allow", "x-request-id")
            }
            page = self.render(
                "error.html",
                answer.status_code,
                title=f"Error {answer.status_code}",
                status=answer.status_code,
                detail=detail,
                section="",
                owner=session.owner if session else None,
                csrf=session.csrf if session else "",
            )
            page.headers.update(headers)
            return page

        return handle
