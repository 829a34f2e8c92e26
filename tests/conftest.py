from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import nanogrid
from backend.config import GridConfig
from backend.embedded import EmbeddedGrid


def start_grid(data_dir: Path, **settings: object) -> EmbeddedGrid:
    config = GridConfig.load(data_dir=data_dir, port=0, **settings)
    return EmbeddedGrid(config).start()


@pytest.fixture(scope="session")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedGrid]:
    """One embedded grid for the session (process sandboxes, kill grace kept short)."""
    embedded = start_grid(tmp_path_factory.mktemp("grid"), kill_grace_s=0.5)
    yield embedded
    embedded.stop()


@pytest.fixture()
def client(grid: EmbeddedGrid) -> nanogrid.Client:
    return nanogrid.connect(grid.url)


def require(condition: bool, why: str) -> None:
    """Skip when a tool is missing on a developer's machine; fail in CI (NANOGRID_CI=1), never skip silently."""
    if condition:
        return
    if os.environ.get("NANOGRID_CI"):
        pytest.fail(f"{why}; CI must provide it")
    pytest.skip(why)
