"""One grid per data dir: ``<data_dir>/grid.lock``, held with ``flock`` for as long as the grid runs.

A second grid on the same data dir would take the first one's running jobs for leftovers of a crash
and mark them failed. The kernel drops the lock when the holder exits, ``kill -9`` included, so a
crashed grid never blocks the next start.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from nanogrid_backend.registry.base import RegistryError

LOCK_FILE = "grid.lock"


class DataDirLocked(RegistryError):
    """Another grid runs on this data dir."""


class DataDirLock:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> DataDirLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = holder_pid(self.data_dir)
            raise DataDirLocked(
                f"another grid{f' (pid {holder})' if holder else ''} is running on {self.data_dir}: "
                "stop it first, or give this one its own --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            # closing the descriptor drops the flock; the file stays (unlinking would race)
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.release()


def holder_pid(data_dir: Path) -> int | None:
    """The pid of the grid holding ``data_dir`` (0 if it has not written it yet), or None when none holds it."""
    path = data_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 32).decode(errors="replace").strip()
            return int(text) if text.isdigit() else 0
        return None
    finally:
        os.close(fd)
