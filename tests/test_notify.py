"""Webhook notifications, from the receiver's side (a loopback HTTP server this test starts) and from a caller's:
a notification must never hold up or fail a call, must be signed so a receiver can refuse forgeries, must be
retried when the receiver stumbles, and must never go to another owner's hook or to an internal address.

The receiver listens on loopback, which hooks may reach only because this module's grid allows it
(``webhook_allow_networks``, an operator's setting); tests/test_attacks_round3.py attacks the default grid."""

from __future__ import annotations

import hashlib
import hmac
import json
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from nanogrid_backend.keys import create_key
from nanogrid_backend.models import COMPLETED, FAILED, JobRecord
from nanogrid_backend.notify import Notifier, WebhookError, check_hook, sign
from nanogrid_backend.registry.sqlite import SQLiteRegistry
from tests.conftest import start_grid

pytestmark = pytest.mark.integration

HANDLER = b"""def handler(event, context):
    if event.get("fail"):
        raise RuntimeError("asked to fail")
    return event.get("value")
"""


class Receiver:
    """A loopback webhook receiver: records every request; ``status`` answers, ``hold`` keeps requests waiting."""

    def __init__(self) -> None:
        self.received: queue.Queue[dict] = queue.Queue()
        self.statuses: list[int] = []  # answered in turn; 200 once empty
        self.hold = threading.Event()
        self.hold.set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.hold.wait(30)
                receiver.received.put({"headers": dict(self.headers), "body": body})
                self.send_response(receiver.statuses.pop(0) if receiver.statuses else 200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def next(self, timeout: float = 20) -> dict:
        return self.received.get(timeout=timeout)

    def close(self) -> None:
        self.hold.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A grid whose operator lets hooks reach loopback, where these tests' receivers listen."""
    embedded = start_grid(
        tmp_path_factory.mktemp("hooks"), webhook_allow_networks=["127.0.0.0/8"], stem_cells=1
    )
    yield embedded
    embedded.stop()


@pytest.fixture()
def owner(grid) -> Iterator[httpx.Client]:
    """A fresh owner (its own key) on this module's grid, with a handler function uploaded."""
    key, _ = create_key(grid.grid.registry, "notified-" + uuid.uuid4().hex[:6])
    with httpx.Client(base_url=f"{grid.url}/v1", headers={"x-api-key": key}, timeout=60) as http:
        function = http.post(
            "/upload",
            files={"file": ("notes.py", HANDLER)},
            data={"handler": "notes.handler", "function_name": "notes"},
        ).json()
        http.headers["x-function-id"] = function[
            "function_id"
        ]  # kept here for the tests' convenience
        yield http


def call(http: httpx.Client, **payload: object) -> dict:
    return http.post(
        "/run", json={"function_id": http.headers["x-function-id"], "payload": payload}
    ).json()


def verify(delivery: dict, secret: str) -> dict:
    """What a receiver does: check the signature over timestamp and body, then read the body."""
    headers, body = delivery["headers"], delivery["body"]
    expected = (
        "sha256="
        + hmac.new(
            secret.encode(), headers["X-NanoGrid-Timestamp"].encode() + b"." + body, hashlib.sha256
        ).hexdigest()
    )
    assert hmac.compare_digest(headers["X-NanoGrid-Signature"], expected)
    return json.loads(body)


def test_a_failure_is_posted_signed_in_slacks_shape(owner, receiver):
    hook = owner.post("/webhooks", json={"url": receiver.url, "events": ["failure"]}).json()
    assert call(owner, value=1)["status"] == "completed"  # no hook for completions: nothing is sent
    failed = call(owner, fail=True)
    body = verify(receiver.next(), hook["secret"])
    assert body["nanogrid"]["event"] == "failure" and body["nanogrid"]["job_id"] == failed["job_id"]
    assert "notes" in body["text"] and "asked to fail" in body["text"]
    assert body["blocks"][0]["text"]["text"] == body["text"]
    assert receiver.received.empty()
    listed = owner.get("/webhooks").json()
    assert [h["hook_id"] for h in listed] == [hook["hook_id"]] and "secret" not in listed[0]


def test_a_forged_body_fails_the_signature(owner, receiver):
    """A receiver checking the signature must be able to refuse a body someone changed on the way."""
    hook = owner.post("/webhooks", json={"url": receiver.url, "events": ["completion"]}).json()
    call(owner, value=2)
    delivery = receiver.next()
    forged = {**delivery, "body": delivery["body"].replace(b'"completed"', b'"failed"')}
    with pytest.raises(AssertionError):
        verify(forged, hook["secret"])
    verify(delivery, hook["secret"])


def test_a_receiver_that_hangs_never_holds_up_calls(owner, receiver):
    """With the receiver holding every request, calls must still finish and answer."""
    owner.post("/webhooks", json={"url": receiver.url, "events": ["completion"]})
    receiver.hold.clear()
    results = [call(owner, value=n) for n in range(3)]
    assert [r["result"] for r in results] == [0, 1, 2] and receiver.received.empty()
    receiver.hold.set()
    assert receiver.next()["headers"]["X-NanoGrid-Event"] == "completion"


def test_a_stumbling_receiver_gets_the_notification_again(owner, receiver):
    receiver.statuses = [503, 500]
    hook = owner.post("/webhooks", json={"url": receiver.url, "events": ["completion"]}).json()
    job = call(owner, value=3)
    attempts = [receiver.next() for _ in range(3)]
    assert [a["headers"]["X-NanoGrid-Attempt"] for a in attempts] == ["1", "2", "3"]
    assert {verify(a, hook["secret"])["nanogrid"]["job_id"] for a in attempts} == {job["job_id"]}


def test_another_owners_calls_never_reach_my_hook(owner, receiver, grid):
    owner.post("/webhooks", json={"url": receiver.url, "events": ["failure", "completion"]})
    key, _ = create_key(grid.grid.registry, "stranger-" + uuid.uuid4().hex[:6])
    with httpx.Client(base_url=f"{grid.url}/v1", headers={"x-api-key": key}, timeout=60) as other:
        fid = other.post(
            "/upload",
            files={"file": ("other.py", HANDLER)},
            data={"handler": "other.handler", "function_name": "other"},
        ).json()["function_id"]
        assert (
            other.post("/run", json={"function_id": fid, "payload": {"fail": True}}).json()[
                "status"
            ]
            == "failed"
        )
        assert other.get("/webhooks").json() == []
        hook_id = owner.get("/webhooks").json()[0]["hook_id"]
        assert other.delete(f"/webhooks/{hook_id}").status_code == 404
    mine = call(owner, value=4)
    assert (
        verify_any(receiver.next())["nanogrid"]["job_id"] == mine["job_id"]
    )  # the first one sent is mine


def verify_any(delivery: dict) -> dict:
    return json.loads(delivery["body"])


def test_a_threshold_hook_fires_once_the_threshold_is_crossed(owner, receiver):
    hook = owner.post(
        "/webhooks",
        json={
            "url": receiver.url,
            "events": ["threshold"],
            "threshold": {"metric": "duration_ms", "above": 0},
        },
    ).json()
    call(owner, value=5)
    body = verify(receiver.next(), hook["secret"])
    assert body["nanogrid"]["event"] == "threshold" and "above 0 ms" in body["nanogrid"]["detail"]


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[fe80::1]/x",
        "ftp://x/",
        "http://user:pass@127.0.0.1/",
    ],
)
def test_hooks_to_metadata_addresses_or_with_credentials_are_refused(owner, url):
    answer = owner.post("/webhooks", json={"url": url, "events": ["failure"]})
    assert answer.status_code == 422, answer.text


def test_threshold_hooks_need_a_threshold():
    with pytest.raises(WebhookError, match="threshold"):
        check_hook("http://8.8.8.8/", ["threshold"], None)
    with pytest.raises(WebhookError, match="events"):
        check_hook("http://8.8.8.8/", ["everything"], None)


def test_the_sender_gives_up_after_its_attempts_and_drops_rather_than_blocks(tmp_path):
    """A receiver that always fails gets a bounded number of attempts; a full queue drops news, never blocks."""
    registry = SQLiteRegistry(tmp_path / "registry.sqlite3")
    registry.put_webhook(
        {
            "hook_id": "hook-1",
            "owner": "alice",
            "url": "http://127.0.0.1:9/x",
            "secret": "s" * 20,
            "events": ["failure"],
            "function_id": None,
            "threshold": None,
            "created_at": time.time(),
        }
    )
    seen: list[httpx.Request] = []
    notifier = Notifier(
        registry,
        transport=httpx.MockTransport(lambda r: seen.append(r) or httpx.Response(500)),
        backoff_s=0.01,
        max_pending=2,
        allow_networks=["127.0.0.0/8"],
    )
    job = JobRecord(
        "job-1", "fn-x", status=FAILED, owner="alice", error={"kind": "timeout", "message": "slow"}
    )
    for _ in range(5):  # no sender thread yet: the queue fills, the rest is dropped at once
        notifier.job_finished(job)
    assert notifier.stats["dropped"] == 3
    notifier.start()
    deadline = time.monotonic() + 20
    while notifier.stats["failed"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    notifier.stop()
    registry.close()
    assert (
        notifier.stats == {"sent": 0, "failed": 2, "dropped": 3} and len(seen) == 8
    )  # 2 jobs x 4 attempts
    body = seen[0].content
    assert seen[0].headers["X-NanoGrid-Signature"] == sign(
        "s" * 20, seen[0].headers["X-NanoGrid-Timestamp"], body
    )
    assert json.loads(body)["nanogrid"]["status"] == FAILED and COMPLETED not in body.decode()


def test_a_hook_added_after_its_owner_had_none_fires_once_the_cache_lapses(tmp_path, monkeypatch):
    """The notifier does not wake its sender for an owner known (within HOOKS_CACHE_S) to have no hooks; what must
    never happen is that this knowledge outlives the cache and a new hook never hears of a call."""
    monkeypatch.setattr("nanogrid_backend.notify.HOOKS_CACHE_S", 0.3)
    registry = SQLiteRegistry(tmp_path / "registry.sqlite3")
    seen: list[httpx.Request] = []
    notifier = Notifier(
        registry,
        transport=httpx.MockTransport(lambda r: seen.append(r) or httpx.Response(200)),
        allow_networks=["127.0.0.0/8"],
    )
    notifier.start()
    job = JobRecord("job-1", "fn-x", status=COMPLETED, owner="bob")
    try:
        notifier.job_finished(job)  # bob has no hooks: the sender learns so
        deadline = time.monotonic() + 10
        while "bob" not in notifier._hooks and time.monotonic() < deadline:
            time.sleep(0.01)
        registry.put_webhook(
            {
                "hook_id": "hook-1",
                "owner": "bob",
                "url": "http://127.0.0.1:9/x",
                "secret": "s" * 20,
                "events": ["completion"],
                "function_id": None,
                "threshold": None,
                "created_at": time.time(),
            }
        )
        time.sleep(0.4)  # the cache has lapsed
        notifier.job_finished(job)
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(seen) == 1 and json.loads(seen[0].content)["nanogrid"]["status"] == COMPLETED
    finally:
        notifier.stop()
        registry.close()
