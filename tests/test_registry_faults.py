"""Registry faults an operator meets, against a live embedded grid and the real `nanogrid` command.

A registry locked by another process, damaged or lost registry files, a second grid on the same data dir:
nothing may be lost, stuck "running", or reported as a traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from nanogrid_backend.registry.sqlite import list_backups
from tests.conftest import start_grid
from tests.test_registry import LockHolder, damage_pages

pytestmark = pytest.mark.integration

SLOW = b"""import time


def handler(event, context):
    time.sleep(event["seconds"])
    return {"slept": event["seconds"]}
"""


def nanogrid(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOGRID_")}
    return subprocess.run(
        [sys.executable, "-m", "nanogrid.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def refused_in_one_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, (
        result.stderr
    )
    return result.stderr


def connect(url: str, key: str, timeout: float = 60) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=timeout, headers={"x-api-key": key})


def upload(http: httpx.Client) -> str:
    response = http.post(
        "/v1/upload",
        files={"file": ("slow.py", SLOW)},
        data={"function_name": "slow", "runtime": "python3.11", "handler": "slow.handler"},
    )
    assert response.status_code in (200, 201), response.text
    return response.json()["function_id"]


def submit(http: httpx.Client, function_id: str, seconds: float) -> str:
    response = http.post(
        "/v1/run",
        json={"function_id": function_id, "payload": {"seconds": seconds}},
        headers={"X-Async": "true"},
    )
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def wait_until_running(http: httpx.Client, job_id: str) -> None:
    deadline = time.monotonic() + 30
    while (
        http.get(f"/v1/status/{job_id}").json()["status"] == "pending"
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)


def used_data_dir(data_dir: Path, starts: int = 2) -> list[str]:
    """A data dir as a grid leaves it after ``starts`` runs (one finished job each); returns the job ids."""
    jobs = []
    for _ in range(starts):
        grid = start_grid(data_dir, stem_cells=1, workers=1)
        try:
            http = connect(grid.url, grid.api_key)
            job_id = submit(http, upload(http), 0)
            assert (
                http.get(f"/v1/status/{job_id}", params={"wait": 30}).json()["status"]
                == "completed"
            )
            jobs.append(job_id)
        finally:
            grid.stop()
    return jobs


def test_a_registry_locked_for_8_s_by_another_process_only_delays_submissions(tmp_path: Path):
    """Issue 17's fault: an operator's sqlite3 shell holding the write lock for 8 s left the grid's connection inside a
    transaction, and every later submission answered 500 for good. Submissions must wait, none may be lost, a job
    finishing meanwhile must still be recorded, and the grid must answer as soon as the lock is gone."""
    grid = start_grid(tmp_path, stem_cells=1, workers=2)
    try:
        http = connect(grid.url, grid.api_key)
        function_id = upload(http)
        across = submit(http, function_id, 1)  # finishes while the lock is held
        wait_until_running(http, across)

        holder = LockHolder(tmp_path / "registry.sqlite3", end="ROLLBACK")
        during: list[str] = []

        def submit_one(seconds: float) -> None:
            with connect(grid.url, grid.api_key) as own:
                during.append(submit(own, function_id, seconds))

        submitters = [threading.Thread(target=submit_one, args=(0.1 * n,)) for n in range(4)]
        for thread in submitters:
            thread.start()
        time.sleep(1)
        with connect(grid.url, grid.api_key, timeout=5) as quick:
            # the event loop never waits on the lock: a submission waits on a thread
            assert quick.get("/health").status_code == 200
        time.sleep(7)
        holder.release()
        for thread in submitters:
            thread.join(60)
        assert len(during) == 4, (
            "every submission made during the lock is accepted once the lock is gone"
        )

        with connect(
            grid.url, grid.api_key, timeout=5
        ) as quick:  # answers again within 5 s of the release
            answer = quick.post(
                "/v1/run", json={"function_id": function_id, "payload": {"seconds": 0}}
            )
        assert answer.status_code == 200 and answer.json()["result"] == {"slept": 0}

        for job_id in [across, *during]:
            view = http.get(f"/v1/status/{job_id}", params={"wait": 30}).json()
            assert view["status"] == "completed", view
        counts = http.get("/v1/system/status").json()["jobs"]
        assert counts == {"completed": 6}, "nothing lost, nothing left pending or running"
    finally:
        grid.stop()


@pytest.mark.parametrize("damage", ["pages", "header"])
def test_a_damaged_registry_stops_the_start_in_one_line_and_doctor_repairs_it(
    tmp_path: Path, damage: str
):
    """Corrupted pages used to give bare 500s with no warning, a truncated header a traceback at `nanogrid up`.
    The start must refuse with the way out, and `doctor --repair` must bring back the last start's state."""
    jobs = used_data_dir(tmp_path)
    registry = tmp_path / "registry.sqlite3"
    if damage == "pages":
        damage_pages(registry)
    else:
        os.truncate(registry, 10)

    refused = refused_in_one_line(
        nanogrid("up", "--data-dir", str(tmp_path), "--port", "0", "--sandbox", "process")
    )
    assert "is damaged" in refused and f"nanogrid doctor --data-dir {tmp_path} --repair" in refused

    looked = nanogrid("doctor", "--data-dir", str(tmp_path))
    assert (
        looked.returncode == 1 and "DAMAGED" in looked.stdout and "ok, 1 jobs" in looked.stdout
    ), looked.stdout

    repaired = nanogrid("doctor", "--data-dir", str(tmp_path), "--repair")
    assert repaired.returncode == 0, repaired.stderr
    assert (
        "moved the damaged registry aside" in repaired.stdout and "integrity ok" in repaired.stdout
    )

    grid = start_grid(tmp_path, stem_cells=1, workers=1)
    try:
        http = connect(grid.url, grid.api_key)
        assert (
            http.get(f"/v1/status/{jobs[0]}").json()["status"] == "completed"
        )  # in the backup made at the 2nd start
        assert (
            http.get(f"/v1/status/{jobs[1]}").status_code == 404
        )  # recorded after that backup: lost, as doctor said
        assert submit(http, upload(http), 0)
    finally:
        grid.stop()


@pytest.mark.parametrize("state", ["empty", "missing"])
def test_a_lost_registry_is_never_silently_a_new_empty_grid(tmp_path: Path, state: str):
    """A 0-byte registry used to become a new, empty grid: keys, functions and jobs gone without a word."""
    used_data_dir(tmp_path, starts=1)
    registry = tmp_path / "registry.sqlite3"
    for file in tmp_path.glob("registry.sqlite3*"):
        if file != registry or state == "missing":
            file.unlink()
    if state == "empty":
        registry.write_bytes(b"")

    refused = refused_in_one_line(
        nanogrid("up", "--data-dir", str(tmp_path), "--port", "0", "--sandbox", "process")
    )
    assert "nanogrid doctor" in refused and "move the data dir aside" in refused
    assert (registry.stat().st_size == 0) if state == "empty" else not registry.exists()


def test_a_second_grid_on_the_same_data_dir_is_refused_and_the_first_keeps_its_jobs(tmp_path: Path):
    """A second grid used to mark the first one's running jobs failed and throw their results away."""
    grid = start_grid(tmp_path, stem_cells=1, workers=1)
    try:
        http = connect(grid.url, grid.api_key)
        job_id = submit(http, upload(http), 2)
        wait_until_running(http, job_id)
        backups = list_backups(tmp_path / "registry.sqlite3")

        refused = refused_in_one_line(
            nanogrid("up", "--data-dir", str(tmp_path), "--port", "0", "--sandbox", "process")
        )
        assert f"another grid (pid {os.getpid()}) is running on {tmp_path}" in refused

        view = http.get(f"/v1/status/{job_id}", params={"wait": 30}).json()
        assert view["status"] == "completed" and view["result"] == {"slept": 2}
        assert (
            list_backups(tmp_path / "registry.sqlite3") == backups
        )  # the refused start touched nothing

        looked = nanogrid("doctor", "--data-dir", str(tmp_path))
        assert looked.returncode == 0 and f"running, pid {os.getpid()}" in looked.stdout
        refused_repair = refused_in_one_line(
            nanogrid("doctor", "--data-dir", str(tmp_path), "--repair")
        )
        assert "stop it before --repair" in refused_repair
    finally:
        grid.stop()
