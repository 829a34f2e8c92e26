"""Faults an operator meets every week, injected into a live grid: nothing stuck, hanging, misreported or left behind.

Covered here: sandboxes that die while idle and while busy (both sandboxes), a full disk (a small tmpfs
holds the data dir), the grid process stopped with SIGSTOP, ``kill -9`` and restart, and a backlog whose
arguments must stay on disk. A registry locked by another process and a second grid on the same data dir
are covered in tests/test_registry_faults.py. How fast the grid recovers is measured by
benchmarks/bench_faults.py, never asserted here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import httpx
import pytest

import nanogrid
from nanogrid_backend.config import GridConfig
from nanogrid_backend.grid import Grid
from nanogrid_backend.models import PENDING, FunctionRecord, JobMessage, JobRecord
from nanogrid_backend.queue.local import LocalQueue
from nanogrid_backend.registry.sqlite import SQLiteRegistry
from nanogrid_backend.sandbox import cgroup, scratch
from nanogrid_backend.sandbox.leftovers import grid_identity
from nanogrid_backend.worker.agent import BATCH_MAX
from tests.conftest import require_docker, start_grid, tmpfs

pytestmark = pytest.mark.integration

MiB = 1 << 20
GUARD_S = 120  # a bound on waiting for a thread, so that a hang fails the test instead of stalling the suite


# --- finding a grid's sandboxes from the outside, as an operator (or the OOM killer) would -------------------


def is_sandbox_process(pid: int) -> bool:
    """Whether ``pid`` is still a sandbox process (one that exits while it is looked at is not)."""
    try:
        return b"NANOGRID_WORK_DIR" in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


def sandbox_pids(data_dir: Path) -> list[int]:
    """Processes of this grid's process sandboxes: their environment names a work dir under its sandbox dir."""
    marker = f"NANOGRID_WORK_DIR={data_dir.resolve() / 'sandboxes'}/".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def containers_of(data_dir: Path) -> list[str]:
    client = docker.from_env()
    label = f"nanogrid.grid={grid_identity(data_dir / 'sandboxes')}"
    return [
        c.name
        for c in client.containers.list(all=True, filters={"label": label}, ignore_removed=True)
    ]


def kill_sandboxes(data_dir: Path, kind: str) -> int:
    """SIGKILL every process sandbox of the grid, or `docker rm -f` every container of it."""
    if kind == "docker":
        client = docker.from_env()
        names = containers_of(data_dir)
        for name in names:
            client.containers.get(name).remove(force=True)
        return len(names)
    pids = sandbox_pids(data_dir)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


def wait_for(condition, what: str, timeout: float = 60.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module", params=["process", "docker"])
def faulty(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict]:
    if request.param == "docker":
        require_docker()
    data_dir = tmp_path_factory.mktemp(f"faults-{request.param}")
    grid = start_grid(
        data_dir, sandbox=request.param, workers=2, pool_cap=4, stem_cells=1, kill_grace_s=0.5
    )
    try:
        yield {
            "grid": grid,
            "data_dir": data_dir,
            "kind": request.param,
            "client": nanogrid.connect(grid.url, api_key=grid.api_key, timeout=30),
        }
    finally:
        grid.stop()


def pool_is_whole(faulty: dict) -> None:
    """No pool place lost: nothing busy once the calls are over, and a call still gets a sandbox."""
    pool = faulty["grid"].grid.pool
    wait_for(lambda: pool.snapshot()["busy"] == 0, "the pool's busy count back to 0")
    assert pool.snapshot()["specialised"] <= pool.cap


# --- sandboxes killed -------------------------------------------------------------------------------------


def test_sandboxes_dead_while_idle_are_replaced(faulty: dict) -> None:
    """Never: a call fails (or is blamed on the function) because its warm sandbox or a stem cell died while idle."""

    @nanogrid.remote(timeout=30)
    def triple(x):
        return 3 * x

    assert triple.remote(1) == 3  # a warm sandbox of `triple` is now idle, next to a stem cell
    wait_for(lambda: faulty["grid"].grid.pool.snapshot()["stem_cells"] >= 1, "a stem cell started")
    assert kill_sandboxes(faulty["data_dir"], faulty["kind"]) >= 2
    assert triple.remote(2) == 6  # the dead warm sandbox was passed over

    @nanogrid.remote(timeout=30)
    def fresh(x):
        return x - 1

    assert kill_sandboxes(faulty["data_dir"], faulty["kind"]) >= 1
    assert fresh.remote(10) == 9  # a cold start on a dead stem cell is started again
    assert list(triple.map(range(8))) == [3 * i for i in range(8)]
    pool_is_whole(faulty)


def test_sandbox_killed_while_busy_fails_only_that_call(faulty: dict) -> None:
    """Never: a job left "running" after its sandbox was killed under it, a lost pool place, a stuck client."""

    @nanogrid.remote(timeout=60)
    def slow(x):
        import time

        time.sleep(30)
        return x

    job = slow.spawn(1)
    wait_for(lambda: job.status == "running", "the job running")
    time.sleep(0.3)  # inside the function's sleep
    assert kill_sandboxes(faulty["data_dir"], faulty["kind"]) >= 1
    with pytest.raises(nanogrid.SandboxCrashed):
        job.result(timeout=GUARD_S)
    assert job.status == "failed"

    @nanogrid.remote(timeout=30)
    def after(x):
        return x + 100

    assert after.remote(1) == 101
    pool_is_whole(faulty)


# --- a full disk ------------------------------------------------------------------------------------------


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 20 MiB tmpfs for the grid's data dir."""
    with tmpfs(tmp_path / "small", 20) as mount:
        yield mount


def test_full_disk_fails_calls_clearly_and_the_grid_recovers(small_disk: Path) -> None:
    """Never: a job left "running" on a full disk, a hung client, a lost pool place, or a grid that stays broken
    once space is freed."""
    grid = start_grid(
        small_disk / "data",
        sandbox="process",
        workers=1,
        stem_cells=1,
        pool_cap=2,
        kill_grace_s=0.5,
    )
    try:
        nanogrid.connect(grid.url, api_key=grid.api_key, timeout=30)

        @nanogrid.remote(timeout=60)
        def write_output(mib):
            import nanogrid

            with open(nanogrid.output_dir() / "big.bin", "wb") as f:
                for _ in range(mib):
                    f.write(b"x" * (1 << 20))
            return mib

        @nanogrid.remote(timeout=60)
        def big_result(mib):
            return b"r" * (mib << 20)

        @nanogrid.remote(timeout=30)
        def small(x):
            return x * 2

        assert small.remote(1) == 2
        for call in (lambda: write_output.remote(40), lambda: big_result.remote(30)):
            with pytest.raises(nanogrid.NanoGridError) as failure:
                call()
            message = str(failure.value).lower()
            assert any(word in message for word in ("space", "full", "store", "disk")), (
                failure.value
            )
        assert small.remote(2) == 4  # the failed calls' files were removed with their sandboxes

        filler = small_disk / "filler"
        with open(filler, "wb") as f:  # an operator's file takes all the space left
            try:
                while True:
                    f.write(b"\0" * MiB)
                    f.flush()
            except OSError:
                pass
        try:
            small.remote(3)
        except (
            nanogrid.NanoGridError
        ) as exc:  # a clear error, or the call still fit: never a hang or an internal error
            assert any(word in str(exc).lower() for word in ("space", "full", "disk")), exc
        filler.unlink()
        assert small.remote(4) == 8
        assert list(small.map(range(5))) == [0, 2, 4, 6, 8]
        counts = grid.grid.registry.count_jobs()
        assert counts.get("running", 0) == 0 and counts.get("pending", 0) == 0, counts
        wait_for(lambda: grid.grid.pool.snapshot()["busy"] == 0, "the pool's busy count back to 0")
    finally:
        grid.stop()


# --- the grid process stopped, killed and restarted -------------------------------------------------------


class GridProcess:
    """`nanogrid up` in a subprocess, as an operator runs it."""

    def __init__(self, data_dir: Path, sandbox: str, workers: int = 1) -> None:
        self.data_dir = data_dir
        (data_dir / "grid.json").unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("NANOGRID_")}
        self.log = open(data_dir.parent / f"{data_dir.name}.log", "ab")  # noqa: SIM115  # closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nanogrid.cli",
                "up",
                "--data-dir",
                str(data_dir),
                "--port",
                "0",
                "--sandbox",
                sandbox,
                "--workers",
                str(workers),
                "--stem-cells",
                "1",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        wait_for(
            lambda: (data_dir / "grid.json").exists() or self.proc.poll() is not None,
            "the grid up",
            120,
        )
        assert self.proc.poll() is None, (data_dir.parent / f"{data_dir.name}.log").read_text()[
            -3000:
        ]
        self.url = json.loads((data_dir / "grid.json").read_text())["url"]
        self.key = (data_dir / "local-key").read_text().strip()

    def connect(self, timeout: float = 30) -> nanogrid.Client:
        return nanogrid.connect(self.url, api_key=self.key, timeout=timeout)

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def test_stopped_grid_gives_unresponsive_not_a_hang(tmp_path: Path) -> None:
    """Never: `.map()`, `.spawn()` or any request hanging on a grid that stopped answering (SIGSTOP), or a grid
    that does not serve again after SIGCONT."""
    grid = GridProcess(tmp_path / "data", "process", workers=2)
    try:
        grid.connect(timeout=3)

        @nanogrid.remote(timeout=60)
        def nap(x):
            import time

            time.sleep(1)
            return x

        assert nap.remote(1) == 1
        outcome: dict[str, BaseException | list] = {}

        def map_through_the_stop() -> None:
            try:
                outcome["map"] = list(nap.map(range(20)))
            except BaseException as exc:  # noqa: BLE001  # handed to the test thread
                outcome["map"] = exc

        mapper = threading.Thread(target=map_through_the_stop, daemon=True)
        mapper.start()
        time.sleep(1.5)  # the map's streams are open and some calls are done
        os.kill(grid.proc.pid, signal.SIGSTOP)
        mapper.join(GUARD_S)
        assert not mapper.is_alive(), ".map() hung on a stopped grid"
        assert isinstance(outcome["map"], nanogrid.GridUnresponsive), outcome["map"]
        with pytest.raises(nanogrid.GridUnresponsive):
            nap.spawn(2)
        with pytest.raises(nanogrid.GridUnresponsive):
            nanogrid.get_client().health()

        os.kill(grid.proc.pid, signal.SIGCONT)
        assert nap.remote(3) == 3
        assert list(nap.map(range(4))) == [0, 1, 2, 3]
    finally:
        grid.stop()


@pytest.mark.parametrize("kind", ["process", "docker"])
def test_kill_9_and_restart_leaves_nothing_behind(kind: str, tmp_path: Path) -> None:
    """Never, after `kill -9` of the grid and a restart: a job left "running", a queued job lost or run with the
    wrong arguments, a container, work dir or memory cgroup of the dead grid left on the host; and never one of
    the new grid's left behind once it is stopped."""
    if kind == "docker":
        require_docker()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    sandbox_dir = data_dir / "sandboxes"
    grid = GridProcess(data_dir, kind, workers=1)
    try:
        client = grid.connect()

        @nanogrid.remote(timeout=60)
        def hold(blob, seconds):
            import time

            time.sleep(seconds)
            return len(blob), blob[:4]

        running = hold.spawn(b"run!" * 10, 30)
        wait_for(lambda: running.status == "running", "the first job running")
        queued = [
            hold.spawn(bytes([i]) * (300 << 10), 0) for i in range(4)
        ]  # wait behind it: one worker slot
        before = {
            "containers": containers_of(data_dir) if kind == "docker" else [],
            "pids": sandbox_pids(data_dir),
            "dirs": sorted(p.name for p in sandbox_dir.iterdir()),
            "cgroups": cgroup.ours(grid_identity(sandbox_dir) + "-"),
            "disks": scratch.mounted_under(sandbox_dir),
        }
        assert before["containers"] or before["pids"]
        assert before["disks"] or kind != "docker" or scratch.unavailable()
        grid.kill()

        doctor = subprocess.run(
            [sys.executable, "-m", "nanogrid.cli", "doctor", "--data-dir", str(data_dir)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert "leftovers" in doctor.stdout, doctor.stdout + doctor.stderr

        grid = GridProcess(data_dir, kind, workers=1)
        client = grid.connect()
        assert client.status(running.job_id)["status"] == "failed"
        assert client.status(running.job_id)["error"]["kind"] == "interrupted"
        for i, job in enumerate(queued):
            job.client = client
            assert job.result(timeout=GUARD_S) == (300 << 10, bytes([i]) * 4)
        left = set(before["containers"]) & set(containers_of(data_dir) if kind == "docker" else [])
        assert not left, f"containers of the killed grid still exist: {left}"
        assert not [p for p in before["pids"] if is_sandbox_process(p)]
        now = {p.name for p in sandbox_dir.iterdir()}
        assert not now & set(before["dirs"]), "work dirs of the killed grid still exist"
        assert not [c for c in before["cgroups"] if c.exists()], (
            "memory cgroups of the killed grid still exist"
        )
        assert not set(before["disks"]) & set(scratch.mounted_under(sandbox_dir)), (
            "its scratch disks still mounted"
        )
        counts = {j["status"] for j in client.jobs(limit=50)}
        assert "running" not in counts and "pending" not in counts
    finally:
        grid.stop()
    assert not (containers_of(data_dir) if kind == "docker" else sandbox_pids(data_dir))
    assert not [p for p in sandbox_dir.iterdir() if p.name.startswith(("proc-", "ctr-"))]
    assert not cgroup.ours(grid_identity(sandbox_dir) + "-")
    assert not scratch.mounted_under(sandbox_dir)


QUICK = b"""def handler(event, context):
    return event["n"]
"""


def test_kill_9_during_batches_loses_no_acknowledged_call(tmp_path: Path) -> None:
    """Never, after `kill -9` while workers run batches of short calls and record them together: a call the grid
    acknowledged missing, left pending or running, answered with another's value, or failed for any reason but
    the interruption; and never more than one batch per slot failed as interrupted (the rest run after restart)."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    grid = GridProcess(data_dir, "process", workers=2)
    try:
        headers = {"x-api-key": grid.key}
        upload = httpx.post(
            f"{grid.url}/v1/upload",
            headers=headers,
            files={"file": ("quick.py", QUICK)},
            data={
                "function_name": "quick",
                "handler": "quick.handler",
                "runtime": "python%d.%d" % sys.version_info[:2],
            },
        ).json()
        function_id = upload["function_id"]
        assert (
            httpx.post(
                f"{grid.url}/v1/run",
                headers=headers,
                json={"function_id": function_id, "payload": {"n": -1}},
            ).json()["result"]
            == -1
        )
        body = {"function_id": function_id, "payloads": [{"n": n} for n in range(4000)]}
        with httpx.stream(
            "POST", f"{grid.url}/v1/map", headers=headers, json=body, timeout=60
        ) as stream:
            lines = stream.iter_lines()
            job_ids = json.loads(next(lines))[
                "job_ids"
            ]  # acknowledged: recorded before this line was sent
            streamed = [
                json.loads(line) for _, line in zip(range(300), lines, strict=False) if line
            ]
            grid.kill()  # while the backlog is being taken in batches
        assert any(view["status"] == "completed" for view in streamed)

        grid = GridProcess(data_dir, "process", workers=2)
        with httpx.Client(base_url=grid.url, headers=headers, timeout=60) as http:
            views = [
                http.get(f"/v1/status/{job_id}", params={"wait": 30}).json() for job_id in job_ids
            ]
    finally:
        grid.stop()
    interrupted = 0
    for n, view in enumerate(views):
        if view["status"] == "completed":
            assert view["result"] == n
        else:
            assert view["status"] == "failed" and view["error"]["kind"] == "interrupted", view
            interrupted += 1
    assert interrupted <= 2 * BATCH_MAX, f"{interrupted} calls failed as interrupted"


def test_doctor_shows_and_cleans_what_a_crashed_grid_left(tmp_path: Path) -> None:
    """Never: `nanogrid doctor --clean` leaving a dead grid's sandboxes behind, or touching a running grid's."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    grid = GridProcess(data_dir, "process")
    try:
        wait_for(lambda: sandbox_pids(data_dir), "the grid's stem cell started")
        running_refused = subprocess.run(
            [
                sys.executable,
                "-m",
                "nanogrid.cli",
                "doctor",
                "--data-dir",
                str(data_dir),
                "--clean",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert running_refused.returncode == 1 and "runs on" in running_refused.stderr, (
            running_refused.stderr
        )
        assert sandbox_pids(data_dir), "the running grid's stem cell was removed"
    finally:
        grid.kill()
    for pid in sandbox_pids(
        data_dir
    ):  # what a crash of the machine's OOM killer could leave: only the dirs
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not sandbox_pids(data_dir), "the sandboxes gone")
    shown = subprocess.run(
        [sys.executable, "-m", "nanogrid.cli", "doctor", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "sandbox directories" in shown.stdout, shown.stdout
    cleaned = subprocess.run(
        [sys.executable, "-m", "nanogrid.cli", "doctor", "--data-dir", str(data_dir), "--clean"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cleaned.returncode == 0, cleaned.stderr
    assert not [
        p for p in (data_dir / "sandboxes").iterdir() if p.name.startswith(("proc-", "ctr-"))
    ]
    assert not cgroup.ours(grid_identity(data_dir / "sandboxes") + "-")


# --- a backlog --------------------------------------------------------------------------------------------


def test_queued_arguments_stay_on_disk(tmp_path: Path) -> None:
    """Never: a backlog's arguments all held in memory (past the queue's budget), or a job run with another's
    arguments when they are read back."""
    registry = SQLiteRegistry(tmp_path / "registry.sqlite3")
    jobs = [
        JobRecord(
            f"job-{i:04d}", "fn", payload_format="pickle", payload=bytes([i % 251]) * (256 << 10)
        )
        for i in range(120)
    ]
    registry.create_jobs(jobs)
    queue = LocalQueue(
        load_payload=lambda job_id: registry.get_job(job_id).payload, memory_budget_bytes=4 * MiB
    )
    queue.put(
        [JobMessage(j.job_id, j.function_id, j.payload_format, j.payload, 30, 128) for j in jobs]
    )
    assert queue.held_bytes() <= 4 * MiB
    for job in jobs:
        message = queue.get(timeout=1)
        assert (
            message is not None and message.job_id == job.job_id and message.payload == job.payload
        )
        queue.ack(message)
    assert queue.held_bytes() == 0 and queue.depth() == 0
    registry.close()


def test_restart_does_not_load_the_backlog(tmp_path: Path) -> None:
    """Never: a restart reading every queued job's arguments into memory at once, or requeueing them out of order."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    registry = SQLiteRegistry(data_dir / "registry.sqlite3")
    registry.put_function(
        FunctionRecord("fn", "fn", "python3.11", "fn.handler", "handler", 128, 30, 0, "3.11")
    )
    registry.create_jobs(
        [
            JobRecord(
                f"job-{i:04d}",
                "fn",
                status=PENDING,
                payload=b"p" * (256 << 10),
                created_at=1000.0 + i,
            )
            for i in range(200)
        ]
    )
    pages = list(registry.pending_jobs(batch=64))
    assert [job.job_id for job in pages] == [f"job-{i:04d}" for i in range(200)]
    assert all(job.payload == b"" for job in pages)
    registry.close()
    grid = Grid(
        GridConfig.load(data_dir=data_dir, port=0, sandbox="process", workers=1, stem_cells=0)
    )
    try:
        grid._recover()  # what start() does first; the worker is not started, so the backlog stays queued
        assert isinstance(grid.queue, LocalQueue)
        assert grid.queue.depth() == 200 and grid.queue.held_bytes() == 0
        message = grid.queue.get(timeout=1)
        assert (
            message is not None
            and message.job_id == "job-0000"
            and message.payload == b"p" * (256 << 10)
        )
    finally:
        grid.stop()
