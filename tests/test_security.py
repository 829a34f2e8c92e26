"""The front door: keys, owners, rate limits, and every bad input refused with a status and a message."""

from __future__ import annotations

import io
import json
import time
import zipfile

import httpx
import pytest

import nanogrid
from nanogrid_backend.keys import create_key, revoke_key
from tests.conftest import start_grid

pytestmark = pytest.mark.integration

HELLO = b"def handler(event, context):\n    return {'hello': event}\n"


@pytest.fixture()
def key(grid) -> str:
    return grid.api_key


def api(grid, key: str | None = None, **headers: str) -> httpx.Client:
    if key:
        headers["x-api-key"] = key
    return httpx.Client(base_url=grid.url, headers=headers, timeout=30)


def upload(client: httpx.Client, source: bytes = HELLO, name: str = "hello") -> str:
    response = client.post(
        "/v1/upload",
        files={"file": (f"{name}.py", source)},
        data={"function_name": name, "handler": f"{name}.handler"},
    )
    assert response.status_code in (200, 201), response.text
    return response.json()["function_id"]


def test_health_is_open_and_everything_else_needs_a_key(grid):
    anonymous = api(grid)
    assert anonymous.get("/health").status_code == 200
    for method, path in [
        ("get", "/v1/functions"),
        ("get", "/v1/jobs"),
        ("get", "/v1/system/status"),
        ("post", "/v1/run"),
        ("post", "/v1/upload"),
        ("get", "/v1/status/job-x"),
    ]:
        response = getattr(anonymous, method)(path)
        assert response.status_code == 401, (path, response.text)
        assert "missing API key" in response.json()["detail"]
        assert response.headers["www-authenticate"] == "Bearer"


def test_wrong_and_revoked_keys_say_which(grid):
    wrong = api(grid, "ng_00000000_not-a-real-key").get("/v1/functions")
    assert wrong.status_code == 401 and "wrong API key" in wrong.json()["detail"]
    key, record = create_key(grid.grid.registry, "temporary")
    assert api(grid, key).get("/v1/functions").status_code == 200
    revoke_key(grid.grid.registry, record.key_id)
    time.sleep(5.1)  # the controller caches a verified key for up to 5 s
    revoked = api(grid, key).get("/v1/functions")
    assert revoked.status_code == 401 and "revoked" in revoked.json()["detail"]


def test_bearer_works_like_x_api_key(grid, key):
    assert api(grid, Authorization=f"Bearer {key}").get("/v1/functions").status_code == 200


def test_another_owners_functions_and_jobs_do_not_exist_for_you(grid, key):
    alice = api(grid, key)
    function_id = upload(alice)
    job = alice.post("/v1/run", json={"function_id": function_id, "payload": 1}).json()
    bob_key, _ = create_key(grid.grid.registry, "bob")
    bob = api(grid, bob_key)
    assert bob.get(f"/v1/functions/{function_id}").status_code == 404
    assert bob.post("/v1/run", json={"function_id": function_id, "payload": 1}).status_code == 404
    assert bob.get(f"/v1/status/{job['job_id']}").status_code == 404
    assert bob.post(f"/v1/jobs/{job['job_id']}/cancel").status_code == 404
    assert bob.delete(f"/v1/functions/{function_id}").status_code == 404
    assert all(j["job_id"] != job["job_id"] for j in bob.get("/v1/jobs").json())
    assert function_id not in {f["function_id"] for f in bob.get("/v1/functions").json()}
    # the same code uploaded by bob is bob's own function
    assert upload(bob) != function_id
    assert alice.get(f"/v1/status/{job['job_id']}").json()["result"] == {"hello": 1}


def zip_bytes(entries: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def lying_zip() -> bytes:
    """A zip whose entry declares 10 bytes but inflates to much more."""
    data = bytearray(zip_bytes({"m.py": b"x = 1\n" * 20000}))
    offset = data.find(b"PK\x01\x02")  # central directory: uncompressed size at +24
    data[offset + 24 : offset + 28] = (10).to_bytes(4, "little")
    local = data.find(b"PK\x03\x04")
    data[local + 22 : local + 26] = (10).to_bytes(4, "little")
    return bytes(data)


FORM = {"function_name": "f", "handler": "m.handler"}
BAD_INPUTS = [
    (
        "broken zip",
        "post",
        "/v1/upload",
        {"files": {"file": ("f.zip", b"PK\x03\x04garbage")}, "data": FORM},
        400,
        "neither a .py file nor a valid zip",
    ),
    (
        "zip slip",
        "post",
        "/v1/upload",
        {"files": {"file": ("f.zip", zip_bytes({"../../etc/cron.d/x": HELLO}))}, "data": FORM},
        400,
        "outside the package",
    ),
    (
        "absolute path",
        "post",
        "/v1/upload",
        {"files": {"file": ("f.zip", zip_bytes({"/abs.py": HELLO}))}, "data": FORM},
        400,
        "outside the package",
    ),
    (
        "zip bomb",
        "post",
        "/v1/upload",
        {"files": {"file": ("f.zip", zip_bytes({"m.py": b"\0" * (50 << 20)}))}, "data": FORM},
        413,
        "zip bomb",
    ),
    (
        "size lies",
        "post",
        "/v1/upload",
        {"files": {"file": ("f.zip", lying_zip())}, "data": FORM},
        400,
        "damaged",
    ),
    (
        "manifest not JSON",
        "post",
        "/v1/upload",
        {
            "files": {"file": ("f.zip", zip_bytes({"manifest.json": b"{oops", "m.py": HELLO}))},
            "data": FORM,
        },
        422,
        "manifest.json is not valid JSON",
    ),
    (
        "unknown runtime",
        "post",
        "/v1/upload",
        {"files": {"file": ("m.py", HELLO)}, "data": {**FORM, "runtime": "cobol85"}},
        422,
        "unknown runtime",
    ),
    (
        "shell in a name",
        "post",
        "/v1/upload",
        {"files": {"file": ("m.py", HELLO)}, "data": {**FORM, "function_name": "x; rm -rf /"}},
        422,
        "function name",
    ),
    (
        "timeout too long",
        "post",
        "/v1/upload",
        {"files": {"file": ("m.py", HELLO)}, "data": {**FORM, "timeout": "99999"}},
        422,
        "timeout must be",
    ),
    (
        "memory too big",
        "post",
        "/v1/upload",
        {"files": {"file": ("m.py", HELLO)}, "data": {**FORM, "memory": "999999"}},
        422,
        "memory must be",
    ),
    (
        "package too big",
        "post",
        "/v1/upload",
        {"files": {"file": ("m.py", b"#" * (65 << 20))}, "data": FORM},
        413,
        "limit",
    ),
    (
        "payload too big",
        "post",
        "/v1/run",
        {"json": {"function_id": "FUNCTION", "payload": "x" * (17 << 20)}},
        413,
        "over the",
    ),
    (
        "body too big",
        "post",
        "/v1/run",
        {"content": b"x" * (90 << 20), "headers": {"content-type": "application/json"}},
        413,
        "limit",
    ),
    (
        "not JSON",
        "post",
        "/v1/run",
        {"content": b"{", "headers": {"content-type": "application/json"}},
        422,
        "JSON",
    ),
    (
        "pickle to a handler",
        "post",
        "/v1/run",
        {"json": {"function_id": "FUNCTION", "args_pickle": "AAAA"}},
        400,
        "handler function",
    ),
    (
        "map too many",
        "post",
        "/v1/map",
        {"json": {"function_id": "FUNCTION", "payloads": [1] * 10001}},
        413,
        "at most",
    ),
    (
        "map both kinds",
        "post",
        "/v1/map",
        {"json": {"function_id": "FUNCTION", "payloads": [1], "args_pickle": ["AA"]}},
        422,
        "exactly one",
    ),
    ("unknown job", "get", "/v1/status/job-nope", {}, 404, "no job"),
    ("bad wait", "get", "/v1/status/job-nope?wait=-1", {}, 422, "wait"),
]


def test_every_bad_input_is_refused_and_nothing_is_lost(grid, key):
    client = api(grid, key)
    function_id = upload(client, name="keeper")
    before = client.post("/v1/run", json={"function_id": function_id, "payload": "kept"}).json()
    assert before["status"] == "completed"
    for label, method, path, kwargs, status, message in BAD_INPUTS:
        kwargs = (
            json.loads(json.dumps(kwargs, default=str).replace("FUNCTION", function_id))
            if "json" in kwargs
            else kwargs
        )
        response = getattr(client, method)(path, **kwargs)
        assert response.status_code == status, (label, response.status_code, response.text[:300])
        assert message in response.text, (label, response.text[:300])
    # the grid still serves, and the earlier result is intact
    after = client.post("/v1/run", json={"function_id": function_id, "payload": "still"}).json()
    assert after["status"] == "completed" and after["result"] == {"hello": "still"}
    assert client.get(f"/v1/status/{before['job_id']}").json()["result"] == {"hello": "kept"}


def test_rate_limit_answers_429_with_retry_after_and_the_client_retries(tmp_path):
    limited = start_grid(tmp_path, rate_limit=5, rate_burst=5, stem_cells=1, workers=1)
    try:
        raw = api(limited, limited.api_key)
        codes = [raw.get("/v1/functions").status_code for _ in range(20)]
        assert codes[:5] == [200] * 5 and 429 in codes
        refused = raw.get("/v1/functions")
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert "rate limit" in refused.json()["detail"]
        # the client library waits and retries instead of failing
        client = nanogrid.Client(limited.url, api_key=limited.api_key)
        started = time.monotonic()
        for _ in range(8):
            client.functions()
        assert time.monotonic() - started >= 0.5
        # a key may carry its own, higher limit
        vip, _ = create_key(limited.grid.registry, "vip", rate_limit=1000, rate_burst=100)
        assert all(api(limited, vip).get("/v1/functions").status_code == 200 for _ in range(30))
    finally:
        limited.stop()
