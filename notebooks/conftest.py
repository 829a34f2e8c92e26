"""nbval runs the tutorials against a grid started here, before any notebook kernel starts.

The kernels inherit NANOGRID_URL from this process, so `nanogrid.connect()` in a notebook finds it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from nanogrid_backend.config import GridConfig
from nanogrid_backend.embedded import EmbeddedGrid
from tests.fake_ollama import FakeOllama

# The AI tutorial runs against a server speaking the Ollama API; set NANOGRID_TUTORIAL_AI_ENDPOINT
# (and NANOGRID_TUTORIAL_AI_MODEL) to run it against a real Ollama instead.
_ollama = None
if not os.environ.get("NANOGRID_TUTORIAL_AI_ENDPOINT"):
    _ollama = FakeOllama().__enter__()
_data_dir = tempfile.TemporaryDirectory(prefix="nanogrid-notebooks-")
_grid = EmbeddedGrid(
    GridConfig.load(
        data_dir=Path(_data_dir.name),
        port=0,
        kill_grace_s=0.5,
        sandbox="process",  # the AI node is reachable from process sandboxes; Docker ones have no network
        ai_endpoint=os.environ.get("NANOGRID_TUTORIAL_AI_ENDPOINT") or _ollama.url,
        ai_model=os.environ.get("NANOGRID_TUTORIAL_AI_MODEL") or "summarizer",
    )
).start()
os.environ["NANOGRID_URL"] = _grid.url
os.environ["NANOGRID_API_KEY"] = _grid.api_key

# Notebooks about the Docker sandbox get a grid of their own with Docker sandboxes, started when the first
# of them runs. Its built environments are kept between runs (ENV_CACHE), so a second run builds nothing.
DOCKER_NOTEBOOKS = {"packages-and-environments.ipynb", "data-science.ipynb"}
ENV_CACHE = Path.home() / ".cache" / "nanogrid" / "notebook-environments"
_docker_grid_started: EmbeddedGrid | None = None
_docker_data_dir: tempfile.TemporaryDirectory | None = None


def _docker_grid() -> EmbeddedGrid:
    global _docker_grid_started, _docker_data_dir
    if _docker_grid_started is None:
        from tests.conftest import require_docker

        require_docker()
        _docker_data_dir = tempfile.TemporaryDirectory(prefix="nanogrid-notebooks-docker-")
        ENV_CACHE.mkdir(mode=0o700, parents=True, exist_ok=True)
        (Path(_docker_data_dir.name) / "envs").symlink_to(ENV_CACHE)
        _docker_grid_started = EmbeddedGrid(
            GridConfig.load(
                data_dir=Path(_docker_data_dir.name), port=0, kill_grace_s=0.5, sandbox="docker"
            )
        ).start()
    return _docker_grid_started


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before a notebook's kernel starts (with its first cell), point NANOGRID_URL at the grid it is written for."""
    grid = _docker_grid() if Path(str(item.fspath)).name in DOCKER_NOTEBOOKS else _grid
    os.environ["NANOGRID_URL"] = grid.url
    os.environ["NANOGRID_API_KEY"] = grid.api_key


def pytest_sessionfinish(session, exitstatus):
    _grid.stop()
    _data_dir.cleanup()
    if _docker_grid_started is not None and _docker_data_dir is not None:
        _docker_grid_started.stop()
        _docker_data_dir.cleanup()  # the link to ENV_CACHE goes, the environments stay
    if _ollama is not None:
        _ollama.__exit__()
