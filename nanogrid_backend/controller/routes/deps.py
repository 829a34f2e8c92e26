"""What the routes depend on, read from ``request.app.state``: the grid, its settings, and the caller's API key."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from nanogrid_backend.config import GridConfig
from nanogrid_backend.controller.links import LinkSigner
from nanogrid_backend.controller.ratelimit import retry_after_header
from nanogrid_backend.grid import Grid
from nanogrid_backend.keys import AuthError
from nanogrid_backend.models import ApiKey, FunctionRecord, JobRecord


def grid_of(request: Request) -> Grid:
    return request.app.state.grid


# The dependencies are coroutines: FastAPI runs a plain function dependency on a worker thread, a hop each request
# would pay for a lookup.
async def current_grid(request: Request) -> Grid:
    return grid_of(request)


async def settings_of(request: Request) -> GridConfig:
    return request.app.state.config


async def links_of(request: Request) -> LinkSigner:
    """The signer of output-file links (a browser following one has no API key)."""
    return request.app.state.links


CurrentGrid = Annotated[Grid, Depends(current_grid)]
Settings = Annotated[GridConfig, Depends(settings_of)]
Links = Annotated[LinkSigner, Depends(links_of)]


def base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def open_key(request: Request) -> str | None:
    """The local owner's key for a request that presents none, on a grid started with ``nanogrid up --open``
    (loopback only: ``GridConfig.check`` refuses it on any other address); else None.

    Never for a browser's request (it sends ``Origin`` or ``Sec-Fetch-Site``; curl and scripts send neither):
    any web page open on this machine could otherwise post code to the loopback address, or read results
    through a rebound DNS name, as the local owner."""
    state = request.app.state
    if (
        not state.config.open_access
        or "origin" in request.headers
        or "sec-fetch-site" in request.headers
    ):
        return None
    return state.grid.api_key


async def authorize(
    request: Request,
    x_api_key: Annotated[
        str | None, Security(APIKeyHeader(name="x-api-key", auto_error=False))
    ] = None,
    bearer: Annotated[
        HTTPAuthorizationCredentials | None, Security(HTTPBearer(auto_error=False))
    ] = None,
) -> ApiKey:
    """Every route but /health: a valid key, within its rate limit."""
    state = request.app.state
    try:
        key = state.authenticator.check(
            x_api_key or (bearer.credentials if bearer else None) or open_key(request)
        )
    except AuthError as exc:
        raise HTTPException(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from None
    wait, rate = take_token(state, key)
    if wait:
        raise HTTPException(
            429,
            f"rate limit: {rate:g} requests/s for key {key.name!r}; retry in {wait:.2f} s",
            headers={"Retry-After": retry_after_header(wait)},
        )
    return key


def take_token(state: Any, key: ApiKey) -> tuple[float, float]:
    """One request's token from the key's rate limit: (0 if allowed, else the seconds until one is; the rate)."""
    rate = state.config.rate_limit if key.rate_limit is None else key.rate_limit
    return state.buckets.take(key.key_id, rate, key.rate_burst or state.config.rate_burst), rate


Caller = Annotated[ApiKey, Depends(authorize)]


async def authorize_request(request: Request) -> ApiKey:
    """``authorize`` for a route that also accepts another proof (a signed link) instead of a key."""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    bearer = (
        HTTPAuthorizationCredentials(scheme=scheme, credentials=credentials)
        if scheme.lower() == "bearer"
        else None
    )
    return await authorize(request, request.headers.get("x-api-key"), bearer)


def resolve_function(grid: Grid, owner: str, function_id: str) -> FunctionRecord | None:
    """The function any surface means by an id: a NanoGrid id (``fn-...``) as it is, or a seed function's id (the
    uuid ``POST /upload`` answered), meaning its newest version. None if ``owner`` has no such function.

    For the ``/v1`` routes, ``nanogrid loadtest`` and the dashboard, so the seed's id works wherever NanoGrid's does.
    """
    if function_id.startswith("fn-"):
        function = grid.registry.get_function(function_id)
        return function if function is not None and function.owner == owner else None
    return next(
        (f for f in grid.registry.list_functions(owner=owner) if f.stable_id == function_id), None
    )


def known_function(state: Any, function_id: str, caller: ApiKey) -> FunctionRecord | None:
    """The caller's function (by a NanoGrid or a seed id), remembered in the app's ``state``: records never
    change (ids are content hashes). None for another owner's: it does not exist for the caller."""
    known: dict[str, FunctionRecord] = state.functions  # deletes evict
    function = known.get(function_id) or resolve_function(state.grid, caller.name, function_id)
    if function is None or function.owner != caller.name:
        return None
    known[function.function_id] = function
    return function


def function_or_404(request: Request, function_id: str, caller: ApiKey) -> FunctionRecord:
    """``known_function``, or 404."""
    function = known_function(request.app.state, function_id, caller)
    if function is None:
        raise HTTPException(404, f"no function {function_id!r}; upload it first (POST /v1/upload)")
    return function


def job_or_404(grid: Grid, job_id: str, caller: ApiKey) -> JobRecord:
    job = grid.registry.get_job(job_id)
    if job is None or job.owner != caller.name:  # another owner's job does not exist for you
        raise HTTPException(404, f"no job {job_id!r}")
    return job
