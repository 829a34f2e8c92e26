"""The controller's HTTP API as a curl user meets it, and job state across a restart."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import start_grid

pytestmark = pytest.mark.integration

HELLO = b"""import json
import os


def handler(event, context):
    payload = json.loads(os.environ.get("PAYLOAD", "{}"))  # the seed's style; event carries the same
    name = payload.get("name", "World")
    print("greeting", name)
    return {"statusCode": 200, "body": f"Hello, {name}!", "same": event == payload,
            "function": context.function_name}
"""

SLOW = b"""import time


def handler(event, context):
    time.sleep(event["seconds"])
    return {"slept": event["seconds"]}
"""


@pytest.fixture()
def http(grid):
    with httpx.Client(base_url=grid.url, timeout=60, headers={"x-api-key": grid.api_key}) as client:
        yield client


def upload(http: httpx.Client, name: str, source: bytes, **form: str) -> dict:
    response = http.post(
        "/v1/upload",
        files={"file": (f"{name}.py", source)},
        data={"function_name": name, "runtime": "python3.11", "handler": f"{name}.handler", **form},
    )
    assert response.status_code in (200, 201), response.text
    return response.json()


def test_seed_style_hello_upload_and_run(http):
    response = http.post(
        "/v1/upload",
        files={"file": ("hello.py", HELLO)},
        data={"function_name": "hello", "runtime": "python3.11", "handler": "hello.handler"},
    )
    assert response.status_code == 201
    function = response.json()
    assert function["function_id"].startswith("fn-") and function["function_name"] == "hello"

    again = http.post(
        "/v1/upload",
        files={"file": ("hello.py", HELLO)},
        data={"function_name": "hello", "runtime": "python3.11", "handler": "hello.handler"},
    )
    assert again.status_code == 200 and again.json()["function_id"] == function["function_id"]

    run = http.post(
        "/v1/run", json={"function_id": function["function_id"], "payload": {"name": "NanoGrid"}}
    )
    assert run.status_code == 200
    body = run.json()
    assert body["status"] == "completed"
    assert body["result"] == {
        "statusCode": 200,
        "body": "Hello, NanoGrid!",
        "same": True,
        "function": "hello",
    }
    assert body["stdout"] == "greeting NanoGrid\n"
    assert body["execution_time_ms"] >= 0 and body["peak_memory_bytes"] > 0
    assert body["job_id"].startswith("job-") and body["output_files"] == []


def test_async_run_and_status(http):
    function = upload(http, "slow", SLOW)
    accepted = http.post(
        "/v1/run",
        json={"function_id": function["function_id"], "payload": {"seconds": 0.3}},
        headers={"X-Async": "true"},
    )
    assert accepted.status_code == 202
    job_id = accepted.json()["job_id"]
    assert http.get(f"/v1/status/{job_id}").json()["status"] in ("pending", "running")
    done = http.get(f"/v1/status/{job_id}", params={"wait": 30}).json()
    assert done["status"] == "completed" and done["result"] == {"slept": 0.3}
    assert any(job["job_id"] == job_id for job in http.get("/v1/jobs").json())


def test_handler_errors_come_back_as_failed_jobs(http):
    function = upload(http, "broken", b"def handler(event, context):\n    return {}['missing']\n")
    body = http.post(
        "/v1/run", json={"function_id": function["function_id"], "payload": None}
    ).json()
    assert body["status"] == "failed"
    assert body["error"]["type"] == "KeyError" and "missing" in body["error"]["traceback"]


def test_unencodable_handler_result_is_a_clear_error(http):
    function = upload(http, "setty", b"def handler(event, context):\n    return {1, 2}\n")
    body = http.post("/v1/run", json={"function_id": function["function_id"]}).json()
    assert body["status"] == "failed" and "JSON cannot encode" in body["error"]["message"]


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "message"),
    [
        ("get", "/v1/status/job-nope", {}, 404, "no job"),
        ("get", "/v1/functions/fn-nope", {}, 404, "no function"),
        ("delete", "/v1/functions/fn-nope", {}, 404, "no function"),
        (
            "post",
            "/v1/run",
            {"json": {"function_id": "fn-nope", "payload": {}}},
            404,
            "no function",
        ),
        (
            "post",
            "/v1/run",
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            422,
            "JSON",
        ),
        ("post", "/v1/run", {"json": {"payload": {}}}, 422, "function_id"),
        ("post", "/v1/jobs/job-nope/cancel", {}, 404, "no job"),
        ("get", "/v1/jobs/job-nope/outputs/x.txt", {}, 404, "no output file"),
        (
            "post",
            "/v1/upload",
            {
                "files": {"file": ("f.zip", b"junk")},
                "data": {"function_name": "f", "handler": "m.h"},
            },
            400,
            "zip",
        ),
        ("post", "/v1/upload", {"data": {"function_name": "f"}}, 422, "file"),
        (
            "post",
            "/v1/upload",
            {
                "files": {"file": ("h.py", b"x")},
                "data": {"function_name": "h", "handler": "h.handler", "memory": "999999"},
            },
            422,
            "memory must be",
        ),
        (
            "post",
            "/v1/run",
            {"content": b"x" * (70 << 20), "headers": {"content-type": "application/json"}},
            413,
            "limit",
        ),
    ],
)
def test_bad_requests_get_a_status_and_a_message(http, method, path, kwargs, status, message):
    response = getattr(http, method)(path, **kwargs)
    assert response.status_code == status, response.text
    assert message in response.text


def test_pickle_function_refuses_json_payload(http, client):
    import nanogrid

    @nanogrid.remote
    def f(x):
        return x

    function_id = f.deploy()
    response = http.post("/v1/run", json={"function_id": function_id, "payload": {"x": 1}})
    assert response.status_code == 400 and "args_pickle" in response.text


def test_delete_function(http):
    function = upload(http, "doomed", b"def handler(event, context):\n    return 1\n")
    assert http.delete(f"/v1/functions/{function['function_id']}").json()["deleted"] is True
    assert http.get(f"/v1/functions/{function['function_id']}").status_code == 404
    assert http.post("/v1/run", json={"function_id": function["function_id"]}).status_code == 404


def test_openapi_schema_lists_the_api(http):
    paths = http.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/health",
        "/v1/upload",
        "/v1/run",
        "/v1/map",
        "/v1/status/{job_id}",
        "/v1/functions",
        "/v1/functions/{function_id}",
        "/v1/jobs",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/outputs/{name}",
        "/v1/system/status",
    ):
        assert path in paths


def test_system_status_shows_the_warm_pool(http):
    status = http.get("/v1/system/status").json()
    (worker,) = status["workers"]
    assert worker["slots"] >= 1 and worker["pool"]["cap"] >= 1
    assert "process sandbox" in worker["pool"]["sandbox"]


def test_job_results_survive_a_restart(tmp_path: Path):
    first = start_grid(tmp_path, stem_cells=1, workers=1)
    try:
        http = httpx.Client(base_url=first.url, timeout=30, headers={"x-api-key": first.api_key})
        function = upload(http, "slow", SLOW)
        finished = http.post(
            "/v1/run", json={"function_id": function["function_id"], "payload": {"seconds": 0}}
        ).json()
        running = http.post(
            "/v1/run",
            json={"function_id": function["function_id"], "payload": {"seconds": 30}},
            headers={"X-Async": "true"},
        ).json()
        queued = http.post(
            "/v1/run",
            json={"function_id": function["function_id"], "payload": {"seconds": 0.1}},
            headers={"X-Async": "true"},
        ).json()
        deadline = time.monotonic() + 10
        while (
            http.get(f"/v1/status/{running['job_id']}").json()["status"] != "running"
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
    finally:
        first.stop()

    second = start_grid(tmp_path, stem_cells=1, workers=1)
    try:
        http = httpx.Client(base_url=second.url, timeout=30, headers={"x-api-key": second.api_key})
        assert http.get(f"/v1/status/{finished['job_id']}").json()["result"] == {"slept": 0}
        interrupted = http.get(f"/v1/status/{running['job_id']}").json()
        assert interrupted["status"] == "failed" and interrupted["error"]["kind"] == "interrupted"
        requeued = http.get(f"/v1/status/{queued['job_id']}", params={"wait": 30}).json()
        assert requeued["status"] == "completed" and requeued["result"] == {"slept": 0.1}
    finally:
        second.stop()


def _triple(x):
    return 3 * x


def test_a_package_sent_as_the_body_is_checked_and_stored_as_an_upload_is(http, grid):
    """``POST /v1/packages`` (the Python client's upload): the same function, the same checks, the same errors as
    ``/v1/upload``; what must never happen is a package this route takes that /v1/upload would refuse."""
    import nanogrid
    from nanogrid.packaging import package_function

    package = nanogrid.RemoteFunction(_triple).package()
    zip_headers = {"content-type": "application/zip"}
    made = http.post("/v1/packages", content=package.data, headers=zip_headers)
    assert made.status_code == 201, made.text
    again = http.post("/v1/packages", content=package.data, headers=zip_headers)
    assert again.status_code == 200 and again.json() == made.json()
    through_form = http.post(
        "/v1/upload", files={"file": ("package.zip", package.data, "application/zip")}
    )
    assert through_form.status_code == 200 and through_form.json() == made.json()
    run = http.post(
        "/v1/run",
        json={"function_id": made.json()["function_id"], "args_pickle": _args_pickle(7)},
    ).json()
    assert run["status"] == "completed", run

    # bad packages refused as /v1/upload refuses them (the same status and body), nothing stored
    before = http.get("/v1/functions").json()
    too_much = package_function(_triple, memory_mib=grid.grid.config.max_memory_mib + 1)
    for bad in (b"PK\x03\x04 not a zip at all", too_much.data):
        refused = http.post("/v1/packages", content=bad, headers=zip_headers)
        as_form = http.post("/v1/upload", files={"file": ("package.zip", bad, "application/zip")})
        assert refused.status_code >= 400
        assert (refused.status_code, refused.json()) == (as_form.status_code, as_form.json())
    for content, headers, status in [
        (package.data, {"content-type": "multipart/form-data; boundary=x"}, 415),
        (package.data, {}, 415),
        (b"x" * (grid.grid.config.max_package_bytes + (2 << 20)), zip_headers, 413),
    ]:
        refused = http.post("/v1/packages", content=content, headers=headers)
        assert refused.status_code == status, (status, refused.text[:200])
        if status == 415:  # says what to send instead
            assert "Content-Type: application/zip" in refused.json()["detail"]
    assert http.get("/v1/functions").json() == before
    wrong_key = httpx.post(
        f"{grid.url}/v1/packages", content=package.data, headers={**zip_headers, "x-api-key": "no"}
    )
    assert wrong_key.status_code == 401


def _args_pickle(*args: object) -> str:
    import base64

    import cloudpickle

    return base64.b64encode(cloudpickle.dumps((args, {}))).decode()
