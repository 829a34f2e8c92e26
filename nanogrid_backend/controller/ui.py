"""The dashboard at ``/ui``: server-rendered pages (Jinja2, inline SVG charts, no JavaScript) over the same data as the
``/v1`` operations API, for an operator who never opens a notebook.

Signing in posts an API key once; the grid answers with a random session id in a cookie (HttpOnly,
SameSite=Strict, Secure over HTTPS, path /ui), so the key is never in a URL, a page or the browser's storage.
Sessions live in this controller's memory for ``SESSION_TTL_S`` and end at sign-out, at a restart, or once
the key is revoked. Every form carries the session's CSRF token. Each page shows only the signed-in owner's
functions, calls, load tests and warm sandboxes.
"""

# No ``from __future__ import annotations``: FastAPI reads the routes' annotations.
import json
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup, escape

from nanogrid_backend.controller import jobs
from nanogrid_backend.controller.history import TEXT_CAP, advise, apply_memory, history_entry, page, rates_for
from nanogrid_backend.controller.links import LinkSigner
from nanogrid_backend.controller.loadtests import LoadTestRequest, LoadTests
from nanogrid_backend.controller.ratelimit import key_limits, retry_after_header
from nanogrid_backend.grid import Grid
from nanogrid_backend.keys import AuthError
from nanogrid_backend.models import ApiKey

HERE = Path(__file__).parent / "ui"
COOKIE = "nanogrid_session"
SESSION_TTL_S = 8 * 3600
PAGE = 50
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin", "Cache-Control": "no-store",
}


@dataclass
class Session:
    key_id: str
    owner: str
    csrf: str
    expires: float


class NotSignedIn(Exception):
    pass


def _when(value: float | None) -> str:
    return "" if value is None else datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.1f} ms" if value < 10_000 else f"{value / 1000:.1f} s"


def _mib(value: int | None) -> str:
    return "" if value is None else f"{value / (1 << 20):.1f} MiB"


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:.1%}"


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def bars(title: str, series: list[tuple[str, float | None]], unit: str, width: int = 360, height: int = 180) -> Markup:
    """A small bar chart as inline SVG (presentation attributes only: the page's CSP allows no inline style)."""
    top, bottom, left = 34, 26, 8
    values = [v or 0.0 for _, v in series]
    peak = max(values, default=0.0) or 1.0
    slot = (width - 2 * left) / max(1, len(series))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{escape(title)}"><text x="{left}" y="14" font-size="12" font-weight="600">{escape(title)}</text>']
    for i, (label, value) in enumerate(series):
        h = (height - top - bottom) * (value or 0.0) / peak
        x, y = left + i * slot + slot * 0.15, height - bottom - h
        parts.append(f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{slot * 0.7:.1f}" height="{h:.1f}" '
                     f'fill="#3b6fd8"><title>{escape(label)}: {escape(_num(value))} {escape(unit)}</title></rect>')
        parts.append(f'<text x="{x + slot * 0.35:.1f}" y="{height - 10}" font-size="10" text-anchor="middle">'
                     f'{escape(label)}</text>')
        if value:
            parts.append(f'<text x="{x + slot * 0.35:.1f}" y="{y - 3:.1f}" font-size="10" text-anchor="middle">'
                         f'{escape(f"{value:.4g}")}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def charts(windows: dict[str, dict[str, Any]]) -> dict[str, Markup]:
    day = windows["24h"]
    return {
        "calls": bars("calls (errors in the table)", [(n, w["count"]) for n, w in windows.items()], "calls"),
        "duration": bars("duration p50 / p95 / p99, 24h", [(k, day["duration_ms"][k]) for k in ("p50", "p95", "p99")],
                         "ms"),
        "memory": bars("peak memory, 30d (calls per MiB bucket)",
                       [(f"≤{b['le']:.0f}", b["count"]) for b in windows["30d"]["peak_memory_mib"]["histogram"][-12:]],
                       "calls"),
    }


def router(grid: Grid, tests: LoadTests) -> APIRouter:
    ui = APIRouter(prefix="/ui", include_in_schema=False)
    templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
    templates.filters.update(when=_when, ms=_ms, mib=_mib, pct=_pct, num=_num)
    sessions: dict[str, Session] = {}
    links = LinkSigner(grid.secrets.link_key)  # output files open from a page in the browser, which has no API key

    def render(template: str, code: int = 200, /, **values: Any) -> HTMLResponse:
        return HTMLResponse(templates.get_template(template).render(**values), status_code=code,
                            headers=SECURITY_HEADERS)

    def signed_in(request: Request) -> Session:
        """The request's session, if it is current and its key still valid."""
        session = sessions.get(request.cookies.get(COOKIE, ""))
        if session is None or session.expires < time.time():
            raise NotSignedIn
        key = grid.registry.get_key(session.key_id)
        if key is None or key.revoked_at is not None:
            sessions.pop(request.cookies.get(COOKIE, ""), None)
            raise NotSignedIn
        wait = request.app.state.buckets.take(key.key_id, *key_limits(key, grid.config))  # the key's own bucket
        if wait:
            raise HTTPException(429, f"too many requests for this key; try again in {retry_after_header(wait)} s",
                                headers={"Retry-After": retry_after_header(wait)})
        return session

    def check_csrf(session: Session, token: str) -> None:
        if not secrets.compare_digest(session.csrf, token):
            raise HTTPException(403, "this form is stale (or came from another site): reload the page and try again")

    def page_of(request: Request, session: Session, template: str, section: str, /, **values: Any) -> HTMLResponse:
        return render(template, owner=session.owner, csrf=session.csrf, section=section, **values)

    def names(owner: str) -> dict[str, str]:
        return {f.function_id: f.function_name for f in grid.registry.list_functions(owner=owner)}

    def owned(function_id: str, session: Session) -> Any:
        function = grid.registry.get_function(function_id)
        if function is None or function.owner != session.owner:
            raise HTTPException(404, f"no function {function_id!r}")
        return function

    def cursor(before: str | None, session: Session) -> tuple[float, str] | None:
        if not before:
            return None
        job = grid.registry.get_job(before)
        return (job.created_at, job.job_id) if job is not None and job.owner == session.owner else None

    @ui.get("/static/ui.css")
    def css() -> FileResponse:
        return FileResponse(HERE / "ui.css", media_type="text/css", headers={"Cache-Control": "max-age=3600"})

    @ui.get("/login")
    def login_form() -> HTMLResponse:
        return render("login.html", title="Sign in")

    @ui.post("/login")
    def login(request: Request, api_key: str = Form(..., max_length=200)) -> Response:
        client = request.client.host if request.client else "?"
        wait = request.app.state.buckets.take(f"ui-login:{client}", 1.0, 10)  # guessing keys is slow
        if wait:
            return render("login.html", 429, title="Sign in", error=f"too many attempts; try again in {wait:.0f} s")
        try:
            key: ApiKey = request.app.state.authenticator.check(api_key)
        except AuthError as exc:
            return render("login.html", 401, title="Sign in", error=str(exc))
        token = secrets.token_urlsafe(32)
        sessions[token] = Session(key.key_id, key.name, secrets.token_urlsafe(24), time.time() + SESSION_TTL_S)
        for stale in [t for t, s in sessions.items() if s.expires < time.time()]:
            sessions.pop(stale, None)
        response = RedirectResponse("/ui", status_code=303)
        response.set_cookie(COOKIE, token, max_age=SESSION_TTL_S, path="/ui", httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")
        return response

    @ui.post("/logout")
    def logout(request: Request, csrf: str = Form("")) -> Response:
        session = signed_in(request)
        check_csrf(session, csrf)
        sessions.pop(request.cookies.get(COOKIE, ""), None)
        response = RedirectResponse("/ui/login", status_code=303)
        response.delete_cookie(COOKIE, path="/ui")
        return response

    @ui.get("")
    def functions(request: Request) -> HTMLResponse:
        session = signed_in(request)
        listed = [(f, grid.registry.function_windows(f.function_id, names=("24h",))["24h"])
                  for f in grid.registry.list_functions(owner=session.owner)]
        return page_of(request, session, "functions.html", "Functions", title="Functions", functions=listed)

    @ui.get("/functions/{function_id}")
    def function(request: Request, function_id: str, status: str = "", before: str = "") -> HTMLResponse:
        session = signed_in(request)
        record = owned(function_id, session)
        windows = grid.registry.function_windows(function_id)
        entries = grid.registry.list_history(session.owner, function_id, status or None, PAGE, cursor(before, session),
                                             TEXT_CAP)
        return page_of(request, session, "function.html", "Functions", title=record.function_name, function=record,
                       windows=windows, charts=charts(windows), history=page(entries, PAGE), status=status,
                       advice=advise(grid, record, rates_for(grid), windows))

    @ui.post("/functions/{function_id}/autotune")
    def autotune(request: Request, function_id: str, csrf: str = Form(""), memory_mib: int = Form(...)) -> Response:
        session = signed_in(request)
        check_csrf(session, csrf)
        version = apply_memory(grid, owned(function_id, session), memory_mib)
        return RedirectResponse(f"/ui/functions/{version.function_id}", status_code=303)

    @ui.get("/jobs")
    def job_list(request: Request, status: str = "", before: str = "") -> HTMLResponse:
        session = signed_in(request)
        entries = grid.registry.list_history(session.owner, None, status or None, PAGE, cursor(before, session),
                                             TEXT_CAP)
        return page_of(request, session, "jobs.html", "Jobs", title="Jobs", history=page(entries, PAGE),
                       status=status, names=names(session.owner))

    @ui.get("/jobs/{job_id}")
    def job(request: Request, job_id: str) -> HTMLResponse:
        session = signed_in(request)
        record = grid.registry.get_job(job_id)
        if record is None or record.owner != session.owner:
            raise HTTPException(404, f"no job {job_id!r}")
        name = names(session.owner).get(record.function_id, record.function_id)
        files = jobs.job_view(record, with_result=False, links=links)["output_files"]  # signed: the page has no key
        return page_of(request, session, "job.html", "Jobs", title=job_id, call=history_entry(record), name=name,
                       files=files)

    @ui.get("/workers")
    def workers(request: Request) -> HTMLResponse:
        from nanogrid_backend.controller.app import scoped_worker  # the same allow-list /v1/system/status applies

        session = signed_in(request)
        mine = names(session.owner)
        depth = grid.queue.depth_of(session.owner)
        if depth is None:
            depth = grid.registry.count_jobs(owner=session.owner).get("pending", 0)
        return page_of(request, session, "workers.html", "Workers", title="Workers", names=mine, queue_depth=depth,
                       workers=[scoped_worker(w, set(mine)) for w in jobs.live_workers(grid)])

    @ui.get("/loadtests")
    def loadtests(request: Request, error: str = "") -> HTMLResponse:
        session = signed_in(request)
        listed = tests.listing(session.owner)
        return page_of(request, session, "loadtests.html", "Load tests", title="Load tests", tests=listed,
                       functions=grid.registry.list_functions(owner=session.owner), error=error,
                       refresh=2 if any(not t["done"] for t in listed) else None)

    @ui.post("/loadtests")
    def start_loadtest(request: Request, csrf: str = Form(""), function_id: str = Form(...), rps: float = Form(...),
                       duration_s: float = Form(...), input: str = Form("{}")) -> Response:
        session = signed_in(request)
        check_csrf(session, csrf)
        record = owned(function_id, session)
        try:
            value = json.loads(input or "null")
            body = LoadTestRequest(function_id=function_id, rps=rps, duration_s=duration_s,
                                   **({"args": value} if record.kind == "pickle" else {"payload": value}))
            key = grid.registry.get_key(session.key_id)
            tests.start(session.owner, record, body, key.max_timeout_s if key else None)
        except (ValueError, HTTPException) as exc:
            return loadtests(request, error=str(getattr(exc, "detail", exc)))
        return RedirectResponse("/ui/loadtests", status_code=303)

    return ui


def install(app: Any, grid: Grid, tests: LoadTests) -> None:
    """Add the pages; a page asked for without a session goes to the sign-in form."""
    app.include_router(router(grid, tests))

    @app.exception_handler(NotSignedIn)
    async def sign_in_first(request: Request, exc: NotSignedIn) -> Response:
        return RedirectResponse("/ui/login", status_code=303)
