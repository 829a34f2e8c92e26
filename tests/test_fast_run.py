"""The warm ``POST /v1/run`` served before the routes (nanogrid_backend/controller/fast_run.py).

What must never happen: a request answered differently because the fast path took it or declined it (another
status, another body, another error), a declined request whose body the route no longer gets whole, a rate-limit
token taken twice, or a failure after a call was accepted that escapes the app's error handlers.

The truth each answer is compared with is the same app without the fast path, over the same grid.
"""

from __future__ import annotations

import base64
import json
import pickle
from collections.abc import Iterator
from typing import Any

import cloudpickle
import httpx
import pytest
from fastapi.testclient import TestClient

import nanogrid
from nanogrid_backend.controller.app import create_app
from nanogrid_backend.controller.fast_run import FastRun
from nanogrid_backend.controller.links import LinkSigner
from nanogrid_backend.controller.schemas import JobView
from nanogrid_backend.keys import create_key
from nanogrid_backend.models import COMPLETED, FAILED, RUNNING, JobRecord
from nanogrid_backend.registry.base import RegistryBusy
from nanogrid_backend.store.blobs import RESULT_FORMAT

pytestmark = pytest.mark.integration

HANDLER = b"""def handler(event, context):
    return {"echo": event}
"""
# Fields that differ between two runs of the same call.
PER_RUN = {
    "job_id",
    "created_at",
    "started_at",
    "finished_at",
    "execution_time_ms",
    "peak_memory_bytes",
    "baseline_memory_bytes",
    "cold",
    "worker_id",
    "sandbox_id",
    "result_pickle",
}


def fast_layer(app: Any) -> FastRun:
    layer = app.middleware_stack
    while not isinstance(layer, FastRun):
        layer = layer.app
    return layer


@pytest.fixture(scope="module")
def grids(grid) -> Iterator[tuple[httpx.Client, TestClient, dict[str, str]]]:
    """The grid as served (fast path first), the same grid's app without the fast path, and function ids."""
    routes_only = create_app(grid.grid, manage_grid=False)
    routes_only.user_middleware = [m for m in routes_only.user_middleware if m.cls is not FastRun]
    headers = {"x-api-key": grid.api_key}
    served = httpx.Client(base_url=grid.url, timeout=60, headers=headers)
    upload = served.post(
        "/v1/upload",
        files={"file": ("echo.py", HANDLER)},
        data={"function_name": "echo", "runtime": "python3.11", "handler": "echo.handler"},
    )
    assert upload.status_code in (200, 201), upload.text

    @nanogrid.remote
    def double(x: int) -> int:
        return 2 * x

    client = nanogrid.connect(grid.url, api_key=grid.api_key)
    ids = {"handler": upload.json()["function_id"], "pickle": double.deploy()}
    other_key, _ = create_key(grid.grid.registry, "fast-run-other-owner")
    ids["other_key"] = other_key
    with TestClient(routes_only, base_url=grid.url, headers=headers) as routes:
        yield served, routes, ids
    served.close()
    client.close()


def args(*values: Any) -> str:
    return base64.b64encode(cloudpickle.dumps((values, {}))).decode()


def comparable(response: httpx.Response) -> tuple[int, Any]:
    try:
        body = response.json()
    except ValueError:
        return response.status_code, response.text
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k not in PER_RUN}
        if isinstance(body.get("result_pickle"), str):  # a pickled result: its value, not its bytes
            body["value"] = pickle.loads(base64.b64decode(body["result_pickle"]))
    return response.status_code, body


def requests(ids: dict[str, str]) -> list[tuple[str, dict[str, Any]]]:
    """(what it is, httpx request arguments): calls the fast path serves and ones it declines."""
    handler, pickled = ids["handler"], ids["pickle"]
    big = args(b"x" * (3 << 19))  # a body over the fast path's cap (1 MiB): the route reads it
    return [
        ("a handler call", {"json": {"function_id": handler, "payload": {"a": [1, 2]}}}),
        ("a pickled call", {"json": {"function_id": pickled, "args_pickle": args(21)}}),
        (
            "a held call",
            {"json": {"function_id": pickled, "args_pickle": args(2)}, "headers": {"x-hold": "5"}},
        ),
        (
            "a bearer key",
            {
                "json": {"function_id": handler, "payload": 1},
                "headers": {"x-api-key": "", "authorization": f"Bearer {ids['key']}"},
            },
        ),
        ("a body over 1 MiB", {"json": {"function_id": pickled, "args_pickle": big}}),
        ("no content type", {"content": f'{{"function_id": "{handler}", "payload": 3}}'}),
        ("no key", {"json": {"function_id": handler}, "headers": {"x-api-key": ""}}),
        ("a wrong key", {"json": {"function_id": handler}, "headers": {"x-api-key": "ng_wrong"}}),
        ("bad JSON", {"content": b"{not json", "headers": {"content-type": "application/json"}}),
        ("a JSON list", {"json": [handler]}),
        ("no function id", {"json": {"payload": {}}}),
        ("an unknown function", {"json": {"function_id": "fn-nope", "payload": {}}}),
        (
            "another owner's key",
            {
                "json": {"function_id": handler, "payload": {}},
                "headers": {"x-api-key": ids["other_key"]},
            },
        ),
        ("args for a handler", {"json": {"function_id": handler, "args_pickle": args(1)}}),
        ("a payload for a pickle", {"json": {"function_id": pickled, "payload": {}}}),
        ("bad base64", {"json": {"function_id": pickled, "args_pickle": "!!!"}}),
        (
            "a blob nobody uploaded",
            {"json": {"function_id": pickled, "args_pickle": args(1), "blobs": ["0" * 64]}},
        ),
        ("a hold over the cap", {"json": {"function_id": handler}, "headers": {"x-hold": "61"}}),
        ("a negative hold", {"json": {"function_id": handler}, "headers": {"x-hold": "-1"}}),
        (
            "a hold that is no number",
            {"json": {"function_id": handler}, "headers": {"x-hold": "soon"}},
        ),
        ("an async 'yes'", {"json": {"function_id": handler}, "headers": {"x-async": "yes"}}),
    ]


def test_every_answer_is_the_routes_answer(grid, grids):
    served, routes, ids = grids
    ids = {**ids, "key": grid.api_key}
    layer = fast_layer(grid.server.config.app)
    for what, kwargs in requests(ids):
        before = layer.served
        fast = served.post("/v1/run", **kwargs)
        route = routes.post("/v1/run", **kwargs)
        assert comparable(fast) == comparable(route), what
        assert fast.headers.get("retry-after") == route.headers.get("retry-after"), what
        if what in ("a handler call", "a pickled call", "a held call", "a bearer key"):
            assert layer.served == before + 1, f"{what}: the fast path should have served it"
            assert fast.status_code == 200, fast.text
        elif fast.status_code >= 400:
            assert layer.served == before, f"{what}: a refusal is the route's"
    # what the calls gave is what the status route shows for them
    answer = served.post("/v1/run", json={"function_id": ids["pickle"], "args_pickle": args(4)})
    status = served.get(f"/v1/status/{answer.json()['job_id']}")
    # (the status route also lists the fields that are empty; /v1/run leaves them out)
    shown = {k: v for k, v in status.json().items() if v is not None}
    assert {k: v for k, v in answer.json().items() if v is not None} == shown
    assert pickle.loads(base64.b64decode(answer.json()["result_pickle"])) == 8


def test_a_key_over_its_rate_limit_is_refused_by_the_route_and_pays_one_token(grid, grids):
    served, _, ids = grids
    key, _ = create_key(grid.grid.registry, "fast-run-limited", rate_limit=0.001, rate_burst=2)
    body = {"function_id": ids["handler"], "payload": 1}
    # The function is the grid's owner's: this key's calls are answered 404, each taking one token.
    answers = [served.post("/v1/run", json=body, headers={"x-api-key": key}) for _ in range(3)]
    assert [a.status_code for a in answers] == [404, 404, 429], [a.text for a in answers]
    assert answers[2].json()["error"] == "rate_limited" and answers[2].headers["retry-after"]


def test_a_failure_after_acceptance_is_answered_by_the_apps_handler(grid, grids, monkeypatch):
    served, routes, ids = grids
    layer = fast_layer(grid.server.config.app)

    def locked(jobs: object) -> None:
        raise RegistryBusy("the registry stayed locked by another process (a test)")

    # another process holds the registry's lock: the loop's write says it would wait, the thread's gives up
    monkeypatch.setattr(grid.grid.registry, "create_jobs_now", lambda jobs: False)
    monkeypatch.setattr(grid.grid.registry, "create_jobs", locked)
    body = {"function_id": ids["handler"], "payload": 1}
    before = layer.served
    fast, route = served.post("/v1/run", json=body), routes.post("/v1/run", json=body)
    monkeypatch.undo()
    assert layer.served == before + 1
    assert fast.status_code == route.status_code == 503
    assert fast.json() == route.json() and fast.headers["retry-after"] == "5"
    assert served.post("/v1/run", json=body).json()["result"] == {"echo": 1}


# -- the answer's body, made without the model -------------------------------------------------------------------


class _FixedClockLinks(LinkSigner):
    def query(self, job_id: str, name: str, owner: str, now: float | None = None) -> str:
        return super().query(job_id, name, owner, now=1_800_000_000)


def _records() -> list[JobRecord]:
    finished = {"started_at": 1.5, "finished_at": 2, "worker_id": "w-1", "sandbox_id": "sb-1"}
    return [
        JobRecord("job-pending", "f-1", owner="alice"),
        JobRecord("job-running", "f-1", status=RUNNING, owner="alice", started_at=3, cold=True),
        JobRecord(
            "job-pickle",
            "f-1",
            status=COMPLETED,
            owner="alice",
            result=pickle.dumps({"x": [1, 2.5]}),
            result_format="pickle",
            execution_time_ms=3,  # an int where the view has a float
            peak_memory_bytes=12 << 20,
            memory_limit_mib=256,
            baseline_memory_bytes=4 << 20,
            cold=False,
            stdout="out\n",
            stderr="é\n",
            ai_usage={"calls": 1, "tokens": 7},
            **finished,
        ),
        JobRecord(
            "job-json",
            "f-2",
            status=COMPLETED,
            owner="bob",
            result=b'{"a": [1, null, "s"], "b": 1.5}',
            result_format="json",
            output_files=[
                {
                    "name": "plot 1.png",
                    "size": 10,
                    "sha256": "ab" * 32,
                },  # a key the view leaves out
                {"name": "d/ü.csv", "size": 3},
            ],
            trigger="schedule",
            **finished,
        ),
        JobRecord(
            "job-blob",
            "f-2",
            status=COMPLETED,
            owner="bob",
            result=b'{"sha256": "' + b"c" * 64 + b'", "size": 99, "format": "pickle"}',
            result_format=RESULT_FORMAT,
            **finished,
        ),
        JobRecord(
            "job-failed",
            "f-3",
            status=FAILED,
            owner="carol",
            error={"kind": "exception", "message": "boom", "traceback": "..."},
            execution_time_ms=0.25,
            **finished,
        ),
    ]


@pytest.mark.parametrize("with_result", [True, False])
@pytest.mark.parametrize("signed", [True, False])
def test_the_plain_body_is_the_models_body_for_every_kind_of_job(with_result, signed):
    """What must never happen: an answer whose body depends on whether the model made it."""
    links = _FixedClockLinks(b"k" * 32) if signed else None
    for job in _records():
        for extra in ({}, {"function_name": "summarise"}):
            plain = JobView.plain(job, "http://grid:8000", with_result, links, **extra)
            model = JobView.of(job, "http://grid:8000", with_result, links, **extra).body()
            assert plain == model, job.job_id
            # types too (3.0, not 3); the order of keys is the model's business, not a client's
            assert json.dumps(plain, sort_keys=True) == json.dumps(model, sort_keys=True), (
                job.job_id
            )
