"""Shared fixtures: embedded grids (imported only by the tests that start one), Docker and tmpfs
checks, no leftovers."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import nanogrid

if (
    TYPE_CHECKING
):  # the grid is imported by the tests that start one: a unit test's start-up never pays for it
    import httpx

    from nanogrid_backend.embedded import EmbeddedGrid

ROOT = Path(__file__).resolve().parents[1]


def require(condition: bool, why: str) -> None:
    """Skip when a tool is missing on a developer's machine; fail in CI (NANOGRID_CI=1), never skip silently."""
    if condition:
        return
    if os.environ.get("NANOGRID_CI"):
        pytest.fail(f"{why}; CI must provide it")
    pytest.skip(why)


def uploaded_manifest(request: httpx.Request) -> dict[str, Any] | None:
    """For a stand-in of a grid: the manifest of the package a client uploads (``POST /v1/packages``, the zip as the
    body; or an older client's ``/v1/upload`` form), else None."""
    if request.url.path == "/v1/packages":
        package = request.content
    elif request.url.path == "/v1/upload":
        content = request.content
        package = content[content.index(b"PK\x03\x04") : content.rindex(b"\r\n--")]
    else:
        return None
    with zipfile.ZipFile(io.BytesIO(package)) as zf:
        return json.loads(zf.read("manifest.json"))


LEFTOVER_GRACE_S = (
    30.0  # containers and loop devices are let go of in the background once a grid stops
)


def project_leftovers(roots: list[Path]) -> set[str]:
    """What the grids whose data dirs lie under ``roots`` (this run's temporary directories) left of their
    sandboxes: containers, loop devices and mounts of scratch disks, memory cgroups, sandbox directories. Grids of
    other runs on the same host (another checkout's tests, a benchmark, the user's own grid) are not looked at."""
    from nanogrid_backend.sandbox.leftovers import grid_identity, sandbox_dirs

    homes = {
        path.resolve()
        for root in roots
        for depth in ("", "*/", "*/*/", "*/*/*/")
        for path in root.glob(f"{depth}sandboxes")
    }  # resolved: pytest's "current" links name them twice
    identities = {grid_identity(home) for home in homes}
    under = tuple(str(home.resolve()) + "/" for home in homes)
    found = {f"sandbox directory {path}" for home in homes for path in sandbox_dirs(home)}
    try:
        listed = subprocess.run(
            [
                "docker",
                "ps",
                "-a",
                "--filter",
                "label=nanogrid.grid",
                "--format",
                '{{.Names}} {{.Label "nanogrid.grid"}}',
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        found |= {
            f"container {line.split()[0]}"
            for line in listed.stdout.splitlines()
            if len(line.split()) == 2 and line.split()[1] in identities
        }
    except (OSError, subprocess.SubprocessError):
        pass  # no engine: nothing of ours there
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            path = backing.read_text().strip()
        except OSError:
            continue
        if under and path.startswith(under):
            found.add(f"loop device /dev/{backing.parent.parent.name} on {path}")
    with open("/proc/self/mountinfo") as mounts:
        found |= {
            f"mount {line.split()[4]}"
            for line in mounts
            if under and line.split()[4].startswith(under)
        }
    for parent in (Path("/sys/fs/cgroup/memory/nanogrid"), Path("/sys/fs/cgroup/nanogrid")):
        if parent.is_dir():
            found |= {
                f"memory cgroup {path}"
                for path in parent.iterdir()
                if path.name.split("-")[0] in identities
            }
    return found


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Fails the run when its tests left sandboxes behind: containers, loop devices, mounts, memory cgroups or
    sandbox directories of grids on this run's temporary data dirs that were not there when it began (so what
    existed before is never blamed). No test reaches the user's own data dir (~/.nanogrid) meanwhile: the
    default data dir is a temporary one, looked at like the others."""
    default = tmp_path_factory.mktemp("default-data-dir")
    saved = os.environ.get("NANOGRID_DATA_DIR")
    os.environ["NANOGRID_DATA_DIR"] = str(default)
    roots = [tmp_path_factory.getbasetemp()]
    before = project_leftovers(roots)
    yield
    if saved is None:
        os.environ.pop("NANOGRID_DATA_DIR", None)
    else:
        os.environ["NANOGRID_DATA_DIR"] = saved
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    while (left := project_leftovers(roots) - before) and time.monotonic() < deadline:
        time.sleep(1)
    assert not left, (
        "the tests left these behind (stop every grid and close every sandbox a test starts):\n  "
        + "\n  ".join(sorted(left)[:40])
    )


def start_grid(data_dir: Path, **settings: object) -> EmbeddedGrid:
    from nanogrid_backend.config import GridConfig
    from nanogrid_backend.embedded import EmbeddedGrid

    settings.setdefault("sandbox", "process")
    config = GridConfig.load(data_dir=data_dir, port=0, **settings)
    return EmbeddedGrid(config).start()


@contextlib.contextmanager
def tmpfs(where: Path, size_mib: int) -> Iterator[Path]:
    """A tmpfs of ``size_mib`` MiB mounted at ``where`` (made here) for a grid's data dir, unmounted afterwards:
    a small disk that tests fill on purpose."""
    require(os.geteuid() == 0, "mounting a tmpfs needs root")
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    require(done.returncode == 0, f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def require_docker() -> None:
    """The engine answers and the runtime image exists (built here if missing, as CI does)."""
    try:
        info = subprocess.run(["docker", "info"], capture_output=True).returncode
    except FileNotFoundError:
        info = 1
    require(info == 0, "the Docker engine does not answer")
    build = subprocess.run(
        [sys.executable, str(ROOT / "nanogrid_runtimes" / "build.py")],
        capture_output=True,
        text=True,
    )
    require(
        build.returncode == 0,
        f"nanogrid_runtimes/build.py could not build the runtime image: {build.stderr.strip()}",
    )


@pytest.fixture(scope="session")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedGrid]:
    """One embedded grid with process sandboxes for the session (kill grace kept short)."""
    embedded = start_grid(tmp_path_factory.mktemp("grid"), kill_grace_s=0.5)
    yield embedded
    embedded.stop()


@pytest.fixture(scope="session")
def docker_grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedGrid]:
    """One embedded grid with Docker sandboxes for the session."""
    require_docker()
    embedded = start_grid(
        tmp_path_factory.mktemp("docker-grid"), sandbox="docker", kill_grace_s=0.5
    )
    yield embedded
    embedded.stop()


@pytest.fixture(params=["process", "docker"])
def client(request: pytest.FixtureRequest) -> nanogrid.Client:
    """A client of each kind of grid: tests that take it run against both sandboxes."""
    embedded = request.getfixturevalue("grid" if request.param == "process" else "docker_grid")
    return nanogrid.connect(embedded.url, api_key=embedded.api_key)
