"""Calls nobody waits for: the client of a `.map()` or of a sync `.remote()` is killed (a kernel restart, kill -9).

Never: its calls still queued running for nobody after it is gone; a `.spawn()`ed call cancelled with them (a spawned
call is meant to outlive its client); a call that was already running cut short.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import nanogrid
from tests.conftest import ROOT, start_grid

CLIENT = textwrap.dedent("""
    import sys, time
    import nanogrid

    nanogrid.connect()

    @nanogrid.remote(name="nap", timeout=60)
    def nap(seconds, tag):
        import time
        time.sleep(seconds)
        return tag

    kept = [nap.spawn(0.05 if sys.argv[1] == "map" else 1.0, f"spawned-{n}") for n in range(3)]
    print("spawned", flush=True)
    if sys.argv[1] == "map":
        for done, tag in enumerate(nap.map([0.05] * 300, [f"map-{n}" for n in range(300)], progress=False)):
            if done == 5:
                print("mapping", flush=True)
    else:
        print("waiting", flush=True)
        nap.remote(0.05, "remote")  # queued behind the spawned calls' slot until the client is killed
""")


@pytest.fixture
def grid(tmp_path: Path):
    embedded = start_grid(tmp_path / "grid", workers=1, kill_grace_s=0.5)
    yield embedded
    embedded.stop()


def _killed_client(grid, tmp_path: Path, mode: str, when: str) -> None:
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    env = {
        **os.environ,
        "NANOGRID_URL": grid.url,
        "NANOGRID_API_KEY": grid.api_key,
        "PYTHONPATH": str(ROOT),
    }
    client = subprocess.Popen(
        [sys.executable, str(script), mode], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        for line in client.stdout:  # type: ignore[union-attr]
            if line.strip() == when:
                break
        else:
            raise AssertionError(f"the client ended before {when!r}: {client.wait()}")
        if mode == "remote":  # its call is on the grid, queued behind the spawned ones
            watcher = nanogrid.connect(grid.url, api_key=grid.api_key)
            deadline = time.monotonic() + 30
            while len([v for v in watcher.jobs(limit=100) if v["function_name"] == "nap"]) < 4:
                assert time.monotonic() < deadline, "the client's sync call never reached the grid"
                time.sleep(0.05)
            time.sleep(
                0.6
            )  # past the call's first wait for its result: it now follows the job's live output
        client.send_signal(signal.SIGKILL)
    finally:
        client.kill()
        client.wait()


def _settled(client: nanogrid.Client, count: int) -> list[dict]:
    deadline = time.monotonic() + 60
    while True:
        views = [v for v in client.jobs(limit=1000) if v["function_name"] == "nap"]
        if len(views) >= count and all(v["status"] not in ("pending", "running") for v in views):
            return views
        assert time.monotonic() < deadline, (
            "calls still queued or running a minute after their client died"
        )
        time.sleep(0.2)


@pytest.mark.integration
def test_a_killed_map_client_leaves_no_queued_calls_behind(grid, tmp_path):
    _killed_client(grid, tmp_path, "map", "mapping")
    client = nanogrid.connect(grid.url, api_key=grid.api_key)
    views = _settled(
        client, 103
    )  # the map sends its calls in chunks: at least a hundred were queued
    by_status: dict[str, int] = {}
    for v in views:
        by_status[v["status"]] = by_status.get(v["status"], 0) + 1
    spawned = [
        v for v in views if v["job_id"] and v["status"] == "completed" and v.get("started_at")
    ]
    assert by_status.get("failed", 0) == 0, by_status
    assert by_status.get("cancelled", 0) >= 90, f"queued calls ran for nobody: {by_status}"
    for v in views:
        if v["status"] == "cancelled":
            assert v["error"]["kind"] == "cancelled" and not v.get("execution_time_ms"), v
    assert len(spawned) >= 3  # the spawned calls (and the map's calls that had run) completed


@pytest.mark.integration
def test_a_killed_sync_remote_client_leaves_no_queued_call_behind_but_its_spawns_run(
    grid, tmp_path
):
    _killed_client(grid, tmp_path, "remote", "waiting")
    client = nanogrid.connect(grid.url, api_key=grid.api_key)
    views = _settled(client, 4)
    results = sorted(v["status"] for v in views)
    assert results == ["cancelled", "completed", "completed", "completed"], results
