"""Running the embedded grid: controller and worker in one process, in the foreground or a thread."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import uvicorn

from nanogrid_backend.config import GridConfig
from nanogrid_backend.controller.app import create_app
from nanogrid_backend.grid import Grid
from nanogrid_backend.store.blobs import blobs_of


def _server(grid: Grid) -> uvicorn.Server:
    app = create_app(grid)
    return uvicorn.Server(
        uvicorn.Config(app, http=_protocol(), log_level="warning", access_log=False, lifespan="on")
    )


def _protocol() -> type | str:
    """uvicorn's httptools protocol with each answer's head sent with its body (http_protocol.py), where
    httptools is installed (``uvicorn[standard]``); else uvicorn's own choice."""
    try:
        from nanogrid_backend.controller.http_protocol import HttpProtocol
    except ImportError:
        return "auto"
    return HttpProtocol


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(
            f"cannot listen on {host}:{port} ({exc.strerror}); choose another with --port"
        ) from None
    return sock


def write_grid_file(data_dir: Path, url: str) -> Path:
    """Tell clients on this machine where the grid is (``nanogrid.connect()`` reads it)."""
    path = data_dir / "grid.json"
    written = path.with_name(f".grid.json.{os.getpid()}")
    written.write_text(json.dumps({"url": url}))
    written.replace(path)  # whole or not at all: a client reading it now never sees it half-written
    return path


class EmbeddedGrid:
    """A grid on a background thread, for demos, tests and benchmarks: ``with EmbeddedGrid(cfg) as g: g.url``."""

    def __init__(self, config: GridConfig) -> None:
        self.config = config
        self.grid = Grid(config)
        # made now: it removes what uploads cut off by a crash left in its spool
        blobs_of(self.grid)
        self.server = _server(self.grid)
        self._sock = _bind(config.host, config.port)
        self.url = "http://%s:%d" % self._sock.getsockname()[:2]
        self.api_key = self.grid.api_key
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def start(self, wait_for_stem_cells: bool = True) -> EmbeddedGrid:
        self._thread.start()
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the embedded grid failed to start; see the log above")
            self._thread.join(0.01)
        if wait_for_stem_cells and self.grid.pool is not None:
            self.grid.pool.wait_ready()
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=15)
        self._sock.close()

    def __enter__(self) -> EmbeddedGrid:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(
    config: GridConfig, on_ready: Callable[[str, Grid], None] | None = None, role: str = "all"
) -> None:
    """Run the grid, or only its controller, in the foreground until interrupted."""
    grid = Grid(config, role)
    blobs_of(grid)  # made now: it removes what uploads cut off by a crash left in its spool
    server = _server(grid)
    sock = _bind(config.host, config.port)
    url = "http://%s:%d" % sock.getsockname()[:2]

    original_startup = server.startup

    async def startup(sockets: list[socket.socket] | None = None) -> None:
        await original_startup(sockets=sockets)
        if on_ready is not None:
            on_ready(url, grid)

    server.startup = startup  # type: ignore[method-assign]
    server.run(sockets=[sock])
