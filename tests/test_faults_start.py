"""Faults that must never stop a grid from starting, or leave it quietly broken once started.

A data disk filled to 100% (a small tmpfs holds the data dir), a registry larger than the disk's free
space, sandboxes frozen with SIGSTOP or ``docker pause``, a sandbox disk the host has no room for, and an
engine that fails a container's start. What must never happen is said in each test's docstring.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import httpx
import pytest

import nanogrid
import nanogrid.errors
from nanogrid_backend.builds.builder import BuiltEnvironment
from nanogrid_backend.models import COMPLETED, JobRecord
from nanogrid_backend.registry.sqlite import SQLiteRegistry, list_backups
from nanogrid_backend.sandbox import cgroup, leftovers, scratch
from nanogrid_backend.sandbox.base import SandboxError
from nanogrid_backend.sandbox.docker import DockerSandboxFactory
from tests.conftest import require, require_docker, start_grid, tmpfs
from tests.test_faults import GUARD_S, GridProcess, containers_of, sandbox_pids, wait_for

pytestmark = pytest.mark.integration

MiB = 1 << 20


# --- a small data disk, filled on demand --------------------------------------------------------------------


@pytest.fixture()
def data_disk(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB tmpfs for the grid's data dir, unmounted afterwards."""
    with tmpfs(tmp_path / "disk", 48) as mount:
        yield mount


def fill(disk: Path, leave: int = 0) -> Path:
    """An operator's file that takes all the disk's space but ``leave`` bytes."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize > leave:
                room = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize - leave
                f.write(b"\0" * max(4096, min(MiB, room)))
                f.flush()
        except OSError:
            pass
    return filler


def used_grid(data_dir: Path, **settings: object) -> None:
    """A grid that ran twice on ``data_dir`` (so its registry has a backup) and stopped."""
    for _ in range(2):
        start_grid(data_dir, **settings).stop()
    assert list_backups(data_dir / "registry.sqlite3")


class UpProcess:
    """`nanogrid up` as an operator runs it, its output read line by line."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NANOGRID_")}
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
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.output.append(line)
            if match := re.search(pattern, line):
                return match
        raise AssertionError(
            f"`nanogrid up` never said {pattern!r}:\n{''.join(self.output)[-4000:]}"
        )

    def collect(self, seconds: float) -> str:
        """What it says over the next ``seconds``."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.output.append(line)
        return "".join(self.output)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


QUICK = b"""def handler(event, context):
    return event["n"]
"""


def run_quick(url: str, key: str, n: int) -> object:
    """Deploy a one-line handler (no environment to build) and run it once; its result."""
    headers = {"x-api-key": key}
    upload = httpx.post(
        f"{url}/v1/upload",
        headers=headers,
        files={"file": ("quick.py", QUICK)},
        timeout=60,
        data={
            "function_name": "quick",
            "handler": "quick.handler",
            "runtime": "python%d.%d" % sys.version_info[:2],
        },
    )
    assert upload.status_code in (200, 201), upload.text
    ran = httpx.post(
        f"{url}/v1/run",
        headers=headers,
        timeout=60,
        json={"function_id": upload.json()["function_id"], "payload": {"n": n}},
    ).json()
    assert "result" in ran, ran
    return ran["result"]


# --- 1. a grid always starts when its data is intact --------------------------------------------------------


def test_a_full_data_disk_never_stops_the_start(data_disk: Path) -> None:
    """Never: `nanogrid up` refused (or a traceback) because the data disk is 100% full while the registry is
    intact, a grid that says healthy on a full disk, or one that needs a restart once space is freed."""
    data_dir = data_disk / "data"
    used_grid(data_dir)
    backups = list_backups(data_dir / "registry.sqlite3")
    filler = fill(data_disk)
    assert os.statvfs(data_disk).f_bavail == 0

    up = UpProcess(data_dir, "--sandbox", "process", "--stem-cells", "1")
    try:
        url = up.wait_for(r"NanoGrid is up at (\S+)")[1]
        said = up.collect(3)
        assert "Traceback" not in said and "OperationalError" not in said, said
        assert "no backup of the registry was made at this start" in said, said
        assert (
            list_backups(data_dir / "registry.sqlite3") == backups
        )  # nothing was written beside it

        health = httpx.get(f"{url}/v1/health", timeout=10).json()
        assert health["status"] == "degraded", health
        assert any("disk is full" in problem for problem in health["problems"]), health

        filler.unlink()  # the operator frees space: the same grid serves, no restart
        assert run_quick(url, (data_dir / "local-key").read_text().strip(), 42) == 42
        assert httpx.get(f"{url}/v1/health", timeout=10).json()["status"] == "healthy"
        assert "Traceback" not in up.collect(1)
    finally:
        up.stop()


def test_a_registry_larger_than_the_free_space_starts_without_a_backup(data_disk: Path) -> None:
    """Never: a start refused because the start-up backup of a large registry does not fit on the data disk."""
    data_dir = data_disk / "data"
    used_grid(data_dir)
    registry = SQLiteRegistry(data_dir / "registry.sqlite3")
    registry.create_jobs(
        [
            JobRecord(
                f"big-{i}",
                "fn-gone",
                status=COMPLETED,
                result_format="pickle",
                result=os.urandom(MiB),
            )
            for i in range(12)
        ]
    )
    registry.close()
    size = (data_dir / "registry.sqlite3").stat().st_size
    fill(data_disk, leave=size // 2)  # room to run, not to copy the registry
    backups = list_backups(data_dir / "registry.sqlite3")

    grid = start_grid(data_dir, workers=1, stem_cells=1)
    try:
        notes = grid.grid.registry.start_notes
        assert any(
            "no backup of the registry" in note and "too little" in note for note in notes
        ), notes
        assert list_backups(data_dir / "registry.sqlite3") == backups
        assert grid.grid.registry.count_jobs() == {COMPLETED: 12}  # every record is there
    finally:
        grid.stop()


def test_doctor_reports_free_space_against_what_the_grid_needs(data_disk: Path) -> None:
    """Never: `nanogrid doctor` saying all is well on a data disk too full for the grid to run calls, or taking
    the full disk for a damaged registry (and sending the operator to --repair, which would lose its records)."""
    data_dir = data_disk / "data"
    used_grid(data_dir)
    fill(data_disk)
    done = subprocess.run(
        [sys.executable, "-m", "nanogrid.cli", "doctor", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in done.stderr, done.stderr
    assert re.search(
        r"disk .*GiB free on the data disk; the grid needs .*TOO LITTLE", done.stdout
    ), done.stdout
    assert "integrity ok" in done.stdout and "--repair" not in done.stderr, (
        done.stdout,
        done.stderr,
    )


# --- 3. liveness that sees frozen sandboxes ---------------------------------------------------------------

SLEEPY = b"""import time


def handler(event, context):
    time.sleep(event["s"])
    return event["s"]
"""


def deploy(url: str, key: str, name: str, source: bytes, timeout_s: float = 60) -> str:
    upload = httpx.post(
        f"{url}/v1/upload",
        headers={"x-api-key": key},
        files={"file": (f"{name}.py", source)},
        data={
            "function_name": name,
            "handler": f"{name}.handler",
            "timeout": str(timeout_s),
            "runtime": "python%d.%d" % sys.version_info[:2],
        },
        timeout=60,
    )
    assert upload.status_code in (200, 201), upload.text
    return upload.json()["function_id"]


def run(url: str, key: str, function_id: str, payload: dict) -> dict:
    return httpx.post(
        f"{url}/v1/run",
        headers={"x-api-key": key},
        timeout=120,
        json={"function_id": function_id, "payload": payload},
    ).json()


def freeze(data_dir: Path, kind: str, resume: bool = False) -> int:
    """SIGSTOP every process of the grid's process sandboxes, or `docker pause` its containers (``resume``: undo
    it); how many were frozen. As an operator's mistake, a debugger or a stuck host would."""
    if kind == "docker":
        client = docker.from_env()
        count = 0
        for name in containers_of(data_dir):
            try:
                container = client.containers.get(name)
                container.unpause() if resume else container.pause()
                count += 1
            except docker.errors.APIError:
                pass  # removed meanwhile, or already in that state
        return count
    pids = sandbox_pids(data_dir)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT if resume else signal.SIGSTOP)
        except ProcessLookupError:
            pass
    return len(pids)


@pytest.fixture(params=["process", "docker"])
def frozen_grid(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict]:
    if request.param == "docker":
        require_docker()
    data_dir = tmp_path / "data"
    grid = start_grid(
        data_dir, sandbox=request.param, workers=1, stem_cells=1, pool_cap=2, kill_grace_s=0.5
    )
    try:
        yield {
            "grid": grid,
            "data_dir": data_dir,
            "kind": request.param,
            "url": grid.url,
            "key": grid.api_key,
        }
    finally:
        freeze(data_dir, request.param, resume=True)
        grid.stop()


def test_a_frozen_stem_cell_is_passed_over(frozen_grid: dict) -> None:
    """Never: a new function handed a frozen stem cell (SIGSTOP, `docker pause`), which would make it wait out the
    load timeout and fail with 'the function did not load'."""
    data_dir, kind, url, key = (frozen_grid[k] for k in ("data_dir", "kind", "url", "key"))
    assert frozen_grid["grid"].grid.pool.wait_ready()
    assert freeze(data_dir, kind) > 0
    function_id = deploy(url, key, "quick", QUICK)
    reply = run(url, key, function_id, {"n": 7})
    assert reply.get("result") == 7, reply


def test_a_sandbox_frozen_during_a_call_is_the_sandboxs_fault(frozen_grid: dict) -> None:
    """Never: a sandbox frozen while its call runs reported as the user's timeout (or left waiting for it); the
    call fails as kind 'frozen' (SandboxCrashed in the client) and the next call is served."""
    data_dir, kind, url, key = (frozen_grid[k] for k in ("data_dir", "kind", "url", "key"))
    function_id = deploy(url, key, "sleepy", SLEEPY, timeout_s=90)
    assert (
        run(url, key, function_id, {"s": 0})["result"] == 0
    )  # warm: the next call takes this sandbox
    replies: list[dict] = []
    call = threading.Thread(target=lambda: replies.append(run(url, key, function_id, {"s": 60})))
    call.start()
    wait_for(lambda: frozen_grid["grid"].grid.pool.snapshot()["busy"] == 1, "the call running")
    time.sleep(0.5)  # in the function's sleep
    assert freeze(data_dir, kind) > 0
    call.join(GUARD_S)
    assert replies and replies[0]["status"] == "failed", replies
    assert replies[0]["error"]["kind"] == "frozen", replies[0]["error"]
    freeze(data_dir, kind, resume=True)
    assert run(url, key, function_id, {"s": 0})["result"] == 0
    failure = nanogrid.errors.failure_for(
        "frozen", replies[0]["error"]["message"], "job"
    )  # as the client raises it
    assert isinstance(failure, nanogrid.SandboxCrashed) and not isinstance(
        failure, nanogrid.FunctionTimeout
    )


# --- 2. a grid that cannot make sandboxes says so once ------------------------------------------------------


def test_a_grid_without_room_for_sandboxes_says_so_once(tmp_path: Path) -> None:
    """Never: a Docker grid with too little free disk for a sandbox disk (1 GiB reserve + the disk) that says
    healthy, logs a traceback every few seconds, or fails calls with anything but a storage error."""
    require_docker()
    require(os.geteuid() == 0, "mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=600m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    require(done.returncode == 0, f"cannot mount a tmpfs: {done.stderr.strip()}")
    up = UpProcess(mount / "data", "--sandbox", "docker", "--stem-cells", "1", "--workers", "1")
    try:
        url = up.wait_for(r"NanoGrid is up at (\S+)")[1]
        said = up.collect(8)  # several of the old 2 s retries
        assert re.search(
            r"WARNING: +sandboxes cannot start: the worker's disk has \d+ MiB free", said
        ), said
        assert said.count("could not start a stem cell") <= 1 and "Traceback" not in said, said

        health = httpx.get(f"{url}/v1/health", timeout=10).json()
        assert health["status"] == "degraded", health
        assert any("sandboxes cannot start" in problem for problem in health["problems"]), health
        assert not any("MiB free" in problem for problem in health["problems"]), (
            health
        )  # /health takes no key

        key = (mount / "data" / "local-key").read_text().strip()
        reply = run(url, key, deploy(url, key, "quick", QUICK), {"n": 1})
        assert reply["status"] == "failed" and reply["error"]["kind"] == "storage", reply
        assert (
            "disk=" in reply["error"]["message"] and "MiB free" not in reply["error"]["message"]
        ), reply

        env = {**os.environ, "NANOGRID_URL": url, "NANOGRID_API_KEY": key}
        status = subprocess.run(
            [sys.executable, "-m", "nanogrid.cli", "status"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert (
            "degraded" in status.stdout and "problem   sandboxes cannot start" in status.stdout
        ), status
        assert "Traceback" not in up.collect(3)
    finally:
        up.stop()
        subprocess.run(["umount", "-l", str(mount)], check=False)


# --- 5. honest categories ---------------------------------------------------------------------------------

BIG = b"""def handler(event, context):
    return "x" * (event["mib"] << 20)
"""


def test_a_large_result_on_a_full_disk_is_a_storage_failure(data_disk: Path) -> None:
    """Never: a result the host's full disk cannot take reported as an internal error (a bug of the grid's) instead
    of 'storage', or the grid failing the next call once space is back."""
    grid = start_grid(data_disk / "data", workers=1, stem_cells=1)
    try:
        function_id = deploy(grid.url, grid.api_key, "big", BIG)
        assert run(grid.url, grid.api_key, function_id, {"mib": 1})["status"] == "completed"
        filler = fill(data_disk, leave=8 * MiB)
        reply = run(grid.url, grid.api_key, function_id, {"mib": 20})
        assert reply["status"] == "failed" and reply["error"]["kind"] == "storage", reply
        filler.unlink()
        assert run(grid.url, grid.api_key, function_id, {"mib": 1})["status"] == "completed"
    finally:
        grid.stop()


def test_retry_records_are_not_counted_as_failed_jobs(tmp_path: Path) -> None:
    """Never: a call that failed once and then succeeded on its retry counted in /system/status as a failed job."""
    grid = start_grid(
        tmp_path / "data", workers=1, stem_cells=1, bubblewrap="off"
    )  # the marker file is seen
    try:
        client = nanogrid.connect(grid.url, api_key=grid.api_key, timeout=60)
        marker = tmp_path / "tried"

        @nanogrid.remote(retries=1, retry_on=[ValueError], backoff=0.1, timeout=30)
        def flaky(path):
            import os

            if not os.path.exists(path):
                open(path, "w").close()
                raise ValueError("first try fails")
            return "second try"

        assert flaky.remote(str(marker)) == "second try"
        jobs = client.system_status()["jobs"]
        assert jobs.get("failed", 0) == 0 and jobs.get("completed") == 1, jobs
    finally:
        grid.stop()


# --- 4. no leftovers ---------------------------------------------------------------------------------------


def loops_under(directory: Path) -> list[str]:
    """Loop devices whose backing file lies under ``directory``."""
    root = str(directory.resolve()) + "/"
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            if backing.read_text().strip().removesuffix(" (deleted)").startswith(root):
                found.append(backing.parent.parent.name)
        except OSError:
            pass
    return found


def test_a_container_the_engine_cannot_create_leaves_nothing(tmp_path: Path) -> None:
    """Never: a sandbox start that fails inside the engine (its image removed between build and start) leaving its
    scratch disk's loop device, mount, directory or disk room reservation behind."""
    require_docker()
    require(scratch.unavailable() == "", f"no scratch disks here: {scratch.unavailable()}")
    factory = DockerSandboxFactory(
        "nanogrid/runtime-python:latest", tmp_path / "sandboxes", disk_mib=64
    )
    gone = BuiltEnvironment("env-gone", factory.python, image="nanogrid/env:no-such-image-here")
    factory.disk_room.reserve = 0
    factory.disk_room.reserve = scratch.shutil.disk_usage(tmp_path).free - (
        100 << 20
    )  # room for one 64 MiB disk
    for _ in range(3):  # a leaked reservation would refuse the second with 'no room'
        with pytest.raises(SandboxError) as failure:
            factory.start(environment=gone)
        assert failure.value.kind == "crash" and "could not create" in failure.value.message, (
            failure.value
        )
    assert loops_under(tmp_path) == [] and scratch.mounted_under(tmp_path) == []
    assert leftovers.sandbox_dirs(tmp_path / "sandboxes") == []
    factory.start().close()  # its room is still there for a sandbox that can start


def test_older_releases_leftovers_of_this_data_dir_are_swept_and_only_those(tmp_path: Path) -> None:
    """Never: an older release's unlabelled container or `nanogrid/proc-*` cgroup of this data dir left for ever
    (or unlisted by `nanogrid doctor`), nor one of another data dir's removed."""
    require_docker()
    require(cgroup.available(), "no memory cgroups here")
    client = docker.from_env()
    data_dir, other_dir = tmp_path / "data", tmp_path / "other"
    ours_id, theirs_id = (os.urandom(6).hex() for _ in range(2))
    (data_dir / "sandboxes" / f"ctr-{ours_id}").mkdir(parents=True)
    (data_dir / "sandboxes" / f"proc-{ours_id}").mkdir()
    (other_dir / "sandboxes" / f"ctr-{theirs_id}").mkdir(parents=True)
    made = [
        client.containers.create(
            "nanogrid/runtime-python:latest", name=f"nanogrid-ctr-{sandbox_id}"
        )
        for sandbox_id in (ours_id, theirs_id)
    ]
    groups = [cgroup.MemoryCgroup(f"proc-{sandbox_id}") for sandbox_id in (ours_id, theirs_id)]
    try:
        doctor = subprocess.run(
            [sys.executable, "-m", "nanogrid.cli", "doctor", "--data-dir", str(data_dir)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert re.search(
            r"leftovers 1 containers, 2 sandbox directories, 1 memory cgroups", doctor.stdout
        ), doctor

        start_grid(data_dir, workers=1, stem_cells=0).stop()
        names = {
            c.name for c in client.containers.list(all=True, filters={"name": "nanogrid-ctr-"})
        }
        assert f"nanogrid-ctr-{ours_id}" not in names and f"nanogrid-ctr-{theirs_id}" in names
        assert not groups[0].path.exists() and groups[1].path.exists()
    finally:
        for container in made:
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True)
        for group in groups:
            group.remove()
        shutil.rmtree(other_dir)  # the other data dir's evidence, made up for this test


def test_an_upload_cut_off_by_kill_9_leaves_no_partial_file(tmp_path: Path) -> None:
    """Never: the partial file of an upload whose grid was killed kept in blob-spool after the next start (it was
    kept for a day)."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    grid = GridProcess(data_dir, "process")
    sha = "ab" * 32

    def partial_files() -> list[Path]:
        return list(data_dir.rglob("upload-*.part"))  # in blob-spool, next to the store

    def slow_body() -> Iterator[bytes]:
        yield b"x" * MiB
        time.sleep(30)  # the grid is killed meanwhile
        yield b"x"

    def upload() -> None:
        with contextlib.suppress(httpx.HTTPError):
            httpx.put(
                f"{grid.url}/v1/blobs/{sha}",
                content=slow_body(),
                headers={"x-api-key": grid.key},
                timeout=60,
            )

    try:
        threading.Thread(target=upload, daemon=True).start()
        wait_for(partial_files, "the upload's partial file in blob-spool")
        grid.kill()
        assert partial_files()
        grid = GridProcess(data_dir, "process")
        assert partial_files() == []
    finally:
        grid.stop()
