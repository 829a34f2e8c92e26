"""The client against a scripted controller (httpx.MockTransport): no server, no sandbox, milliseconds each.

What must never happen: a refusal that loses the controller's reason or code, a 429 that is not
retried (or retried forever), a dead grid that surfaces as an httpx traceback, a function sent to a
runtime that cannot unpickle it, or a call whose arguments do not fit the function leaving this machine.
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Callable
from typing import Any

import cloudpickle
import httpx
import pytest

import nanogrid
import nanogrid.client
from nanogrid.client import RATE_LIMIT_RETRIES, Client
from nanogrid.packaging import package_function
from nanogrid.transfer import ArgsUnpickler

RUNTIME = "python%d.%d" % sys.version_info[:2]
Handler = Callable[[httpx.Request], httpx.Response]


class FakeController:
    """Answers by ``(method, path)``; records every request it was sent."""

    def __init__(self, routes: dict[tuple[str, str], Handler | httpx.Response]) -> None:
        self.routes = {
            ("GET", "/health"): httpx.Response(200, json={"runtimes": {RUNTIME: RUNTIME[6:]}}),
            **routes,
        }
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path.removeprefix(
            getattr(nanogrid.client, "API_PREFIX", "")
        )  # routes as the API names them
        answer = self.routes.get((request.method, path))
        if answer is None:
            return httpx.Response(
                404, json={"detail": f"no route {request.url.path}", "error": "not_found"}
            )
        return answer(request) if callable(answer) else answer

    def paths(self) -> list[str]:
        return [
            f"{r.method} {r.url.path.removeprefix(getattr(nanogrid.client, 'API_PREFIX', ''))}"
            for r in self.requests
        ]

    def client(self, api_key: str | None = "ng_test") -> Client:
        return Client("http://grid.test", api_key=api_key, transport=httpx.MockTransport(self))


def finished(value: Any, job_id: str = "job-1") -> dict[str, Any]:
    return {
        "job_id": job_id,
        "status": "completed",
        "result_pickle": base64.b64encode(cloudpickle.dumps(value)).decode(),
    }


@pytest.fixture()
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The waits the client asks for between retries, recorded instead of slept."""
    waits: list[float] = []
    monkeypatch.setattr(nanogrid.client.time, "sleep", waits.append)
    return waits


def test_a_refusal_keeps_the_controllers_reason_status_and_code():
    fake = FakeController(
        {
            ("GET", "/jobs"): httpx.Response(
                401,
                json={
                    "detail": "API key revoked; ask the grid's operator for a new one",
                    "error": "unauthorized",
                },
            )
        }
    )
    with pytest.raises(nanogrid.APIError) as info:
        fake.client().jobs()
    assert info.value.status == 401 and info.value.code == "unauthorized"
    assert "API key revoked; ask the grid's operator" in str(info.value) and "HTTP 401" in str(
        info.value
    )


def test_a_refusal_from_something_that_is_not_the_controller_still_reads_well():
    """A proxy's HTML page or an older controller's validation list: the user still gets a sentence."""
    fake = FakeController(
        {
            ("GET", "/jobs"): httpx.Response(502, text="<html>Bad Gateway</html>"),
            ("GET", "/functions"): httpx.Response(
                422, json={"detail": [{"loc": ["query", "limit"], "msg": "too big"}]}
            ),
        }
    )
    with pytest.raises(nanogrid.APIError, match="Bad Gateway") as info:
        fake.client().jobs()
    assert info.value.code == ""
    with pytest.raises(nanogrid.APIError, match=r"query\.limit: too big"):
        fake.client().functions()


def test_rate_limited_requests_wait_for_retry_after_then_succeed(sleeps):
    answers = iter(
        [
            httpx.Response(
                429,
                headers={"Retry-After": "2"},
                json={"detail": "slow down", "error": "rate_limited"},
            ),
            httpx.Response(
                429,
                headers={"Retry-After": "2"},
                json={"detail": "slow down", "error": "rate_limited"},
            ),
            httpx.Response(200, json=[]),
        ]
    )
    fake = FakeController({("GET", "/jobs"): lambda request: next(answers)})
    assert fake.client().jobs() == []
    assert fake.paths() == ["GET /jobs"] * 3
    assert len(sleeps) == 2 and all(
        2 * 0.8 <= wait <= 30 for wait in sleeps
    )  # never sooner than Retry-After allows


def test_rate_limiting_gives_up_after_a_bounded_number_of_retries(sleeps):
    fake = FakeController(
        {
            ("GET", "/jobs"): httpx.Response(
                429,
                headers={"Retry-After": "1"},
                json={"detail": "rate limit: 1 requests/s", "error": "rate_limited"},
            )
        }
    )
    with pytest.raises(nanogrid.APIError, match="rate limit") as info:
        fake.client().jobs()
    assert info.value.status == 429 and info.value.code == "rate_limited"
    assert len(fake.requests) == RATE_LIMIT_RETRIES + 1 and len(sleeps) == RATE_LIMIT_RETRIES


def test_other_errors_are_not_retried(sleeps):
    fake = FakeController(
        {
            ("POST", "/jobs/job-1/cancel"): httpx.Response(
                404, json={"detail": "no job 'job-1'", "error": "not_found"}
            )
        }
    )
    with pytest.raises(nanogrid.APIError, match="no job"):
        fake.client().cancel("job-1")
    assert len(fake.requests) == 1 and sleeps == []


def test_an_unreachable_grid_is_not_connected_with_its_url():
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    client = Client("http://grid.test:8765", api_key="k", transport=httpx.MockTransport(refuse))
    with pytest.raises(
        nanogrid.NotConnected, match=r"cannot reach the grid at http://grid.test:8765.*nanogrid up"
    ):
        client.health()


def test_the_api_key_travels_in_its_header():
    fake = FakeController({("GET", "/jobs"): httpx.Response(200, json=[])})
    fake.client(api_key="ng_abc").jobs()
    assert fake.requests[0].headers["x-api-key"] == "ng_abc"


def square(x: int) -> int:
    return x * x


def test_a_runtime_the_grid_lacks_is_refused_before_uploading():
    fake = FakeController(
        {("GET", "/health"): httpx.Response(200, json={"runtimes": {"python3.99": "3.99"}})}
    )
    with pytest.raises(
        nanogrid.VersionMismatch, match=rf"runs Python {RUNTIME[6:]}.*only runs python3\.99.*3\.99"
    ):
        fake.client().deploy(package_function(square))
    assert fake.paths() == ["GET /health"]  # nothing uploaded


def test_a_grids_other_languages_are_not_offered_to_a_python_client():
    """A grid that also runs Node.js, Go and C++ names its Python runtimes only, in version order."""
    fake = FakeController(
        {
            ("GET", "/health"): httpx.Response(
                200,
                json={
                    "runtimes": {
                        "nodejs": "18.19.0",
                        "python3.13": "3.13",
                        "go": "1.19",
                        "python3.9": "3.9",
                        "cpp": "12",
                    }
                },
            )
        }
    )
    package = package_function(square, runtime="python3.99")
    with pytest.raises(nanogrid.VersionMismatch) as info:
        fake.client().deploy(package)
    assert "only runs python3.9, python3.13: functions" in str(info.value)
    assert "Use a Python 3.9 or 3.13 environment" in str(info.value)
    assert fake.paths() == ["GET /health"]


def test_a_package_is_uploaded_once_per_client():
    fake = FakeController({("POST", "/upload"): httpx.Response(201, json={"function_id": "fn-1"})})
    client = fake.client()
    package = package_function(square)
    assert client.deploy(package) == client.deploy(package) == "fn-1"
    assert fake.paths().count("POST /upload") == 1


def test_a_package_goes_as_the_body_and_to_an_older_grid_as_a_form():
    """``/v1/packages`` takes the zip as it is; a grid from before it (404) gets the multipart ``/v1/upload``, and is
    not asked again. What must never happen: a function that cannot be deployed to an older grid."""
    newer = FakeController(
        {("POST", "/packages"): httpx.Response(201, json={"function_id": "fn-1"})}
    )
    package = package_function(square)
    assert newer.client().deploy(package) == "fn-1"
    sent = newer.requests[-1]
    assert newer.paths() == ["GET /health", "POST /packages"]
    assert sent.headers["content-type"] == "application/zip" and sent.content == package.data

    older = FakeController({("POST", "/upload"): httpx.Response(201, json={"function_id": "fn-2"})})
    client = older.client()
    assert client.deploy(package) == "fn-2"
    assert client.deploy(package_function(cube)) == "fn-2"
    assert older.paths() == ["GET /health", "POST /packages", "POST /upload", "POST /upload"]
    assert older.requests[2].headers["content-type"].startswith("multipart/form-data")


def cube(x: int) -> int:
    return x**3


def test_remote_runs_through_upload_and_run_and_unpickles_the_value():
    fake = FakeController(
        {
            ("POST", "/upload"): httpx.Response(201, json={"function_id": "fn-1"}),
            ("POST", "/run"): lambda request: httpx.Response(200, json=finished(49)),
        }
    )
    f = nanogrid.RemoteFunction(square, client=fake.client())
    assert f.remote(7) == 49
    body = json.loads(fake.requests[-1].content)
    assert body["function_id"] == "fn-1"
    assert body["blobs"] == []  # a small argument travels inline, inside the args pickle
    assert ArgsUnpickler(base64.b64decode(body["args_pickle"]), []).load() == ([7], {})


def test_a_function_deleted_on_the_grid_is_uploaded_again():
    function_ids = iter(["fn-old", "fn-new"])
    runs: list[str] = []

    def run(request: httpx.Request) -> httpx.Response:
        function_id = json.loads(request.content)["function_id"]
        runs.append(function_id)
        if function_id == "fn-old":
            return httpx.Response(
                404, json={"detail": "no function 'fn-old'; upload it first", "error": "not_found"}
            )
        return httpx.Response(200, json=finished(4))

    def upload(request: httpx.Request) -> httpx.Response:
        return httpx.Response(201, json={"function_id": next(function_ids)})

    fake = FakeController({("POST", "/upload"): upload, ("POST", "/run"): run})
    assert nanogrid.RemoteFunction(square, client=fake.client()).remote(2) == 4
    assert runs == ["fn-old", "fn-new"]


def test_a_job_still_running_at_its_result_timeout_raises_wait_timeout_and_keeps_running():
    fake = FakeController(
        {
            ("POST", "/run"): httpx.Response(202, json={"job_id": "job-9", "status": "running"}),
            ("POST", "/upload"): httpx.Response(201, json={"function_id": "fn-1"}),
            ("GET", "/status/job-9"): httpx.Response(
                200, json={"job_id": "job-9", "status": "running"}
            ),
        }
    )
    job = nanogrid.RemoteFunction(square, client=fake.client()).spawn(3)
    with pytest.raises(
        nanogrid.WaitTimeout, match="job-9 still running.*call .result\\(\\) again"
    ) as info:
        job.result(timeout=0)
    assert isinstance(info.value, TimeoutError)
    assert "POST /jobs/job-9/cancel" not in fake.paths()


def test_a_map_refused_by_the_controller_raises_its_reason():
    fake = FakeController(
        {
            ("POST", "/upload"): httpx.Response(201, json={"function_id": "fn-1"}),
            ("POST", "/map"): httpx.Response(
                413,
                json={
                    "detail": "2000 calls in one request; send at most 1000",
                    "error": "too_large",
                },
            ),
        }
    )
    with pytest.raises(nanogrid.APIError, match="send at most 1000") as info:
        list(nanogrid.RemoteFunction(square, client=fake.client()).map(range(3), progress=False))
    assert info.value.code == "too_large"
