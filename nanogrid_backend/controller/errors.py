"""One shape for every error the controller answers: ``{"detail": what was wrong and what to do, "error": code}``.

``detail`` is for people (the client shows it); ``error`` is a stable code for programs, one per status
(``ERROR_CODES``). A 500 also carries ``request_id``, which is logged with the traceback.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from nanogrid_backend.controller.jobs import BadRequest
from nanogrid_backend.package_checks import PackageError
from nanogrid_backend.registry.base import RegistryBusy

log = logging.getLogger(__name__)

ERROR_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid",
    429: "rate_limited",
    500: "internal",
    503: "unavailable",
    507: "insufficient_storage",
}
DISK_FULL = (
    "the grid's disk is full; nothing was recorded: its operator must free space, then try again"
)


def error_body(status: int, detail: str, **extra: str) -> dict[str, str]:
    return {"detail": detail, "error": ERROR_CODES.get(status, f"http_{status}"), **extra}


def install_error_handlers(app: FastAPI) -> None:
    """Route every refusal (HTTP errors, bad packages, bad requests, schema violations) through ``client_error``."""
    for kind in (StarletteHTTPException, PackageError, BadRequest, RequestValidationError):
        app.add_exception_handler(kind, client_error)
    app.add_exception_handler(RegistryBusy, registry_busy)
    for storage in (sqlite3.OperationalError, OSError):
        app.add_exception_handler(storage, storage_error)
    app.add_exception_handler(Exception, server_error)


def disk_full(exc: BaseException) -> bool:
    """The registry or the store had no space left: the operator's problem to fix, not a bug in the grid."""
    if isinstance(exc, sqlite3.OperationalError):
        return getattr(exc, "sqlite_errorname", "") == "SQLITE_FULL"
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


async def storage_error(request: Request, exc: Exception) -> JSONResponse:
    """A full disk answers 507 with what to do; any other storage error a 500. Both are answered here rather than by
    Starlette's last-resort handler, which closes the connection after its 500 while the client may be reusing it."""
    if not disk_full(exc):
        return await server_error(request, exc)
    log.error("%s %s: the disk is full: %s", request.method, request.url.path, exc)
    return JSONResponse(error_body(507, DISK_FULL), status_code=507)


async def registry_busy(request: Request, exc: Exception) -> JSONResponse:
    """The registry stayed locked by another process (a backup, an operator's shell): try again shortly."""
    log.warning("%s %s: %s", request.method, request.url.path, exc)
    body = error_body(
        503,
        "the grid's registry is locked by another process (a backup or an operator's shell); "
        "nothing was recorded: try again in a few seconds",
    )
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})


async def client_error(request: Request, exc: Exception) -> JSONResponse:
    headers: dict[str, str] = {}
    if isinstance(exc, StarletteHTTPException):
        status, detail, headers = exc.status_code, str(exc.detail), dict(exc.headers or {})
        if status == 405:  # list every method of the path, not just the first route's
            headers["Allow"] = ", ".join(sorted(_methods(request)))
    elif isinstance(exc, RequestValidationError):
        status, detail = 422, _validation_detail(exc)
    elif isinstance(exc, PackageError | BadRequest):
        status, detail = exc.status, str(exc)
    else:
        return await server_error(request, exc)
    return JSONResponse(error_body(status, detail), status_code=status, headers=headers)


async def server_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug or a failed backend service: the caller gets an id to quote, the log gets the traceback with it."""
    request_id = uuid.uuid4().hex[:16]
    log.error(
        "request %s: %s %s failed", request_id, request.method, request.url.path, exc_info=exc
    )
    body = error_body(
        500,
        f"internal error in the controller; quote request id {request_id} to its operator, "
        "whose log has the details",
        request_id=request_id,
    )
    return JSONResponse(body, status_code=500, headers={"X-Request-ID": request_id})


def _methods(request: Request) -> set[str]:
    """The methods of every route whose path matches, those of included routers too."""
    routes = iter_route_contexts(request.app.router.routes)
    return {
        m
        for route in routes
        if route.methods and route.matches(request.scope)[0] != Match.NONE
        for m in route.methods
    }


def _validation_detail(exc: RequestValidationError) -> str:
    """FastAPI's list of problems as one sentence: ``body.function_id: Field required; ...``."""
    problems: list[Any] = list(exc.errors())
    return (
        "; ".join(
            f"{'.'.join(map(str, p.get('loc', ())))}: {p.get('msg', 'invalid')}" for p in problems
        )
        or "invalid"
    )
