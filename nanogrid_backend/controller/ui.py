"""The dashboard at ``/ui``: server-rendered pages (Jinja2, inline SVG charts, no JavaScript) over the same data as the
``/v1`` operations API, for an operator who never opens a notebook: deploy, test-run, update and delete functions
(through the API's own core, ui_deploy.py), their calls and errors over time, jobs with their output files, the
built environments, workers and load tests.

Signing in posts an API key once; the grid answers with a random session id in a cookie (HttpOnly,
SameSite=Strict, Secure over HTTPS, path /ui), so the key is never in a URL, a page or the browser's storage.
Sessions live in this controller's memory for ``SESSION_TTL_S`` and end at sign-out, at a restart, or once
the key is revoked. Every form that changes something carries the session's CSRF token. Each page shows only the
signed-in owner's functions, calls, environments, load tests and warm sandboxes; refusals and errors on /ui are pages.
"""

# No ``from __future__ import annotations``: FastAPI reads the routes' annotations.
import asyncio
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup, escape
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanogrid_backend.controller import jobs, ui_deploy
from nanogrid_backend.controller.history import TEXT_CAP, advise, apply_memory, history_entry, page, rates_for
from nanogrid_backend.controller.links import LinkSigner
from nanogrid_backend.controller.loadtests import LoadTestRequest, LoadTests
from nanogrid_backend.controller.ratelimit import key_limits, retry_after_header
from nanogrid_backend.grid import Grid
from nanogrid_backend.keys import LOCAL_KEY_FILE, AuthError
from nanogrid_backend.models import ApiKey, FunctionRecord, JobRecord
from nanogrid_backend.package_checks import PackageError

HERE = Path(__file__).parent / "ui"
COOKIE = "nanogrid_session"
SESSION_TTL_S = 8 * 3600
PAGE = 50
TEST_WAIT_S = 10.0  # a test run's form waits this long for the call before showing its (refreshing) job page
RESULT_CHARS = 20_000
# window -> (its span, one bar's width) in seconds: the calls and errors over time of a function's page
TIMELINES = {"1h": (3600, 300), "24h": (86400, 3600), "7d": (7 * 86400, 6 * 3600), "30d": (30 * 86400, 86400)}
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


def timeline(window: str, points: list[tuple[int, int, int]], now: float, width: int = 270, height: int = 120) -> Markup:
    """Calls (blue) and failed calls (red, in front) per bar over one window, as inline SVG."""
    span, step = TIMELINES[window]
    count, last = span // step, int(now // step)
    calls, failed = [0] * count, [0] * count
    for start, n, errors in points:
        i = count - 1 - (last - int(start // step))
        if 0 <= i < count:
            calls[i] += n
            failed[i] += errors
    top, bottom, left = 22, 16, 6
    peak, slot = max(calls) or 1, (width - 2 * left) / count
    title = f"{window}: {sum(calls)} calls, {sum(failed)} failed"
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{escape(title)}"><text x="{left}" y="14" font-size="12" font-weight="600">{escape(title)}'
             f'</text><line x1="{left}" x2="{width - left}" y1="{height - bottom}" y2="{height - bottom}" '
             f'stroke="#c5ccd6"/><text x="{left}" y="{height - 3}" font-size="10">−{escape(window)}</text>'
             f'<text x="{width - left}" y="{height - 3}" font-size="10" text-anchor="end">now</text>']
    for i, (n, errors) in enumerate(zip(calls, failed, strict=True)):
        if not n:
            continue
        x, label = left + i * slot, _when((last - count + 1 + i) * step)
        for kind, value, colour in (("calls", n, "#3b6fd8"), ("errors", errors, "#d92d20")):
            if value:
                h = max(1.0, (height - top - bottom) * value / peak)
                parts.append(f'<rect class="{kind}" x="{x:.1f}" y="{height - bottom - h:.1f}" width="{slot * 0.8:.1f}" '
                             f'height="{h:.1f}" fill="{colour}"><title>{escape(label)} UTC: {n} calls, {errors} failed'
                             f'</title></rect>')
    parts.append("</svg>")
    return Markup("".join(parts))


def grouped(functions: list[FunctionRecord]) -> list[list[FunctionRecord]]:
    """A function's versions together, newest first: those of one stable id (a seed function's updates and their
    AutoTuner versions), else those of one name."""
    groups: dict[str, list[FunctionRecord]] = {}
    for function in sorted(functions, key=lambda f: -f.created_at):
        groups.setdefault(function.stable_id or f"name:{function.function_name}", []).append(function)
    return list(groups.values())


def summed(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """Calls and errors of several versions' windows together; the error rate of them all."""
    count, errors = sum(w["count"] for w in windows), sum(w["errors"] for w in windows)
    return {"count": count, "errors": errors, "error_rate": errors / count if count else None}


def result_text(job: JobRecord) -> str:
    """The result as the page shows it: JSON pretty-printed; a Python value is for the client to read."""
    view = jobs.job_view(job)
    if view.get("result") is not None:
        return json.dumps(view["result"], indent=2, ensure_ascii=False)[:RESULT_CHARS]
    if view.get("result_pickle") or view.get("result_blob"):
        return "(a Python value: read it with nanogrid's client, FunctionCall.get())"
    return ""


class Dashboard:
    """The dashboard's state: its templates, the signed-in sessions, and what it caches of immutable records."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
        self.templates.filters.update(when=_when, ms=_ms, mib=_mib, pct=_pct, num=_num)
        self.sessions: dict[str, Session] = {}
        self.manifests: dict[str, dict[str, Any]] = {}  # function id -> manifest: ids are content hashes

    def render(self, template: str, code: int = 200, /, **values: Any) -> HTMLResponse:
        return HTMLResponse(self.templates.get_template(template).render(**values), status_code=code,
                            headers=SECURITY_HEADERS)

    def session_of(self, request: Request) -> Session | None:
        session = self.sessions.get(request.cookies.get(COOKIE, ""))
        return session if session is not None and session.expires >= time.time() else None

    def manifest(self, function: FunctionRecord) -> dict[str, Any]:
        if function.function_id not in self.manifests:
            try:
                self.manifests[function.function_id] = ui_deploy.manifest_of(self.grid, function)
            except (OSError, KeyError, ValueError):  # no package (deleted meanwhile): nothing to say of it
                self.manifests[function.function_id] = {}
        return self.manifests[function.function_id]

    def as_page(self, api_handler: Callable[[Request, Any], Awaitable[Response]]
                ) -> Callable[[Request, Any], Awaitable[Response]]:
        """The API's error handler, answering an HTML page on /ui paths: the same status, headers and words."""

        async def handle(request: Request, exc: Any) -> Response:
            answer = await api_handler(request, exc)
            if not request.url.path.startswith("/ui") or not isinstance(answer, JSONResponse):
                return answer
            detail = json.loads(bytes(answer.body)).get("detail", "")
            if answer.status_code == 404 and detail == "Not Found":
                detail = f"there is no page {request.url.path}"
            session = self.session_of(request)
            headers = {k: v for k, v in answer.headers.items() if k.lower() in ("retry-after", "allow", "x-request-id")}
            page = self.render("error.html", answer.status_code, title=f"Error {answer.status_code}",
                               status=answer.status_code, detail=detail, section="",
                               owner=session.owner if session else None, csrf=session.csrf if session else "")
            page.headers.update(headers)
            return page

        return handle


def router(dashboard: Dashboard, tests: LoadTests) -> APIRouter:
    ui = APIRouter(prefix="/ui", include_in_schema=False)
    grid, render, sessions = dashboard.grid, dashboard.render, dashboard.sessions
    links = LinkSigner(grid.secrets.link_key)  # output files open from a page in the browser, which has no API key

    def signed_in(request: Request) -> Session:
        """The request's session, if it is current and its key still valid."""
        session = dashboard.session_of(request)
        if session is None:
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

    def changing(request: Request, csrf: str) -> tuple[Session, ApiKey]:
        """A form that changes something: signed in, with this session's CSRF token; the session's key."""
        session = signed_in(request)
        if not secrets.compare_digest(session.csrf, csrf):
            raise HTTPException(403, "this form is stale (or came from another site): reload the page and try again")
        key = grid.registry.get_key(session.key_id)
        if key is None:
            raise NotSignedIn
        return session, key

    def page_of(session: Session, template: str, section: str, code: int = 200, /, **values: Any) -> HTMLResponse:
        return render(template, code, owner=session.owner, csrf=session.csrf, section=section, **values)

    def names(owner: str) -> dict[str, str]:
        return {f.function_id: f.function_name for f in grid.registry.list_functions(owner=owner)}

    def owned(function_id: str, session: Session) -> FunctionRecord:
        function = grid.registry.get_function(function_id)
        if function is None or function.owner != session.owner:
            raise HTTPException(404, f"no function {function_id!r}")
        return function

    def versions_of(function: FunctionRecord) -> list[FunctionRecord]:
        mine = grid.registry.list_functions(owner=function.owner)
        return next((g for g in grouped(mine) if function in g), [function])

    def cursor(before: str | None, session: Session) -> tuple[float, str] | None:
        if not before:
            return None
        job = grid.registry.get_job(before)
        return (job.created_at, job.job_id) if job is not None and job.owner == session.owner else None

    @ui.get("/static/ui.css")
    def css() -> FileResponse:
        return FileResponse(HERE / "ui.css", media_type="text/css", headers={"Cache-Control": "max-age=3600"})

    def login_page(code: int = 200, error: str = "") -> HTMLResponse:
        return render("login.html", code, title="Sign in", error=error,
                      local_key=Path(grid.config.data_dir) / LOCAL_KEY_FILE)

    @ui.get("/login")
    def login_form() -> HTMLResponse:
        return login_page()

    @ui.post("/login")
    def login(request: Request, api_key: str = Form("", max_length=200)) -> Response:
        client = request.client.host if request.client else "?"
        wait = request.app.state.buckets.take(f"ui-login:{client}", 1.0, 10)  # guessing keys is slow
        if wait:
            return login_page(429, f"too many attempts; try again in {wait:.0f} s")
        try:
            key: ApiKey = request.app.state.authenticator.check(api_key)
        except AuthError as exc:
            return login_page(401, str(exc))
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
        changing(request, csrf)
        sessions.pop(request.cookies.get(COOKIE, ""), None)
        response = RedirectResponse("/ui/login", status_code=303)
        response.delete_cookie(COOKIE, path="/ui")
        return response

    @ui.get("")
    def functions(request: Request) -> HTMLResponse:
        session = signed_in(request)
        rows = []
        for versions in grouped(grid.registry.list_functions(owner=session.owner)):
            days = [grid.registry.function_windows(v.function_id, names=("24h",))["24h"] for v in versions]
            rows.append({"current": versions[0], "day": days[0], "all": summed(days),
                         "versions": list(zip(versions, days, strict=True))})
        return page_of(session, "functions.html", "Functions", title="Functions", rows=rows)

    @ui.get("/functions/{function_id}")
    def function(request: Request, function_id: str, status: str = "", before: str = "", error: str = "",
                 code: int = 200) -> HTMLResponse:
        session = signed_in(request)
        record = owned(function_id, session)
        windows = grid.registry.function_windows(function_id)
        entries = grid.registry.list_history(session.owner, function_id, status or None, PAGE, cursor(before, session),
                                             TEXT_CAP)
        now = time.time()
        hourly = grid.registry.function_timeline(function_id, "30d", now)  # 24h and 7d are counted by the hour too
        timelines = {w: timeline(w, grid.registry.function_timeline(function_id, w, now) if w == "1h" else hourly, now)
                     for w in TIMELINES}
        manifest = dashboard.manifest(record)
        return page_of(session, "function.html", "Functions", code, title=record.function_name, function=record,
                       windows=windows, charts=charts(windows), timelines=timelines, history=page(entries, PAGE),
                       status=status, advice=advise(grid, record, rates_for(grid), windows),
                       versions=versions_of(record), error=error, environment=ui_deploy.environment_of(manifest),
                       env_names=sorted(manifest.get("env") or {}), secret_names=manifest.get("secrets") or [],
                       example="[]" if record.kind == "pickle" else '{"name": "grid"}')

    @ui.post("/functions/{function_id}/autotune")
    def autotune(request: Request, function_id: str, csrf: str = Form(""), memory_mib: str = Form("")) -> Response:
        session, _ = changing(request, csrf)
        if not memory_mib.isdigit():
            raise HTTPException(422, f"memory is a whole number of MiB, not {memory_mib[:20]!r}")
        version = apply_memory(grid, owned(function_id, session), int(memory_mib))
        return RedirectResponse(f"/ui/functions/{version.function_id}", status_code=303)

    @ui.post("/functions/{function_id}/update")
    def update(request: Request, function_id: str, csrf: str = Form(""), memory: str = Form("", max_length=16),
               description: str = Form("", max_length=1000)) -> Response:
        session, key = changing(request, csrf)
        record = owned(function_id, session)
        try:
            version = ui_deploy.new_version(grid, key, record, memory, description)
        except (PackageError, jobs.BadRequest) as exc:
            return function(request, function_id, error=str(exc), code=exc.status)
        return RedirectResponse(f"/ui/functions/{version.function_id}", status_code=303)

    @ui.post("/functions/{function_id}/run")
    async def test_run(request: Request, function_id: str, csrf: str = Form(""),
                       input: str = Form("", max_length=1 << 20)) -> Response:
        session, key = changing(request, csrf)
        record = owned(function_id, session)
        try:
            job = await asyncio.to_thread(ui_deploy.test_call, grid, key, record, input)
        except (PackageError, jobs.BadRequest) as exc:
            return await asyncio.to_thread(function, request, function_id, error=str(exc), code=exc.status)
        await jobs.wait_for(grid, job.job_id, TEST_WAIT_S)  # then the job page, which refreshes itself until it ends
        return RedirectResponse(f"/ui/jobs/{job.job_id}", status_code=303)

    @ui.post("/functions/{function_id}/delete")
    def delete(request: Request, function_id: str, csrf: str = Form("")) -> Response:
        session, _ = changing(request, csrf)
        ui_deploy.delete(grid, versions_of(owned(function_id, session)))
        return RedirectResponse("/ui", status_code=303)

    def deploy_page(session: Session, runtime: str, code: int = 200, error: str = "",
                    values: dict[str, str] | None = None) -> HTMLResponse:
        runtimes = sorted(grid.runtimes)
        runtime = runtime if runtime in runtimes else grid.config.python_runtime
        starter = ui_deploy.starter_for(runtime)
        values = values or {"code": starter.code, "memory": str(grid.config.default_memory_mib),
                            "timeout": f"{grid.config.default_timeout_s:g}"}
        return page_of(session, "deploy.html", "Deploy", code, title="Deploy", runtimes=runtimes, runtime=runtime,
                       starter=starter, values=values, error=error, max_memory=grid.config.max_memory_mib)

    @ui.get("/deploy")
    def deploy_form(request: Request, runtime: str = "") -> HTMLResponse:
        return deploy_page(signed_in(request), runtime)

    @ui.post("/deploy")
    async def deploy(request: Request, csrf: str = Form(""), file: UploadFile | None = File(None),
                     name: str = Form("", max_length=64), runtime: str = Form("", max_length=32),
                     handler: str = Form("", max_length=200), memory: str = Form("", max_length=16),
                     timeout: str = Form("", max_length=16), description: str = Form("", max_length=1000),
                     env: str = Form("", max_length=65536), secrets_: str = Form("", alias="secrets", max_length=8192),
                     code: str = Form("", max_length=ui_deploy.MAX_EDITOR_CHARS)) -> Response:
        session, key = changing(request, csrf)
        fields = {"name": name, "runtime": runtime, "handler": handler, "memory": memory, "timeout": timeout,
                  "description": description, "env": env, "secrets": secrets_, "code": code}
        data = await file.read() if file is not None else b""
        try:
            record = await asyncio.to_thread(ui_deploy.deploy, grid, key, fields, file.filename or "" if file else "",
                                             data)
        except (PackageError, jobs.BadRequest) as exc:
            return deploy_page(session, runtime, exc.status, str(exc), fields)
        return RedirectResponse(f"/ui/functions/{record.function_id}", status_code=303)

    @ui.get("/jobs")
    def job_list(request: Request, status: str = "", before: str = "") -> HTMLResponse:
        session = signed_in(request)
        entries = grid.registry.list_history(session.owner, None, status or None, PAGE, cursor(before, session),
                                             TEXT_CAP)
        return page_of(session, "jobs.html", "Jobs", title="Jobs", history=page(entries, PAGE), status=status,
                       names=names(session.owner))

    @ui.get("/jobs/{job_id}")
    def job(request: Request, job_id: str) -> HTMLResponse:
        session = signed_in(request)
        record = grid.registry.get_job(job_id)
        if record is None or record.owner != session.owner:
            raise HTTPException(404, f"no job {job_id!r}")
        function = grid.registry.get_function(record.function_id)
        manifest = dashboard.manifest(function) if function is not None else {}
        files = jobs.job_view(record, with_result=False, links=links)["output_files"]  # signed: the page has no key
        return page_of(session, "job.html", "Jobs", title=job_id, call=history_entry(record), function=function,
                       name=function.function_name if function else record.function_id, files=files,
                       result=result_text(record), environment=ui_deploy.environment_of(manifest),
                       python=manifest.get("python"), refresh=None if record.finished else 2)

    def shown_environments(session: Session) -> tuple[list[dict[str, Any]], bool]:
        """The built environments this owner's functions use (every one for an admin key), with their users, and
        whether this key is an admin's. One another owner uses too is removable by an admin only."""
        key = grid.registry.get_key(session.key_id)
        admin = bool(key and key.admin)
        users: dict[str, list[FunctionRecord]] = {}
        for f in grid.registry.list_functions(owner=None):
            env_id = ui_deploy.environment_of(dashboard.manifest(f))
            if env_id:
                users.setdefault(env_id, []).append(f)
        shown = []
        for info in grid.environments.list() if grid.environments is not None else []:
            using = users.get(info["env_id"], [])
            mine = [f for f in using if f.owner == session.owner]
            if admin or mine:  # another owner's packages are theirs to see
                shown.append({**info, "functions": using if admin else mine,
                              "removable": admin or len(mine) == len(using)})
        return shown, admin

    @ui.get("/environments")
    def environments(request: Request) -> HTMLResponse:
        session = signed_in(request)
        shown, admin = shown_environments(session)
        return page_of(session, "environments.html", "Environments", title="Environments", environments=shown,
                       cache=grid.environments is not None, admin=admin)

    @ui.post("/environments/{env_id}/remove")
    def remove_environment(request: Request, env_id: str, csrf: str = Form("")) -> Response:
        session, _ = changing(request, csrf)
        found = {e["env_id"]: e for e in shown_environments(session)[0]}
        if env_id not in found or grid.environments is None:
            raise HTTPException(404, f"no environment {env_id!r} among those your functions use")
        if not found[env_id]["removable"]:
            raise HTTPException(403, f"environment {env_id} is used by other owners' functions too: only an admin "
                                     "key may remove it")
        grid.environments.remove(env_id)
        return RedirectResponse("/ui/environments", status_code=303)

    @ui.get("/workers")
    def workers(request: Request) -> HTMLResponse:
        from nanogrid_backend.controller.app import scoped_worker  # the same allow-list /v1/system/status applies

        session = signed_in(request)
        mine = names(session.owner)
        depth = grid.queue.depth_of(session.owner)
        if depth is None:
            depth = grid.registry.count_jobs(owner=session.owner).get("pending", 0)
        return page_of(session, "workers.html", "Workers", title="Workers", names=mine, queue_depth=depth,
                       workers=[scoped_worker(w, set(mine)) for w in jobs.live_workers(grid)])

    @ui.get("/loadtests")
    def loadtests(request: Request, error: str = "") -> HTMLResponse:
        session = signed_in(request)
        listed = tests.listing(session.owner)
        return page_of(session, "loadtests.html", "Load tests", title="Load tests", tests=listed,
                       functions=grid.registry.list_functions(owner=session.owner), error=error,
                       refresh=2 if any(not t["done"] for t in listed) else None)

    @ui.post("/loadtests")
    def start_loadtest(request: Request, csrf: str = Form(""), function_id: str = Form(""), rps: str = Form(""),
                       duration_s: str = Form(""), input: str = Form("{}")) -> Response:
        session, key = changing(request, csrf)
        record = owned(function_id, session)
        try:
            value = json.loads(input or "null")
            body = LoadTestRequest(function_id=function_id, rps=float(rps), duration_s=float(duration_s),
                                   **({"args": value} if record.kind == "pickle" else {"payload": value}))
            tests.start(session.owner, record, body, key.max_timeout_s)
        except (ValueError, HTTPException) as exc:
            return loadtests(request, error=str(getattr(exc, "detail", exc)))
        return RedirectResponse("/ui/loadtests", status_code=303)

    return ui


def install(app: Any, grid: Grid, tests: LoadTests) -> None:
    """Add the pages; a page asked for without a session goes to the sign-in form, and any refusal or error on a
    /ui path is answered as a page (the API's handlers answer JSON everywhere else)."""
    dashboard = Dashboard(grid)
    app.include_router(router(dashboard, tests))

    @app.exception_handler(NotSignedIn)
    async def sign_in_first(request: Request, exc: NotSignedIn) -> Response:
        return RedirectResponse("/ui/login", status_code=303)

    for kind in (StarletteHTTPException, PackageError, jobs.BadRequest, RequestValidationError, Exception):
        api_handler = app.exception_handlers.get(kind)
        if api_handler is not None:
            app.add_exception_handler(kind, dashboard.as_page(api_handler))
