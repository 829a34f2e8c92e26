"""``/v1/loadtests``: start a load test of one of the caller's functions, and read its progress and summary."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request

from nanogrid_backend.controller.loadtests import LoadTestRequest, LoadTests
from nanogrid_backend.controller.routes.deps import Caller, CurrentGrid, resolve_function

router = APIRouter(prefix="/v1/loadtests", tags=["operations"])


async def load_tests(request: Request) -> LoadTests:
    return request.app.state.loadtests


Tests = Annotated[LoadTests, Depends(load_tests)]


@router.post("", status_code=202)
def start(body: LoadTestRequest, key: Caller, grid: CurrentGrid, tests: Tests) -> dict:
    """Start a load test of one of your functions; poll ``GET /v1/loadtests/{id}`` for progress and the summary."""
    # a NanoGrid id or a seed function's uuid
    function = resolve_function(grid, key.name, body.function_id)
    if function is None:
        raise HTTPException(404, f"no function {body.function_id!r}")
    test_id = tests.start(key.name, function, body, key.max_timeout_s)
    return next(t for t in tests.listing(key.name) if t["loadtest_id"] == test_id)


@router.get("")
def listing(key: Caller, tests: Tests) -> list[dict]:
    return tests.listing(key.name)


@router.get("/{loadtest_id}")
def one(loadtest_id: str, key: Caller, tests: Tests) -> dict:
    for test in tests.listing(key.name):
        if test["loadtest_id"] == loadtest_id:
            return test
    raise HTTPException(404, f"no load test {loadtest_id!r}")
