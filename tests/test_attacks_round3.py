"""A hostile tenant with its own key, round three: webhooks, the AI budget, rate limits and list caps.

What must never happen, whatever the tenant sends: a webhook that reaches a loopback, private,
link-local or otherwise internal address (in any spelling, at registration or at delivery, by DNS
rebinding or by a redirect); the AI node working for one owner beyond its hourly budget and one
request's cap, however many calls it runs at once or however its answers end; an authenticated
seed route answered without drawing on the caller's rate limit; an upload listing packages,
variables or secrets without bound.
"""

from __future__ import annotations

import io
import json
import queue
import shutil
import socket
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import redis

import nanogrid
from nanogrid_backend.keys import create_key
from nanogrid_backend.models import FAILED, JobRecord
from nanogrid_backend.notify import Notifier
from nanogrid_backend.registry.sqlite import SQLiteRegistry
from nanogrid_backend.worker.ai_gateway import AIGateway, RedisTokenBudget, TokenBudget
from tests.aws_cluster import Redis, free_port
from tests.conftest import require, start_grid
from tests.fake_ollama import FakeOllama

pytestmark = pytest.mark.integration

BUDGET = 600  # AI tokens per owner per hour
REQUEST_CAP = 100  # an answer's tokens at most
FAILING = b"""def handler(event, context):
    raise RuntimeError("fail, so that failure hooks fire")
"""


class Listener:
    """A loopback HTTP server standing in for an internal service (the grid, Redis, instance metadata):
    it records every request it gets, and answers ``status`` with ``location``."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, status: int = 200, location: str = ""
    ) -> None:
        self.received: queue.Queue[dict] = queue.Queue()
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                listener.received.put({"path": self.path, "headers": dict(self.headers)})
                self.send_response(status)
                if location:
                    self.send_header("Location", location)
                self.end_headers()

            do_GET = do_POST  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def node() -> Iterator[FakeOllama]:
    with FakeOllama() as fake:
        yield fake


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory, node: FakeOllama) -> Iterator:
    """A grid with the operator's defaults for webhooks (no internal network allowed), a small AI budget and
    enough slots for eight calls of one owner at once."""
    grid = start_grid(
        tmp_path_factory.mktemp("round3"),
        workers=8,
        owner_max_concurrency=8,
        stem_cells=1,
        kill_grace_s=0.5,
        ai_endpoint=node.url,
        ai_model="tiny",
        ai_tokens_per_hour=BUDGET,
        ai_max_tokens_per_request=REQUEST_CAP,
    )
    yield grid
    grid.stop()


@pytest.fixture()
def listener() -> Iterator[Listener]:
    listener = Listener()
    yield listener
    listener.close()


def new_owner(hostile, **limits: object) -> tuple[str, str]:
    name = "mallory-" + uuid.uuid4().hex[:6]
    key, _ = create_key(hostile.grid.registry, name, **limits)
    return name, key


# ---- webhooks -------------------------------------------------------------------------------------------------

INTERNAL_URLS = [
    "http://[::ffff:169.254.169.254]/latest/meta-data/",
    "http://[::ffff:a9fe:a9fe]/",
    "http://[::ffff:127.0.0.1]/",
    "http://2852039166/",
    "http://0xa9fea9fe/",
    "http://0251.0376.0251.0376/",
    "http://127.1/",
    "http://169.254.169.254/",
    "http://[fe80::1]/",
    "http://localhost:8765/v1/functions",
    "http://127.0.0.1:6379/",
    "http://[::1]/",
    "http://0.0.0.0/",
    "http://[::]/",
    "http://10.0.0.5/",
    "http://172.17.0.1:2375/containers/json",
    "http://192.168.1.1/",
    "http://127.0.0.1./",
    "http://100.64.0.1/",
    "http://[fd00::1]/",
    "http://224.0.0.1/",
    "http://[ff02::1]/",
    "http://240.0.0.1/",
    "http://255.255.255.255/",
    "http://[::a9fe:a9fe]/",
    "http://[64:ff9b::a9fe:a9fe]/",
    "http://[2002:a9fe:a9fe::]/",
    "http://[2001:0:808:808::80ff:fffe]/",  # 6to4 and Teredo (client 127.0.0.1)
    "https://[::ffff:10.0.0.1]:8443/",
]


@pytest.mark.parametrize("url", INTERNAL_URLS)
def test_every_internal_address_spelling_is_refused_at_registration(hostile, url):
    """A hook to any internal address, however spelled, must be refused with a 422 that says why."""
    _, key = new_owner(hostile)
    answer = httpx.post(
        f"{hostile.url}/v1/webhooks",
        headers={"x-api-key": key},
        json={"url": url, "events": ["failure"]},
    )
    assert answer.status_code == 422, answer.text
    assert "public addresses only" in answer.json()["detail"]
    assert httpx.get(f"{hostile.url}/v1/webhooks", headers={"x-api-key": key}).json() == []


def test_a_public_address_is_accepted(hostile):
    _, key = new_owner(hostile)
    answer = httpx.post(
        f"{hostile.url}/v1/webhooks",
        headers={"x-api-key": key},
        json={"url": "https://8.8.8.8/hook", "events": ["failure"]},
    )
    assert answer.status_code == 201, answer.text


def test_hooks_to_internal_addresses_are_refused_again_at_delivery(hostile, listener):
    """Hooks already stored (before this check existed, or whose name resolved elsewhere at registration)
    must send nothing to the loopback listener, in any spelling of its address."""
    owner, key = new_owner(hostile)
    port = listener.port
    spellings = [
        f"127.0.0.1:{port}",
        f"127.1:{port}",
        f"2130706433:{port}",
        f"0x7f000001:{port}",
        f"0177.0.0.1:{port}",
        f"[::ffff:127.0.0.1]:{port}",
        f"[::ffff:7f00:1]:{port}",
        f"localhost:{port}",
        f"[2002:7f00:1::]:{port}",
    ]
    for n, host in enumerate(spellings):
        hostile.grid.registry.put_webhook(
            {
                "hook_id": f"hook-{owner}-{n}",
                "owner": owner,
                "url": f"http://{host}/stolen",
                "secret": "s" * 20,
                "events": ["failure"],
                "function_id": None,
                "threshold": None,
                "created_at": time.time(),
            }
        )
    notifier = hostile.grid.worker.notifier
    failed_before = notifier.stats["failed"]
    with httpx.Client(base_url=f"{hostile.url}/v1", headers={"x-api-key": key}, timeout=60) as http:
        fid = http.post(
            "/upload",
            files={"file": ("failing.py", FAILING)},
            data={"handler": "failing.handler", "function_name": "failing"},
        ).json()["function_id"]
        assert (
            http.post("/run", json={"function_id": fid, "payload": {}}).json()["status"] == "failed"
        )
    deadline = time.monotonic() + 30
    while notifier.stats["failed"] < failed_before + len(spellings) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert notifier.stats["failed"] >= failed_before + len(
        spellings
    )  # every delivery was refused, not sent
    assert listener.received.empty()


def test_dns_rebinding_and_redirects_reach_nothing_new(tmp_path, monkeypatch):
    """A name checked once must be the address connected to: a resolver that answers an allowed address first and
    loopback afterwards, and a receiver that redirects to loopback, must get nothing to 127.0.0.1."""
    forbidden = Listener("127.0.0.1")
    # The operator allows 127.0.0.2 only; the receiver there answers with a redirect to loopback.
    allowed = Listener(
        "127.0.0.2", forbidden.port, status=307, location=f"http://127.0.0.1:{forbidden.port}/x"
    )
    real_getaddrinfo = socket.getaddrinfo
    lookups: list[str] = []

    def rebinding(
        host, port, *args, **kwargs
    ):  # the attacker's DNS: a short TTL and a new answer each time
        if host == "rebind.attacker.example":
            lookups.append(host)
            address = "127.0.0.2" if len(lookups) == 1 else "127.0.0.1"
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    registry = SQLiteRegistry(tmp_path / "registry.sqlite3")
    registry.put_webhook(
        {
            "hook_id": "hook-r",
            "owner": "mallory",
            "secret": "s" * 20,
            "events": ["failure"],
            "url": f"http://rebind.attacker.example:{forbidden.port}/hook",
            "function_id": None,
            "threshold": None,
            "created_at": time.time(),
        }
    )
    notifier = Notifier(registry, allow_networks=["127.0.0.2/32"])
    notifier.start()
    try:
        notifier.job_finished(
            JobRecord("job-r", "fn-x", status=FAILED, owner="mallory", error={"message": "x"})
        )
        delivered = allowed.received.get(timeout=30)
        deadline = time.monotonic() + 10
        while notifier.stats["sent"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        notifier.stop()
        registry.close()
        allowed.close()
        forbidden.close()
    assert (
        delivered["headers"]["Host"] == f"rebind.attacker.example:{forbidden.port}"
    )  # the name, kept
    assert lookups == ["rebind.attacker.example"]  # resolved once, by the check
    assert forbidden.received.empty()  # neither the rebound name nor the redirect reached it


# ---- the AI budget ------------------------------------------------------------------------------------------


def test_eight_concurrent_calls_keep_the_nodes_work_within_the_budget(hostile, node):
    """Eight calls of one owner at once, each asking for a million tokens of a node that would talk for ever:
    the node must work at most the budget plus one request's cap, and every token it did must be charged."""
    _, key = new_owner(hostile)
    nanogrid.connect(hostile.url, api_key=key)
    node.tokens_done, node.answer_words, node.chunk_delay_s = 0, 100_000, 0.002
    node.requests.clear()

    @nanogrid.remote(ai=True, timeout=120)
    def greedy(n):
        import nanogrid.ai

        try:
            chunks = nanogrid.ai.generate(f"talk {n}", options={"num_predict": 10**6}, stream=True)
            return sum(1 for _ in chunks)
        except Exception as exc:
            return str(getattr(exc, "status_code", exc))

    try:
        jobs = [greedy.spawn(n) for n in range(8)]
        answers = [job.result(timeout=120) for job in jobs]
    finally:
        node.answer_words, node.chunk_delay_s = 0, 0.0
    assert "429" in answers  # some calls found the budget reserved or spent
    assert node.tokens_done <= BUDGET + REQUEST_CAP
    assert all(0 < r["options"]["num_predict"] <= REQUEST_CAP for r in node.requests)
    charged = sum(
        (job.ai_usage or {}).get("prompt_tokens", 0)
        + (job.ai_usage or {}).get("completion_tokens", 0)
        for job in jobs
    )
    assert charged >= node.tokens_done


def test_an_answer_too_large_is_charged_and_cannot_be_repeated_for_ever(hostile, node):
    """An answer over the size cap is refused, but the node did the work: it must be charged, so that asking
    again and again ends at the budget."""
    _, key = new_owner(hostile)
    nanogrid.connect(hostile.url, api_key=key)
    node.flood_bytes = 33 << 20

    @nanogrid.remote(ai=True, timeout=120)
    def flood():
        import nanogrid.ai

        statuses = []
        for _ in range(20):
            try:
                list(nanogrid.ai.generate("hello", stream=True))  # a stream is read as it is used
                statuses.append(200)
            except Exception as exc:
                statuses.append(getattr(exc, "status_code", 0))
            if statuses[-1] == 429:
                break
        return statuses

    try:
        job = flood.spawn()
        statuses = job.result(timeout=120)
    finally:
        node.flood_bytes = 0
    assert statuses[-1] == 429 and set(statuses[:-1]) == {
        502
    }  # refused, charged, then out of budget
    assert len(statuses) <= BUDGET // 2  # each one cost something
    assert sum(job.ai_usage[k] for k in ("prompt_tokens", "completion_tokens")) > 0


@pytest.fixture(params=["one worker", "two workers sharing Redis"])
def budgets(request: pytest.FixtureRequest, tmp_path) -> Iterator[list]:
    """The budget each of two gateways draws on: one in-process pool (the embedded grid), or Redis (AWS mode)."""
    if request.param == "one worker":
        shared = TokenBudget(BUDGET)
        yield [shared, shared]
        return
    require(shutil.which("redis-server") is not None, "redis-server is not installed")
    server = Redis(free_port(), tmp_path)
    server.start()
    clients = [redis.Redis(port=server.port) for _ in range(2)]
    try:
        yield [RedisTokenBudget(client, BUDGET) for client in clients]
    finally:
        for client in clients:
            client.close()
        server.stop()


def test_one_owners_requests_on_several_workers_draw_on_one_budget(budgets, node):
    """Sixteen greedy requests, eight at a time, through two workers' gateways: the node must work at most the
    budget plus one request's cap for the owner, whichever worker forwarded them."""
    node.tokens_done, node.answer_words, node.chunk_delay_s = 0, 100_000, 0.001
    gateways = [AIGateway(node.url, "tiny", BUDGET, REQUEST_CAP, budget) for budget in budgets]
    body = json.dumps(
        {"model": "tiny", "prompt": "talk", "options": {"num_predict": 10**6}}
    ).encode()

    def ask(n: int) -> int:
        session = gateways[n % 2].session("mallory")
        header, _ = session.forward(
            {"method": "POST", "path": "/api/generate"}, body, time.monotonic() + 60
        )
        return header["status"]

    try:
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(ask, range(16)))
    finally:
        node.answer_words, node.chunk_delay_s = 0, 0.0
        for gateway in gateways:
            gateway.close()
    assert set(statuses) == {200, 429}
    assert node.tokens_done <= BUDGET + REQUEST_CAP


# ---- rate limits and list caps --------------------------------------------------------------------------------


def test_a_flood_on_the_seed_routes_is_rate_limited(hostile):
    """400 requests on the seed's polling routes with a key limited to one every 5 s, burst 40: the bucket must run
    dry (429 with the seed's body and headers), and it is the same bucket as /v1."""
    _, key = new_owner(hostile, rate_limit=0.2, rate_burst=40)
    paths = [
        "/status/job-nothing",
        "/functions",
        "/logs",
        "/api/status/job-nothing",
        "/api/functions",
        "/api/logs",
    ]
    with httpx.Client(base_url=hostile.url, headers={"x-api-key": key}, timeout=30) as http:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda n: http.get(paths[n % len(paths)]), range(400)))
        after = http.get("/v1/functions")
    refused = [a for a in answers if a.status_code == 429]
    passed = [a for a in answers if a.status_code == 200]
    assert len(refused) + len(passed) == 400 and refused
    assert {a.request.url.path for a in refused} == set(paths)  # every route drew on the bucket
    for answer in refused:
        assert answer.json() == {"error": "Too Many Requests (Token Bucket Exhausted)"}
        assert (
            answer.headers["X-RateLimit-Limit"] == "40"
            and answer.headers["X-RateLimit-Remaining"] == "0"
        )
        assert int(answer.headers["Retry-After"]) >= 1
    assert all(a.headers["X-RateLimit-Limit"] == "40" for a in passed)
    assert after.status_code == 429


def test_a_flood_on_the_dashboard_spends_the_keys_bucket(hostile):
    """A signed-in browser session is the key's: its page loads must draw on the key's bucket too."""
    _, key = new_owner(hostile, rate_limit=0.2, rate_burst=5)
    with httpx.Client(base_url=hostile.url, timeout=30) as http:
        assert http.post("/ui/login", data={"api_key": key}).status_code == 303
        answers = [http.get(path) for path in ["/ui", "/ui/jobs", "/ui/workers"] * 10]
        after = http.get("/v1/functions", headers={"x-api-key": key})
    assert [a.status_code for a in answers[:5]] == [200] * 5
    assert {a.status_code for a in answers[5:]} == {429} and int(
        answers[-1].headers["Retry-After"]
    ) >= 1
    assert after.status_code == 429  # the same bucket as the API


def package(manifest: dict) -> bytes:
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w") as zf:
        zf.writestr(
            "manifest.json", json.dumps({"name": "lists", "handler": "main.handler", **manifest})
        )
        zf.writestr("main.py", "def handler(event, context):\n    return 1\n")
    return data.getvalue()


@pytest.mark.parametrize(
    ("manifest", "what"),
    [
        (
            {
                "environment": {
                    "packages": [f"p{n}==1.0" for n in range(2001)],
                    "system": [],
                    "env": {},
                }
            },
            "2001 packages",
        ),
        (
            {"environment": {"packages": [], "system": [f"lib{n}" for n in range(201)], "env": {}}},
            "201 system packages",
        ),
        ({"env": {f"V{n}": "x" for n in range(501)}}, "501 environment variables"),
        (
            {
                "environment": {
                    "packages": [],
                    "system": [],
                    "env": {f"V{n}": "x" for n in range(501)},
                }
            },
            "501 environment variables",
        ),
        ({"secrets": [f"S{n}" for n in range(201)]}, "201 secrets"),
    ],
)
def test_uploads_listing_too_many_items_are_refused(hostile, manifest, what):
    """A manifest listing thousands of packages, variables or secrets must be refused before anything is stored."""
    _, key = new_owner(hostile)
    answer = httpx.post(
        f"{hostile.url}/v1/upload",
        headers={"x-api-key": key},
        files={"file": ("lists.zip", package(manifest))},
    )
    assert answer.status_code == 422 and what in answer.json()["detail"], answer.text
    assert httpx.get(f"{hostile.url}/v1/functions", headers={"x-api-key": key}).json() == []


def test_seed_uploads_with_too_many_env_vars_are_refused(hostile):
    _, key = new_owner(hostile)
    answer = httpx.post(
        f"{hostile.url}/upload",
        headers={"x-api-key": key},
        files={"file": ("main.py", b"def handler(event, context):\n    return 1\n")},
        data={"envVars": json.dumps({f"V{n}": "x" for n in range(501)})},
    )
    assert answer.status_code == 422 and "501 environment variables" in answer.json()["error"]
