"""``POST /v1/run`` served straight from ASGI: the warm call without FastAPI's routing, dependency solving and
request and response classes.

A warm call spent about 300 µs of the grid's CPU in them (a profile of ``benchmarks/bench_profile.py``: FastAPI
184 µs a call, Starlette 86, anyio 27), more than the sandbox's whole side of the exchange. This layer sits
inside the app's one middleware (``limits.RequestGate``: request durations and the body cap still apply) and
takes the requests it can serve exactly as the route in ``routes/jobs.py`` would: a JSON body that validates,
a valid API key within its rate limit, a function of the caller's, a payload that passes its checks. Anything
else (a wrong key, a bad body, an unknown function, a 429) is passed on untouched, its body replayed, to the
FastAPI route, which answers it as it always has: both paths share ``routes.jobs.call`` and
``run_payloads``, so what a call does never depends on which path took it, and the OpenAPI schema still
describes the route.
"""

from __future__ import annotations

import inspect
import json
import math
from typing import Any, NamedTuple

import pydantic
from fastapi import FastAPI
from starlette.requests import Request
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nanogrid_backend.controller.jobs import BadRequest
from nanogrid_backend.controller.routes import jobs as job_routes
from nanogrid_backend.controller.routes.deps import known_function, open_key, take_token
from nanogrid_backend.controller.schemas import JobView, RunRequest
from nanogrid_backend.keys import AuthError
from nanogrid_backend.models import ApiKey, FunctionRecord

PATH = "/v1/run"
BODY_CAP = 1 << 20  # bigger bodies (arguments near the inline cap) are rare: the route reads them


class _Accepted(NamedTuple):
    """What a call this layer serves needs, read from its request."""

    caller: ApiKey
    function: FunctionRecord
    request: RunRequest
    payloads: list[tuple[str, bytes]]
    asynchronous: bool
    hold: float | None
    host: bytes | None  # the first Host header, as Starlette reads it (the answer's base URL)


class FastRun:
    """The ASGI layer in front of the app's routes that serves the warm ``POST /v1/run`` (see the module)."""

    def __init__(self, app: ASGIApp, owner: FastAPI) -> None:
        self.app = app
        self.owner = owner  # the FastAPI app: its state, its /v1/run route, its error handlers
        self._run_route: BaseRoute | None = None
        # the answer's base URL (for output links) by what it is made of: a Starlette Request and URL cost ~12 µs
        self._base_urls: dict[tuple[Any, ...], str] = {}
        self.served = 0  # calls this layer answered (the others went on to the routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        body, more = await _read_body(receive)
        accepted = None if more else self._accept(scope, body)
        if accepted is None:
            await self.app(scope, _replay(body, more, receive), send)
            return
        caller, function, request, payloads, asynchronous, hold, host = accepted
        self.served += 1
        state = self.owner.state
        scope["route"] = self._route()  # request durations are labelled by route, as for the route
        try:
            job, status = await job_routes.call(
                state.grid,
                function,
                caller,
                payloads,
                request.model,
                asynchronous=asynchronous,
                hold=hold,
                gone=lambda: _disconnected(receive),
            )
            view = JobView.plain(job, self._base_url(scope, host), True, state.links)
        except Exception as exc:
            await self._answer_error(scope, receive, send, exc)
            return
        await _send_json(send, status, view)

    def _accept(self, scope: Scope, body: bytes) -> _Accepted | None:
        """What the call needs if this layer may serve it, else None (the route answers it). Nothing here changes
        any state but the key's rate-limit token, taken last."""
        api_key = bearer = host = None
        asynchronous, hold = False, None
        json_body = False
        for name, value in scope["headers"]:
            if name == b"x-api-key":
                api_key = value.decode("latin-1")
            elif name == b"authorization":
                scheme, _, credentials = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer" and credentials:
                    bearer = credentials
            elif name == b"content-type":
                json_body = value.split(b";")[0].strip().lower() == b"application/json"
            elif name == b"x-async":
                if value.lower() not in (b"true", b"false"):
                    return None
                asynchronous = value.lower() == b"true"
            elif name == b"host" and host is None:
                host = value
            elif name == b"x-hold":
                try:
                    hold = float(value)
                except ValueError:
                    return None
                if not 0 <= hold <= job_routes.SYNC_WAIT_CAP_S or math.isnan(hold):
                    return None
        if not json_body:
            return None
        try:
            request = RunRequest.model_validate_json(body)
        except pydantic.ValidationError:
            return None
        state = self.owner.state
        presented = api_key or bearer
        if presented is None:
            presented = open_key(Request(scope))
        try:
            caller = state.authenticator.check(presented)
        except AuthError:
            return None
        function = known_function(state, request.function_id, caller)
        if function is None:
            return None
        try:
            payloads = job_routes.run_payloads(state.grid, function, caller, request)
        except BadRequest:
            return None
        if take_token(state, caller)[0]:
            return None  # over its rate limit: the route says so, with its Retry-After
        return _Accepted(caller, function, request, payloads, asynchronous, hold, host)

    def _base_url(self, scope: Scope, host: bytes | None) -> str:
        """``base_url(request)`` as the route has it, made once per scheme, server, root path and Host (``host``:
        the request's, found by ``_accept`` as it read the headers)."""
        key = (
            scope.get("scheme"),
            scope.get("server"),
            scope.get("root_path", ""),
            scope.get("app_root_path"),
            host,
        )
        base_url = self._base_urls.get(key)
        if base_url is None:
            if len(self._base_urls) >= 256:  # Host is the client's to choose
                self._base_urls.clear()
            base_url = self._base_urls[key] = str(Request(scope).base_url).rstrip("/")
        return base_url

    def _route(self) -> BaseRoute:
        if self._run_route is None:
            self._run_route = next(
                route
                for route in self.owner.router.routes
                if getattr(route, "path", None) == PATH and "POST" in getattr(route, "methods", ())
            )
        return self._run_route

    async def _answer_error(
        self, scope: Scope, receive: Receive, send: Send, exc: Exception
    ) -> None:
        """A failure after the call was accepted (a locked registry, a full disk, a bug) answered by the app's own
        handler for it, as the route's would be."""
        handlers = self.owner.exception_handlers
        handler = next((handlers[k] for k in type(exc).__mro__ if k in handlers), None)
        if handler is None:
            raise exc
        response = handler(Request(scope, receive), exc)
        if inspect.isawaitable(response):
            response = await response
        await response(scope, receive, send)


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    """The request's body as far as it was read, and whether more is to come (a body over ``BODY_CAP``, or one
    whose client went away before its end): such a request goes to the route."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), True
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), False
        if size > BODY_CAP:
            return b"".join(chunks), True


def _replay(body: bytes, more: bool, receive: Receive) -> Receive:
    """``receive`` for the route: what was read of the body first, then the rest (or the disconnect) as it comes."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": more}

    return replay


async def _disconnected(receive: Receive) -> None:
    """Returns once the client has gone: its body was read, so the next message is the disconnect."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send_json(send: Send, status: int, content: Any) -> None:
    """The answer as Starlette's JSONResponse encodes it."""
    data = json.dumps(
        content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
    ).encode("utf-8")
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-length", str(len(data)).encode()),
                (b"content-type", b"application/json"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})
