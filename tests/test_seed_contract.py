"""The seed platform's clients against NanoGrid, unchanged: its UI's deploy and invoke pages, its BFF (gateway),
its end-to-end, async, scaling and stress scripts, replayed request by request on the embedded grid with Docker
sandboxes; then each route of the contract (nanogrid_backend/controller/routes/seed/) on its own.

What must never happen: a seed client that gets a shape it cannot read (``detail`` instead of ``error``, ``running``
where it polls on ``pending``), a function id that changes on update, one owner reaching another's function or
job through the seed routes, a secret or env var crossing into another function.
"""

from __future__ import annotations

import io
import json
import time
import zipfile
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from nanogrid_backend.embedded import EmbeddedGrid
from nanogrid_backend.keys import create_key

pytestmark = pytest.mark.integration

# The seed UI's Python template (deploy/page.tsx), as its users wrote functions.
UI_TEMPLATE = """import json
import os
import sdk

def handler(event, context):
    name = event.get("name", "World")
    print(f"request {context.get('request_id')} for {name}")
    return {"message": f"Hello, {name}!", "job": os.environ.get("JOB_ID"), "fn": os.environ.get("FUNCTION_ID"),
            "memory": os.environ.get("MEMORY_MB"), "greeting": os.environ.get("GREETING"),
            "same_event": sdk.get_input() == event, "context_job": context["job_id"] == context.aws_request_id}
"""
MAIN_ONLY = "def main(event, context):\n    return {'entry': 'main', 'n': event.get('n')}\n"
FAILING = "def handler(event, context):\n    raise ValueError('bad input: ' + str(event))\n"
ENVIRONMENT = """import os
import sdk

def handler(event, context):
    payload = sdk.get_input()
    return {k: os.environ.get(k) for k in ("JOB_ID", "FUNCTION_ID", "MEMORY_MB", "OUTPUT_DIR", "PAYLOAD_FILE")} | {
        "size": len(payload.get("blob", "")), "has_payload": "PAYLOAD" in os.environ}
"""


def zipped(source: str, name: str = "main.py") -> bytes:
    """What the seed UI sends: the editor's code, zipped."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr(name, source)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def seed(docker_grid: EmbeddedGrid) -> Iterator[httpx.Client]:
    """A client as the seed's scripts make one: base URL and the x-api-key header."""
    with httpx.Client(
        base_url=docker_grid.url, headers={"x-api-key": docker_grid.api_key}, timeout=120
    ) as client:
        yield client


def deploy(
    client: httpx.Client,
    source: str,
    *,
    prefix: str = "",
    memory: int = 256,
    name: str = "hello%20world",
    env: dict[str, Any] | None = None,
    description: str = "",
) -> str:
    response = client.post(
        f"{prefix}/upload",
        headers={"x-runtime": "python", "x-memory-mb": str(memory), "x-function-name": name},
        files={"file": ("function.zip", zipped(source), "application/zip")},
        data={"description": description, "envVars": json.dumps(env or {})},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True
    return body["functionId"]


def poll(
    client: httpx.Client, job_id: str, prefix: str = "/api", limit_s: float = 60
) -> dict[str, Any]:
    """The seed's async script: GET /status/:jobId while the status is "pending"."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        body = client.get(f"{prefix}/status/{job_id}").json()
        if body["status"] != "pending":
            return body
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still pending after {limit_s} s")


# the seed's own client sequences


def test_ui_deploy_then_invoke_page(seed: httpx.Client) -> None:
    """Deploy page: upload with the original's headers and form fields; invoke page: sync /run and read stdout."""
    function_id = deploy(
        seed, UI_TEMPLATE, prefix="/api", env={"GREETING": "hi"}, description="first"
    )
    listed = {f["functionId"]: f for f in seed.get("/api/functions").json()}
    assert (
        listed[function_id]["name"] == "hello-world"
        and listed[function_id]["description"] == "first"
    )
    assert listed[function_id]["runtime"] == "python" and listed[function_id]["memoryMb"] == 256
    result = seed.post(
        "/api/run", json={"functionId": function_id, "inputData": {"name": "Ada"}}
    ).json()
    assert result["status"] == "SUCCESS" and result["exitCode"] == 0
    value = json.loads(
        result["stdout"].strip().splitlines()[-1]
    )  # the UI shows the last stdout line as the result
    assert value == result["result"]
    assert (
        value["message"] == "Hello, Ada!"
        and value["job"] == result["jobId"]
        and value["fn"] == function_id
    )
    assert (
        value["memory"] == "256"
        and value["greeting"] == "hi"
        and value["same_event"]
        and value["context_job"]
    )
    assert f"request {result['jobId']} for Ada" in result["stdout"]
    assert (
        result["durationMs"] >= 0
        and result["peakMemoryBytes"] > 0
        and result["allocatedMemoryMb"] == 256
    )


def test_end_to_end_script_upload_run_async_poll_status(seed: httpx.Client) -> None:
    """The e2e script: upload -> run -> x-async run (202 ACCEPTED) -> poll /status until it is no longer pending."""
    function_id = deploy(seed, MAIN_ONLY)
    sync = seed.post("/run", json={"functionId": function_id, "inputData": {"n": 1}})
    assert sync.status_code == 200 and sync.json()["result"] == {"entry": "main", "n": 1}
    accepted = seed.post(
        "/run", headers={"x-async": "true"}, json={"functionId": function_id, "inputData": {"n": 2}}
    )
    assert accepted.status_code == 202
    assert set(accepted.json()) == {"status", "jobId"} and accepted.json()["status"] == "ACCEPTED"
    done = poll(seed, accepted.json()["jobId"], prefix="")
    assert done["status"] == "SUCCESS" and done["result"] == {"entry": "main", "n": 2}


def test_gateway_bff_forwards_under_api(seed: httpx.Client) -> None:
    """The BFF calls /api/... with x-async forwarded; every answer it relays is JSON with the original's keys."""
    function_id = deploy(seed, MAIN_ONLY, prefix="/api")
    accepted = seed.post(
        "/api/run", headers={"x-async": "true"}, json={"functionId": function_id, "inputData": {}}
    )
    assert accepted.status_code == 202
    assert poll(seed, accepted.json()["jobId"])["status"] == "SUCCESS"
    assert seed.get(f"/api/functions/{function_id}").json()["id"] == function_id
    assert "pools" in seed.get("/api/system/status").json()
    assert "workers" in seed.get("/api/workers").json()


def test_scaling_script_burst_of_async_runs_all_succeed(seed: httpx.Client) -> None:
    """The scaling test: a burst larger than the warm pool is accepted at once and every call ends SUCCESS."""
    function_id = deploy(seed, MAIN_ONLY)
    job_ids = [
        seed.post(
            "/api/run",
            headers={"x-async": "true"},
            json={"functionId": function_id, "inputData": {"n": n}},
        ).json()["jobId"]
        for n in range(12)
    ]
    results = [poll(seed, job_id) for job_id in job_ids]
    assert [r["status"] for r in results] == ["SUCCESS"] * 12
    assert sorted(r["result"]["n"] for r in results) == list(range(12))
    listed = {f["functionId"]: f for f in seed.get("/functions").json()}
    assert listed[function_id]["invocations"] == 12 and listed[function_id]["avgDuration"] >= 0


# each route


def test_discovery_health_and_metrics_are_open(docker_grid: EmbeddedGrid) -> None:
    """/, /health and /metrics answer without a key, at the root and under /api, as in the original."""
    with httpx.Client(base_url=docker_grid.url) as anonymous:
        for prefix in ("", "/api"):
            doc = anonymous.get(f"{prefix}/").json()
            assert doc["version"] == "v2.8" and doc["endpoints"]["functions"] == "/api/functions"
            assert anonymous.get(f"{prefix}/health").status_code == 200
            text = anonymous.get(f"{prefix}/metrics").text
            for name in (
                "function_invocations_total",
                "function_duration_seconds_bucket",
                "function_handler_duration_seconds_bucket",
                "http_request_duration_seconds_bucket",
            ):
                assert name in text, name


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/functions"),
        ("GET", "/functions/x"),
        ("PUT", "/functions/x"),
        ("DELETE", "/functions/x"),
        ("POST", "/upload"),
        ("POST", "/run"),
        ("GET", "/status/x"),
        ("GET", "/logs"),
        ("GET", "/api/functions/x/logs"),
        ("GET", "/api/functions/x/logs/y"),
        ("POST", "/api/worker/heartbeat"),
        ("GET", "/api/workers"),
        ("GET", "/system/status"),
        ("GET", "/models"),
    ],
)
def test_every_protected_route_refuses_a_missing_or_wrong_key_with_the_seeds_body(
    docker_grid: EmbeddedGrid, method: str, path: str
) -> None:
    """Never a {"detail"} body or a 422 where the seed's clients expect 401 {"error": "Unauthorized"}."""
    for headers in ({}, {"x-api-key": "ng_wrong_key"}):
        for full in {path, path if path.startswith("/api") else "/api" + path}:
            response = httpx.request(method, docker_grid.url + full, headers=headers)
            assert (response.status_code, response.json()) == (401, {"error": "Unauthorized"}), full


def test_upload_validation_answers_400_with_the_originals_messages(seed: httpx.Client) -> None:
    """Bad runtime, memory out of range, a runtime this grid lacks, no file: 400 {"error"}, nothing deployed."""
    before = len(seed.get("/functions").json())
    file = {"file": ("f.zip", zipped(MAIN_ONLY))}
    cases = [
        ({"x-runtime": "ruby"}, "Invalid runtime. Allowed: python, cpp, nodejs, go"),
        ({"x-memory-mb": "64"}, "Invalid memoryMb for python. Must be between 128 and 10240 MB."),
        (
            {"x-runtime": "go", "x-memory-mb": "2048"},
            "Invalid memoryMb for go. Must be between 128 and 1024 MB.",
        ),
        ({"x-memory-mb": "lots"}, "Invalid memoryMb for python. Must be between 128 and 10240 MB."),
    ]
    for headers, message in cases:
        response = seed.post("/upload", headers=headers, files=file)
        assert (response.status_code, response.json()) == (400, {"error": message})
    missing = seed.post("/upload", headers={"x-runtime": "python"}, data={"description": "no file"})
    assert (missing.status_code, missing.json()) == (400, {"error": "No file provided"})
    bad_env = seed.post("/upload", files=file, data={"envVars": "not json"})
    assert bad_env.status_code == 400 and "envVars" in bad_env.json()["error"]
    assert len(seed.get("/functions").json()) == before


def test_upload_and_run_carry_rate_limit_headers_and_429_when_empty(
    docker_grid: EmbeddedGrid,
) -> None:
    """X-RateLimit-Limit/-Remaining on /upload and /run; an empty bucket is 429 with the original's message,
    on every authenticated route."""
    key, _ = create_key(docker_grid.grid.registry, "seed-limited", rate_limit=0.01, rate_burst=3)
    with httpx.Client(base_url=docker_grid.url, headers={"x-api-key": key}, timeout=60) as client:
        first = client.post("/upload", files={"file": ("f.zip", zipped(MAIN_ONLY))})
        assert first.status_code == 200
        assert (
            first.headers["X-RateLimit-Limit"] == "3"
            and first.headers["X-RateLimit-Remaining"] == "2"
        )
        function_id = first.json()["functionId"]
        second = client.post("/run", json={"functionId": function_id}, headers={"x-async": "true"})
        assert second.status_code == 202 and second.headers["X-RateLimit-Remaining"] == "1"
        client.post("/run", json={"functionId": function_id}, headers={"x-async": "true"})
        refused = client.post("/api/run", json={"functionId": function_id})
        assert refused.status_code == 429
        assert refused.json() == {"error": "Too Many Requests (Token Bucket Exhausted)"}
        assert (
            refused.headers["X-RateLimit-Remaining"] == "0"
            and int(refused.headers["Retry-After"]) >= 1
        )
        listed = client.get("/functions")  # every authenticated route spends from the same bucket
        assert listed.status_code == 429 and listed.headers["X-RateLimit-Remaining"] == "0"


def test_run_errors_and_a_failing_function(seed: httpx.Client) -> None:
    """400 without functionId, 404 for an unknown one, FAILED with exitCode 1 and the traceback for an exception."""
    assert (seed.post("/run", json={}).status_code, seed.post("/run", json={}).json()) == (
        400,
        {"error": "functionId is required"},
    )
    assert (
        seed.post(
            "/run", content=b"{not json", headers={"content-type": "application/json"}
        ).status_code
        == 400
    )
    unknown = seed.post("/api/run", json={"functionId": "00000000-0000-0000-0000-000000000000"})
    assert (unknown.status_code, unknown.json()) == (404, {"error": "Function not found"})
    failed = seed.post(
        "/run", json={"functionId": deploy(seed, FAILING), "inputData": {"x": 1}}
    ).json()
    assert failed["status"] == "FAILED" and failed["exitCode"] == 1
    assert "ValueError: bad input: {'x': 1}" in failed["stderr"] and failed["result"] is None


def test_status_of_an_unknown_or_unfinished_job_is_200_pending(seed: httpx.Client) -> None:
    """The original answers 200 pending for what it does not know; its clients poll on "pending", never "running"."""
    for prefix in ("", "/api"):
        response = seed.get(f"{prefix}/status/job-does-not-exist")
        assert (response.status_code, response.json()["status"]) == (200, "pending")
    slow = deploy(
        seed, "import time\ndef handler(event, context):\n    time.sleep(3)\n    return 1\n"
    )
    job_id = seed.post("/run", headers={"x-async": "true"}, json={"functionId": slow}).json()[
        "jobId"
    ]
    seen = {seed.get(f"/status/{job_id}").json()["status"] for _ in range(3)}
    assert seen == {"pending"}
    assert poll(seed, job_id)["result"] == 1


def test_update_keeps_the_id_and_its_history(seed: httpx.Client) -> None:
    """PUT /functions/:id: new code, memory and description under the same id; earlier calls stay in its history."""
    function_id = deploy(seed, MAIN_ONLY, description="v1")
    first = seed.post("/run", json={"functionId": function_id, "inputData": {"n": 1}}).json()
    new_code = "def handler(event, context):\n    return {'version': 2}\n"
    updated = seed.put(
        f"/api/functions/{function_id}",
        files={"file": ("code.zip", zipped(new_code))},
        data={"description": "v2", "memoryMb": "512"},
    )
    assert updated.json() == {"success": True, "functionId": function_id}
    shown = seed.get(f"/functions/{function_id}").json()
    assert (shown["id"], shown["description"], shown["memoryMb"]) == (function_id, "v2", 512)
    second = seed.post("/run", json={"functionId": function_id}).json()
    assert second["result"] == {"version": 2} and second["allocatedMemoryMb"] == 512
    memory_only = seed.put(f"/functions/{function_id}", data={"memoryMb": "256"})
    assert memory_only.json()["functionId"] == function_id
    assert seed.post("/run", json={"functionId": function_id}).json()["result"] == {"version": 2}
    listed = {f["functionId"]: f for f in seed.get("/functions").json()}
    assert listed[function_id]["invocations"] == 3 and list(listed).count(function_id) == 1
    logs = seed.get(f"/api/functions/{function_id}/logs").json()
    assert {first["jobId"], second["jobId"]} <= {entry["requestId"] for entry in logs}
    assert seed.put("/functions/no-such-function", data={"description": "x"}).status_code == 404


def test_delete_answers_the_originals_bodies(seed: httpx.Client) -> None:
    function_id = deploy(seed, MAIN_ONLY)
    seed.put(f"/functions/{function_id}", data={"memoryMb": "300"})
    assert seed.delete(f"/functions/{function_id}").json() == {
        "success": True,
        "deletedId": function_id,
    }
    again = seed.delete(f"/api/functions/{function_id}")
    assert (again.status_code, again.json()) == (
        404,
        {"error": "Function not found", "functionId": function_id},
    )
    assert seed.get(f"/functions/{function_id}").status_code == 404
    assert seed.post("/run", json={"functionId": function_id}).status_code == 404


def test_logs_feed_function_logs_and_one_log_in_full(seed: httpx.Client) -> None:
    """GET /logs (newest calls), /api/functions/:id/logs (previews <= 200 chars), /:requestId (the whole message)."""
    noisy = deploy(seed, "def handler(event, context):\n    print('x' * 500)\n    return 'ok'\n")
    job_id = seed.post("/run", json={"functionId": noisy}).json()["jobId"]
    feed = seed.get("/logs").json()
    assert feed[0]["requestId"] == job_id and feed[0]["msg"] == f"Function Executed: {noisy}"
    entries = seed.get(f"/api/functions/{noisy}/logs", params={"limit": 5}).json()
    assert entries[0]["requestId"] == job_id and entries[0]["status"] == "SUCCESS"
    assert len(entries[0]["message"]) == 203 and entries[0]["message"].endswith("...")
    full = seed.get(f"/api/functions/{noisy}/logs/{job_id}").json()
    assert full["message"].startswith("x" * 500)
    missing = seed.get(f"/api/functions/{noisy}/logs/job-nope")
    assert (missing.status_code, missing.json()) == (404, {"error": "Log not found"})


def test_worker_heartbeat_workers_and_system_status(seed: httpx.Client) -> None:
    """A seed worker's heartbeat shows in /api/workers and is summed into /system/status with the grid's own."""
    assert seed.post("/api/worker/heartbeat", json={"status": "healthy"}).json() == {
        "error": "workerId is required"
    }
    beat = {
        "workerId": "seed-worker-1",
        "status": "healthy",
        "pools": {"python": 2, "nodejs": 1},
        "activeJobs": 3,
        "uptimeSeconds": 42,
    }
    assert seed.post("/api/worker/heartbeat", json=beat).json() == {"ok": True}
    listing = seed.get("/api/workers").json()
    found = {w["workerId"]: w for w in listing["workers"]}
    assert found["seed-worker-1"]["healthStatus"] == "healthy" and listing["healthyWorkers"] >= 2
    status = seed.get("/system/status").json()
    assert status["status"] == "online" and status["worker_count"] >= 2
    assert status["pools"]["nodejs"] >= 1 and status["active_jobs"] >= 3
    assert set(status["pools"]) == {"python", "nodejs", "cpp", "go"}


def test_models_falls_back_to_the_default_model(seed: httpx.Client) -> None:
    """No AI node: the original's fallback catalog, never an error."""
    body = seed.get("/models").json()
    assert body["models"][0]["status"] == "fallback" and "warning" in body


def test_environment_variables_and_payload_file(seed: httpx.Client) -> None:
    """JOB_ID, FUNCTION_ID, MEMORY_MB, OUTPUT_DIR always; envVars never override them; PAYLOAD_FILE above 100 KB."""
    function_id = deploy(
        seed, ENVIRONMENT, memory=384, env={"JOB_ID": "forged", "FUNCTION_ID": "forged"}
    )
    small = seed.post(
        "/run", json={"functionId": function_id, "inputData": {"blob": "a" * 10}}
    ).json()["result"]
    assert (
        small["JOB_ID"].startswith("job-")
        and small["FUNCTION_ID"] == function_id
        and small["MEMORY_MB"] == "384"
    )
    assert (
        small["OUTPUT_DIR"]
        and small["PAYLOAD_FILE"] is None
        and small["has_payload"]
        and small["size"] == 10
    )
    large = seed.post(
        "/run", json={"functionId": function_id, "inputData": {"blob": "b" * 150_000}}
    ).json()["result"]
    assert large["PAYLOAD_FILE"] and not large["has_payload"] and large["size"] == 150_000


def test_another_owner_sees_nothing_through_the_seed_routes(
    seed: httpx.Client, docker_grid: EmbeddedGrid
) -> None:
    """One owner's function and jobs do not exist for another: not listed, 404 to run, update or delete, pending."""
    function_id = deploy(seed, MAIN_ONLY)
    job_id = seed.post("/run", json={"functionId": function_id}).json()["jobId"]
    other_key, _ = create_key(docker_grid.grid.registry, "seed-other-owner")
    with httpx.Client(
        base_url=docker_grid.url, headers={"x-api-key": other_key}, timeout=60
    ) as other:
        assert function_id not in {f["functionId"] for f in other.get("/functions").json()}
        assert other.post("/run", json={"functionId": function_id}).status_code == 404
        assert (
            other.put(f"/functions/{function_id}", data={"description": "mine"}).status_code == 404
        )
        assert other.delete(f"/functions/{function_id}").status_code == 404
        assert other.get(f"/status/{job_id}").json()["status"] == "pending"
        assert other.get(f"/api/functions/{function_id}/logs").status_code == 404
        assert job_id not in {entry["requestId"] for entry in other.get("/logs").json()}
    assert seed.get(f"/functions/{function_id}").status_code == 200


def test_native_api_lives_under_v1_beside_the_seed_routes(seed: httpx.Client) -> None:
    """/v1 keeps NanoGrid's own shapes ({"detail", "error"} errors); the root keeps the seed's."""
    assert seed.get("/v1/health").json()["status"] == "healthy"
    native = seed.post("/v1/run", json={})
    assert native.status_code == 422 and "detail" in native.json()
    assert seed.post("/run", json={}).json() == {"error": "functionId is required"}


# the seed's operations routes

NODE_TEMPLATE = (
    "exports.handler = async (event) => ({ message: `Hello, ${event.name || 'World'}!` });\n"
)


def test_put_takes_the_uis_json_body(seed: httpx.Client) -> None:
    """PUT /functions/:id with JSON {description, memoryMb} must never answer 200 and change nothing."""
    function_id = deploy(seed, MAIN_ONLY, description="before")
    updated = seed.put(
        f"/api/functions/{function_id}", json={"description": "after", "memoryMb": 384}
    )
    assert updated.json() == {"success": True, "functionId": function_id}
    shown = seed.get(f"/functions/{function_id}").json()
    assert (shown["description"], shown["memoryMb"], shown["versions"]) == ("after", 384, 2)
    assert seed.post("/run", json={"functionId": function_id}).json()["allocatedMemoryMb"] == 384
    too_big = seed.put(f"/functions/{function_id}", json={"memoryMb": 20000})
    assert too_big.status_code == 400 and "between 128 and 10240" in too_big.json()["error"]
    broken = seed.put(
        f"/functions/{function_id}", content=b"{", headers={"content-type": "application/json"}
    )
    assert broken.status_code == 400 and "JSON" in broken.json()["error"]


def test_results_carry_the_per_run_autotuner_advice(seed: httpx.Client) -> None:
    """A run that used a sliver of its memory must never come back without the seed's AutoTuner tip."""
    function_id = deploy(seed, MAIN_ONLY, memory=1024)
    result = seed.post("/run", json={"functionId": function_id, "inputData": {"n": 1}}).json()
    assert result["status"] == "SUCCESS" and result["peakMemoryBytes"]
    assert result["optimizationTip"].startswith("Resource Waste")
    assert 128 <= result["recommendedMemoryMb"] < 1024
    assert result["estimatedSavings"] == round(
        (1024 - result["recommendedMemoryMb"]) * 0.00005 * 730, 4
    )


def test_auto_tuner_panel_and_metrics_windows(seed: httpx.Client) -> None:
    """The UI's /auto-tuner and the BFF's /metrics?range= must never 404 for a function with calls, nor count
    calls outside the range or another function's."""
    function_id = deploy(seed, FAILING)
    other = deploy(seed, MAIN_ONLY)
    for n in range(3):
        seed.post("/run", json={"functionId": function_id, "inputData": {"n": n}})
    seed.post("/run", json={"functionId": other})
    tuner = seed.get(f"/api/functions/{function_id}/auto-tuner").json()
    assert (
        tuner["functionId"] == function_id
        and tuner["currentMemoryMb"] == 256
        and tuner["calls"] == 3
    )
    assert {"recommendedMemoryMb", "optimizationTip", "estimatedSavings"} <= set(tuner)
    metrics = seed.get(f"/api/functions/{function_id}/metrics", params={"range": "1h"}).json()
    assert (metrics["invocations"], metrics["errors"], metrics["successRate"]) == (3, 3, 0)
    assert (
        len(metrics["recentExecutions"]) == 3
        and metrics["recentExecutions"][0]["status"] == "FAILED"
    )
    for window in ("24h", "7d", "30d"):
        assert (
            seed.get(f"/functions/{function_id}/metrics", params={"range": window}).json()[
                "invocations"
            ]
            == 3
        )
    wrong = seed.get(f"/functions/{function_id}/metrics", params={"range": "2y"})
    assert wrong.status_code == 400 and "1h, 24h, 7d, 30d" in wrong.json()["error"]
    assert seed.get("/api/functions/no-such-function/auto-tuner").status_code == 404


def test_debug_loadtest_streams_progress_then_a_summary(seed: httpx.Client) -> None:
    """POST /debug/loadtest must stream and end with its summary, and never exceed nanogrid loadtest's bounds."""
    function_id = deploy(seed, MAIN_ONLY)
    with seed.stream(
        "POST", "/debug/loadtest", json={"functionId": function_id, "rps": 5, "duration": 1}
    ) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert lines[0].startswith(f"load test of {function_id}")
    summary = json.loads(lines[-1])
    assert (summary["planned"], summary["completed"], summary["failed"], summary["running"]) == (
        5,
        5,
        0,
        False,
    )
    too_much = seed.post(
        "/debug/loadtest", json={"functionId": function_id, "rps": 100000, "duration": 1}
    )
    assert too_much.status_code == 400 and "rps" in too_much.json()["error"]
    assert seed.post("/debug/loadtest", json={"functionId": "no-such-function"}).status_code == 404


def test_bff_loadtest_start_status_stop(seed: httpx.Client) -> None:
    """/api/loadtest/*: one test per owner at a time, and stop must end it."""
    function_id = deploy(seed, MAIN_ONLY)
    started = seed.post(
        "/api/loadtest/start", json={"functionId": function_id, "rps": 2, "duration": 60}
    )
    assert started.status_code == 202 and started.json()["running"] is True
    assert seed.post("/api/loadtest/start", json={"functionId": function_id}).status_code == 409
    assert seed.get("/api/loadtest/status").json()["status"] == "running"
    assert seed.post("/api/loadtest/stop").json()["status"] == "stopped"
    deadline = time.monotonic() + 30
    while seed.get("/api/loadtest/status").json()["running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    status = seed.get("/api/loadtest/status").json()
    assert status["status"] == "done" and status["sent"] < status["planned"]


def test_log_preview_shows_the_value_when_nothing_was_printed(seed: httpx.Client) -> None:
    """A function that printed nothing must never show an empty message in its logs."""
    function_id = deploy(seed, "def handler(event, context):\n    return {'value': 42}\n")
    seed.post("/run", json={"functionId": function_id})
    (entry,) = seed.get(f"/api/functions/{function_id}/logs").json()
    assert entry["message"] == '{"value": 42}\n'


def test_warm_sandboxes_are_counted_by_runtime(
    seed: httpx.Client, docker_grid: EmbeddedGrid
) -> None:
    """A warm Node.js sandbox must never be counted under python in /api/workers or /system/status."""
    if "nodejs" not in seed.get("/health").json()["runtimes"]:
        pytest.skip(
            "the Node.js runtime image is not built (nanogrid_runtimes/build.py --runtime node)"
        )
    response = seed.post(
        "/upload",
        headers={"x-runtime": "nodejs", "x-memory-mb": "256"},
        files={"file": ("index.js", NODE_TEMPLATE.encode())},
    )
    assert response.status_code == 200, response.text
    node = response.json()["functionId"]
    assert seed.post("/run", json={"functionId": node, "inputData": {"name": "node"}}).json()[
        "result"
    ] == {"message": "Hello, node!"}
    own = [
        w for w in seed.get("/api/workers").json()["workers"] if w["workerId"] != "seed-worker-1"
    ]
    assert sum(w["pools"]["nodejs"] for w in own) >= 1, own
    assert seed.get("/system/status").json()["pools"]["nodejs"] >= 1
