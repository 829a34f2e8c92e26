from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import nanogrid
from nanogrid_backend.config import GridConfig
from nanogrid_backend.embedded import EmbeddedGrid

ROOT = Path(__file__).resolve().parents[1]


def require(condition: bool, why: str) -> None:
    """Skip when a tool is missing on a developer's machine; fail in CI (NANOGRID_CI=1), never skip silently."""
    if condition:
        return
    if os.environ.get("NANOGRID_CI"):
        pytest.fail(f"{why}; CI must provide it")
    pytest.skip(why)


def start_grid(data_dir: Path, **settings: object) -> EmbeddedGrid:
    settings.setdefault("sandbox", "process")
    config = GridConfig.load(data_dir=data_dir, port=0, **settings)
    return EmbeddedGrid(config).start()


def require_docker() -> None:
    """The engine answers and the runtime image exists (built here if missing, as CI does)."""
    try:
        info = subprocess.run(["docker", "info"], capture_output=True).returncode
    except FileNotFoundError:
        info = 1
    require(info == 0, "the Docker engine does not answer")
    build = subprocess.run([sys.executable, str(ROOT / "nanogrid_runtimes" / "build.py")], capture_output=True, text=True)
    require(build.returncode == 0, f"nanogrid_runtimes/build.py could not build the runtime image: {build.stderr.strip()}")


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
    embedded = start_grid(tmp_path_factory.mktemp("docker-grid"), sandbox="docker", kill_grace_s=0.5)
    yield embedded
    embedded.stop()


@pytest.fixture(params=["process", "docker"])
def client(request: pytest.FixtureRequest) -> nanogrid.Client:
    """A client of each kind of grid: tests that take it run against both sandboxes."""
    embedded = request.getfixturevalue("grid" if request.param == "process" else "docker_grid")
    return nanogrid.connect(embedded.url, api_key=embedded.api_key)
