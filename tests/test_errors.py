"""One error family, and mistakes caught where they are made.

What must never happen: an error NanoGrid raises on purpose that ``except NanoGridError`` misses,
or that no longer matches the built-in type users already catch; a call with the wrong arguments,
an ``async def`` or a generator that is uploaded and fails only in the sandbox; a configuration
mistake that prints a traceback; a controller error in a shape the client cannot read.
"""

from __future__ import annotations

import base64
import inspect
import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

import nanogrid
import nanogrid.ai
import nanogrid.errors
from nanogrid.transfer import ArgsEncoder, ArgsUnpickler

if TYPE_CHECKING:  # the controller's tests import the web app in their fixture: collecting this file starts no server
    from fastapi.testclient import TestClient

    from nanogrid_backend.grid import Grid

ROOT = Path(__file__).resolve().parents[1]


# -- the family ---------------------------------------------------------------------------------------------------


def test_every_error_nanogrid_raises_on_purpose_is_a_nanogrid_error():
    classes = [
        c
        for c in vars(nanogrid.errors).values()
        if inspect.isclass(c)
        and issubclass(c, BaseException)
        and c.__module__ == "nanogrid_contract.errors"
    ]
    carriers = {
        nanogrid.errors.RemoteTraceback
    }  # not raised: the text of a remote traceback, as a __cause__
    assert len(classes) > 10
    assert [
        c.__name__
        for c in classes
        if c not in carriers and not issubclass(c, nanogrid.NanoGridError)
    ] == []
    exported = {name for name in nanogrid.__all__ if inspect.isclass(getattr(nanogrid, name, None))}
    assert {c.__name__ for c in classes if c not in carriers} <= exported


@pytest.mark.parametrize(
    ("error", "builtin"),
    [
        (nanogrid.InvalidArguments, TypeError),
        (nanogrid.UnsupportedFunction, TypeError),
        (nanogrid.InvalidArgument, ValueError),
        (nanogrid.ConfigError, ValueError),
        (nanogrid.WaitTimeout, TimeoutError),
        (nanogrid.FunctionTimeout, TimeoutError),
        (nanogrid.OutOfMemory, MemoryError),
        (nanogrid.AIUnavailable, RuntimeError),
    ],
)
def test_errors_keep_the_builtin_type_users_already_catch(error, builtin):
    assert issubclass(error, nanogrid.NanoGridError) and issubclass(error, builtin)


def test_the_ai_helpers_say_what_to_declare_when_there_is_no_ai_node(monkeypatch):
    monkeypatch.delenv("AI_ENDPOINT", raising=False)
    with pytest.raises(nanogrid.AIUnavailable, match=r"@nanogrid.remote\(ai=True\)"):
        nanogrid.ai.generate("hello", model="tiny")


# -- mistakes caught at decoration and at the call site -----------------------------------------------------------


class NoNetwork(httpx.BaseTransport):
    """A client transport that fails the test if anything at all is sent."""

    def __init__(self) -> None:
        self.sent: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request)
        raise AssertionError(
            f"sent {request.method} {request.url} for a call that should have been refused"
        )


@pytest.fixture()
def offline() -> tuple[nanogrid.Client, NoNetwork]:
    transport = NoNetwork()
    return nanogrid.Client("http://grid.test", api_key="k", transport=transport), transport


class LimitsOnly(NoNetwork):
    """Tells the client the grid's limits (``GET /v1/health``: 16 MiB per argument) and fails the test on anything
    else: a call may learn the limits its arguments are checked against, and send nothing of its own."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if (request.method, request.url.path) == ("GET", "/v1/health"):
            self.sent.append(request)
            return httpx.Response(
                200,
                json={
                    "runtimes": {},
                    "max_payload_bytes": 16 << 20,
                    "blob_threshold_bytes": 1 << 20,
                },
            )
        return super().handle_request(request)


@pytest.fixture()
def limits_only() -> tuple[nanogrid.Client, LimitsOnly]:
    transport = LimitsOnly()
    return nanogrid.Client("http://grid.test", api_key="k", transport=transport), transport


def scale(x: float, factor: float = 2.0, *, shift: float = 0.0) -> float:
    return x * factor + shift


@pytest.mark.parametrize(
    ("args", "kwargs", "why"),
    [
        ((), {}, "missing a required argument: 'x'"),
        ((1, 2, 3), {}, "too many positional arguments"),
        ((1,), {"fator": 3}, "unexpected keyword argument 'fator'"),
        ((1,), {"x": 2}, "multiple values for argument 'x'"),
    ],
)
def test_arguments_that_do_not_fit_the_signature_are_refused_before_anything_is_sent(
    offline, args, kwargs, why
):
    client, transport = offline
    function = nanogrid.RemoteFunction(scale, client=client)
    for verb in (function.remote, function.spawn):
        with pytest.raises(
            nanogrid.InvalidArguments,
            match=rf"cannot call scale\(x, factor=2.0, \*, shift=0.0\): .*{why}; nothing was sent",
        ) as info:
            verb(*args, **kwargs)
        assert isinstance(info.value, TypeError)
    assert transport.sent == []


def test_a_call_that_fits_never_lets_a_later_one_that_does_not_through(limits_only):
    """Binding is skipped for a shape of call (positional count, keyword names) that bound before; what must never
    happen is a wrong call sent because a right one came first."""
    client, transport = limits_only
    function = nanogrid.RemoteFunction(scale, client=client)
    for args, kwargs in [((1,), {}), ((1, 2), {"shift": 1.0}), ((1,), {"factor": 3})]:
        function._pickle(ArgsEncoder(client), args, kwargs)  # each fits: checked, then pickled
    for args, kwargs, why in [
        ((1, 2, 3), {}, "too many positional arguments"),
        ((1,), {"x": 2}, "multiple values for argument 'x'"),
        ((1, 2), {"factor": 3}, "multiple values for argument 'factor'"),
        ((), {"factor": 3}, "missing a required argument: 'x'"),
    ]:
        with pytest.raises(nanogrid.InvalidArguments, match=why):
            function.remote(*args, **kwargs)
    assert all(request.url.path == "/v1/health" for request in transport.sent)


def test_a_map_checks_every_item_before_sending_any(offline):
    client, transport = offline
    with pytest.raises(
        nanogrid.InvalidArguments, match=r"too many positional arguments \(item 0 of .map\(\)\)"
    ):
        list(
            nanogrid.RemoteFunction(scale, client=client).map(
                [1, 2], [2, 2], [0, 0], progress=False
            )
        )
    with pytest.raises(
        nanogrid.InvalidArguments,
        match=r"cannot send argument 0 \(item 2 of .map\(\)\) to the grid",
    ):
        list(
            nanogrid.RemoteFunction(scale, client=client).map(
                [1.0, 2.0, threading_lock()], progress=False
            )
        )
    assert transport.sent == []


def test_a_map_checks_every_items_size_before_uploading_any(limits_only):
    """Item 0's large argument is not uploaded when item 2's is over the grid's limit."""
    client, transport = limits_only
    function = nanogrid.RemoteFunction(lambda value: len(value), client=client)
    with pytest.raises(
        nanogrid.InvalidArgument, match=r"argument 0 \(item 2 of .map\(\)\) pickles to 17\.0 MiB"
    ):
        list(function.map([b"a" * (2 << 20), b"b", b"c" * (17 << 20)], progress=False))
    assert [f"{r.method} {r.url.path}" for r in transport.sent] == ["GET /v1/health"]


def test_arguments_that_cannot_be_pickled_or_are_too_big_are_refused_before_sending(
    offline, limits_only
):
    client, transport = offline
    function = nanogrid.RemoteFunction(lambda value: value, client=client)
    with pytest.raises(
        nanogrid.InvalidArguments, match="cannot send argument 0 to the grid: cannot pickle"
    ):
        function.remote(threading_lock())
    assert transport.sent == []  # found without asking the grid anything
    client, transport = limits_only
    function = nanogrid.RemoteFunction(lambda value, other: value, client=client)
    with pytest.raises(
        nanogrid.InvalidArgument,
        match=r"argument 'other' pickles to 17\.0 MiB, over the grid's "
        r"16\.0 MiB limit per argument; nothing was uploaded",
    ):
        function.remote(b"x" * (2 << 20), other=b"x" * (17 << 20))
    assert [f"{r.method} {r.url.path}" for r in transport.sent] == [
        "GET /v1/health"
    ]  # the limit is the grid's


def threading_lock() -> object:
    import threading

    return threading.Lock()


async def fetch(url: str) -> str:
    return url


async def ticks():
    yield 1


def numbers(n: int):
    yield from range(n)


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (fetch, r"fetch is an async function.*asyncio.run\(fetch\(\*args, \*\*kwargs\)\)"),
        (ticks, r"ticks is an async function"),
        (numbers, r"numbers is a generator function.*return list\(...\)"),
    ],
)
def test_functions_the_grid_cannot_run_are_refused_at_decoration(fn, message):
    with pytest.raises(nanogrid.UnsupportedFunction, match=message):
        nanogrid.remote(fn)
    with pytest.raises(nanogrid.UnsupportedFunction, match=message):
        nanogrid.remote(memory=128)(fn)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"memory": "256MB"}, "memory is a whole number of MiB"),
        ({"memory": 0}, "memory is a whole number"),
        ({"timeout": -1}, "timeout is a number of seconds above 0"),
        ({"timeout": "30s"}, "timeout is a number"),
    ],
)
def test_decorator_options_are_checked_at_decoration(options, message):
    with pytest.raises(nanogrid.InvalidArgument, match=message):
        nanogrid.remote(**options)


def test_a_function_that_takes_anything_is_not_second_guessed(limits_only):
    """``*args, **kwargs`` and callables without a signature bind any call: the function decides."""
    client, _ = limits_only
    anything = nanogrid.RemoteFunction(lambda *args, **kwargs: (args, kwargs), client=client)
    assert ArgsUnpickler(base64.b64decode(anything._encode((1, 2), {"a": 3})[0]), []).load() == (
        [1, 2],
        {"a": 3},
    )
    assert ArgsUnpickler(
        base64.b64decode(nanogrid.RemoteFunction(max, client=client)._encode((1, 2), {})[0]), []
    ).load() == ([1, 2], {})


# -- the command line: configuration mistakes in one line -----------------------------------------------------------


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("NANOGRID_", "SQS_", "REDIS_"))
    }
    return subprocess.run(
        [sys.executable, "-m", "nanogrid.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **env},
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    ("args", "env", "status", "says"),
    [
        (["up"], {"NANOGRID_WORKERS": "two"}, 1, "NANOGRID_WORKERS: 'two' is not a whole number"),
        (
            ["worker", "--sandbox", "process"],
            {},
            1,
            "a separate worker needs a shared queue and bus: set SQS_QUEUE_URL",
        ),
        (["up", "--workers", "two"], {}, 2, "argument --workers: invalid int value: 'two'"),
        (["up", "--sandbox", "dockr"], {}, 2, "argument --sandbox: invalid choice"),
        (["up", "--workers", "0"], {}, 1, "--workers: must be at least 1"),
        (
            ["up", "--config", "/nonexistent/grid.toml"],
            {},
            1,
            "cannot read the config file /nonexistent/grid.toml",
        ),
        (["status", "--bogus"], {}, 2, "unrecognized arguments: --bogus"),
    ],
)
def test_configuration_mistakes_print_one_line_and_exit_non_zero(tmp_path, args, env, status, says):
    result = run_cli(*args, NANOGRID_DATA_DIR=str(tmp_path), **env)
    assert result.returncode == status, result.stderr
    assert says in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, (
        result.stderr
    )
    assert result.stderr.startswith("nanogrid")


# -- the controller: one body shape for every refusal ---------------------------------------------------------------


@pytest.fixture()
def controller(tmp_path) -> tuple[TestClient, Grid]:
    """The real app on a real (unstarted) grid: SQLite registry, directory store; no workers needed to refuse."""
    from fastapi.testclient import TestClient

    from nanogrid_backend.config import GridConfig
    from nanogrid_backend.controller.app import create_app
    from nanogrid_backend.grid import Grid

    grid = Grid(
        GridConfig.load(
            data_dir=tmp_path,
            sandbox="process",
            stem_cells=0,
            max_package_bytes=1 << 20,
            max_payload_bytes=1 << 20,
        )
    )
    with TestClient(
        create_app(grid, manage_grid=False),
        raise_server_exceptions=False,
        headers={"x-api-key": grid.api_key or ""},
    ) as http:
        yield http, grid
    grid.stop()


def test_every_refusal_has_the_same_body_with_a_stable_code(controller):
    http, grid = controller
    answers = {
        "unauthorized": http.get("/v1/jobs", headers={"x-api-key": "ng_wrong"}),
        "not_found": http.get("/v1/functions/fn-nope"),
        "method_not_allowed": http.put("/v1/functions/fn-nope"),
        "invalid": http.post("/v1/run", json={"payload": {}}),
        "bad_request": http.post(
            "/v1/upload", files={"file": ("f.zip", b"junk")}, data={"function_name": "f"}
        ),
        "too_large": http.post(
            "/v1/run", content=b"x" * (3 << 20), headers={"content-type": "application/json"}
        ),
    }
    for code, response in answers.items():
        assert 400 <= response.status_code < 500, (code, response.text)
        body = response.json()
        assert set(body) == {"detail", "error"} and body["error"] == code, (code, body)
        assert isinstance(body["detail"], str) and len(body["detail"]) > 10, body
    assert answers["invalid"].json()["detail"] == "body.function_id: Field required"
    assert "DELETE" in answers["method_not_allowed"].headers["Allow"]


def test_a_rate_limited_key_gets_the_same_body_and_retry_after(controller):
    from nanogrid_backend.keys import create_key

    http, grid = controller
    key, _ = create_key(grid.registry, "tight", rate_limit=0.001, rate_burst=1)
    assert http.get("/v1/jobs", headers={"x-api-key": key}).status_code == 200
    refused = http.get("/v1/jobs", headers={"x-api-key": key})
    assert (
        refused.status_code == 429
        and refused.json()["error"] == "rate_limited"
        and refused.headers["Retry-After"]
    )


def test_a_server_error_is_json_with_a_request_id_that_is_in_the_log(
    controller, monkeypatch, caplog
):
    http, grid = controller

    def broken(*args: object, **kwargs: object) -> list:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(grid.registry, "list_functions", broken)
    with caplog.at_level(logging.ERROR, logger="nanogrid_backend.controller.errors"):
        response = http.get("/v1/functions")
    assert response.status_code == 500
    body = response.json()
    assert body["error"] == "internal" and body["request_id"] in body["detail"]
    assert "disk I/O error" not in response.text  # internals stay in the log
    assert response.headers["X-Request-ID"] == body["request_id"]
    logged = [r for r in caplog.records if body["request_id"] in r.getMessage()]
    assert logged and "disk I/O error" in str(logged[0].exc_info[1])


def test_the_schema_documents_the_error_body(controller):
    http, _ = controller
    schema = http.get("/openapi.json").json()
    assert set(schema["components"]["schemas"]["ErrorDetail"]["required"]) == {"detail", "error"}
    assert (
        "HTTPValidationError" not in schema["components"]["schemas"]
    )  # 422 has the same shape as the rest
