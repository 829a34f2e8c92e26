"""Load tests, from the operator's side (the numbers must add up, progress must show while it runs) and from the
side of someone who would aim it elsewhere: it must refuse any grid that is not on this machine before sending
a single request, and refuse rates, durations and counts over its bounds."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest

from nanogrid.cli import main
from nanogrid.errors import InvalidArgument
from nanogrid_backend.controller import load_runner as loadtest
from nanogrid_backend.keys import create_key

pytestmark = pytest.mark.integration

HANDLER = b"""def handler(event, context):
    if event.get("fail"):
        raise RuntimeError("asked to fail")
    return event
"""


@pytest.fixture()
def owner(grid, monkeypatch):
    key, _ = create_key(grid.grid.registry, "loader-" + uuid.uuid4().hex[:6])
    monkeypatch.setenv("NANOGRID_API_KEY", key)
    with httpx.Client(base_url=f"{grid.url}/v1", headers={"x-api-key": key}, timeout=60) as http:
        name = "load" + uuid.uuid4().hex[:6]
        http.function_id = http.post(
            "/upload",
            files={"file": ("load.py", HANDLER)},  # type: ignore[attr-defined]
            data={"handler": "load.handler", "function_name": name},
        ).json()["function_id"]
        http.function_name = name  # type: ignore[attr-defined]
        yield http


def test_the_cli_makes_every_call_and_summarises_them(owner, grid, capsys):
    code = main(
        [
            "loadtest",
            owner.function_name,
            "--rps",
            "20",
            "--duration",
            "1.5",
            "--json",
            "--url",
            grid.url,
        ]
    )
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert code == 0 and summary["planned"] == summary["sent"] == summary["completed"] == 30
    assert summary["failed"] == 0 and summary["errors"] == {}
    assert 0 < summary["p50_ms"] <= summary["p95_ms"] <= summary["p99_ms"] <= summary["max_ms"]
    assert (
        summary["throughput"] > 0 and "30/30 sent" in err
    )  # the live progress line ends on the final count
    history = owner.get(f"/functions/{owner.function_id}/history", params={"limit": 500}).json()[
        "items"
    ]
    assert len(history) == 30


def test_failures_are_counted_by_reason_and_fail_the_command(owner, grid, capsys):
    code = main(
        [
            "loadtest",
            owner.function_id,
            "--rps",
            "10",
            "--duration",
            "0.5",
            "--payload",
            '{"fail": true}',
            "--url",
            grid.url,
        ]
    )
    out, _ = capsys.readouterr()
    assert code == 1 and "5 failed {'exception': 5}" in out


@pytest.mark.parametrize("url", ["http://192.0.2.1:8765", "http://[2001:db8::1]:8765"])
def test_a_grid_elsewhere_is_refused_before_anything_is_sent(url, capsys, monkeypatch):
    """No request may leave for a non-loopback address: the refusal comes before any client request."""
    monkeypatch.setattr(httpx.Client, "send", lambda *a, **k: pytest.fail("a request was sent"))
    assert main(["loadtest", "anything", "--url", url]) == 1
    assert "loopback" in capsys.readouterr().err


@pytest.mark.parametrize(
    "rps, duration, why",
    [(501, 1, "--rps"), (0, 1, "--rps"), (10, 301, "--duration"), (400, 60, "at most 20000")],
)
def test_rates_durations_and_counts_over_the_bounds_are_refused(rps, duration, why):
    with pytest.raises(InvalidArgument, match=why):
        loadtest.check_bounds(rps, duration)


def test_calls_that_fall_behind_count_from_when_they_were_due():
    """A call that had to wait for a free slot must not look fast: latency counts from its due time."""
    test = loadtest.run(lambda: time.sleep(0.05), rps=100, duration_s=0.3)
    summary = test.summary()
    assert summary["completed"] == 30 and summary["p50_ms"] >= 50


def test_a_load_test_started_through_the_api_reports_progress_and_stays_private(owner, grid):
    started = owner.post(
        "/loadtests",
        json={"function_id": owner.function_id, "rps": 20, "duration_s": 1, "payload": {"x": 1}},
    )
    assert started.status_code == 202, started.text
    test_id = started.json()["loadtest_id"]
    again = owner.post(
        "/loadtests", json={"function_id": owner.function_id, "rps": 1, "duration_s": 1}
    )
    assert again.status_code == 409  # one at a time per owner
    deadline = time.monotonic() + 60
    while (
        not (now := owner.get(f"/loadtests/{test_id}").json())["done"]
        and time.monotonic() < deadline
    ):
        time.sleep(0.2)
    assert (
        now["done"] and now["completed"] == 20 and now["failed"] == 0 and now["p99_ms"] is not None
    )
    key, _ = create_key(grid.grid.registry, "peeker-" + uuid.uuid4().hex[:6])
    with httpx.Client(base_url=f"{grid.url}/v1", headers={"x-api-key": key}) as other:
        assert (
            other.get(f"/loadtests/{test_id}").status_code == 404
            and other.get("/loadtests").json() == []
        )
        assert other.post("/loadtests", json={"function_id": owner.function_id}).status_code == 404
    assert (
        owner.post("/loadtests", json={"function_id": owner.function_id, "rps": 501}).status_code
        == 422
    )
