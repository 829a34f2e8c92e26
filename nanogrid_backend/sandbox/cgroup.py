"""A memory cgroup per sandbox: a hard limit, and the per-call peak read straight from the kernel.

Ours are ``nanogrid/<grid identity>-<sandbox id>``, so a grid can find and remove the ones a crash left
(``sweep``) without touching another grid's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

V1_ROOT = Path("/sys/fs/cgroup/memory")
V2_ROOT = Path("/sys/fs/cgroup")
V1_FREEZER = Path("/sys/fs/cgroup/freezer")


def available() -> bool:
    """True where this process may create memory cgroups (root on cgroup v1, or a delegated v2 tree)."""
    if (V1_ROOT / "memory.limit_in_bytes").exists():
        return os.access(V1_ROOT, os.W_OK)
    if (V2_ROOT / "cgroup.controllers").exists():
        return (
            os.access(V2_ROOT, os.W_OK)
            and "memory" in (V2_ROOT / "cgroup.subtree_control").read_text()
        )
    return False


class MemoryCgroup:
    """cgroup v1 (``memory.max_usage_in_bytes``) or v2 (``memory.peak``), files kept open for cheap reads."""

    def __init__(self, name: str) -> None:
        """A new cgroup of ours, ``nanogrid/<name>``, removed again by ``remove()``."""
        self.v1 = (V1_ROOT / "memory.limit_in_bytes").exists()
        self.path = (V1_ROOT if self.v1 else V2_ROOT) / "nanogrid" / name
        self.path.mkdir(parents=True, exist_ok=True)
        self.owned = True
        self._open_peak()

    @classmethod
    def of_container(cls, container_id: str) -> MemoryCgroup | None:
        """The memory cgroup Docker made for a container, if this process can read it."""
        self = cls.__new__(cls)
        self.v1 = (V1_ROOT / "memory.limit_in_bytes").exists()
        for path in _container_dirs(V1_ROOT if self.v1 else V2_ROOT, container_id):
            if path.is_dir():
                self.path, self.owned = path, False
                try:
                    self._open_peak()
                except OSError:
                    return None
                return self
        return None

    def _open_peak(self) -> None:
        peak = "memory.max_usage_in_bytes" if self.v1 else "memory.peak"
        self._peak_fd = os.open(self.path / peak, os.O_RDWR)
        self._usage_fd = os.open(
            self.path / ("memory.usage_in_bytes" if self.v1 else "memory.current"), os.O_RDONLY
        )

    @property
    def procs_file(self) -> Path:
        return self.path / "cgroup.procs"

    def set_limit(self, limit_bytes: int) -> None:
        """The sandbox's memory, swap included (none beyond it), as ``docker update --memory --memory-swap`` sets
        it, without a round trip to the engine. OSError (EBUSY on v1) when its processes already hold more."""
        if not self.v1:
            (self.path / "memory.max").write_text(str(limit_bytes))
            (self.path / "memory.swap.max").write_text("0")
            return
        memory, memsw = (
            self.path / "memory.limit_in_bytes",
            self.path / "memory.memsw.limit_in_bytes",
        )
        order = [memory, memsw] if memsw.exists() else [memory]  # memsw: where swap is accounted
        if len(order) == 2 and limit_bytes > int(memory.read_text()):
            order.reverse()  # v1 keeps memory <= memory + swap: the sum goes up first and down last
        for name in order:
            name.write_text(str(limit_bytes))

    def reset_peak(self) -> None:
        # v1: resets to the current usage (not zero); v2 (Linux 6.12+): any write resets.
        try:
            os.pwrite(self._peak_fd, b"0", 0)
        except OSError:
            pass

    def peak(self) -> int | None:
        """None once the cgroup is gone (its sandbox was killed)."""
        try:
            return int(os.pread(self._peak_fd, 32, 0))
        except OSError:
            return None

    def usage(self) -> int | None:
        try:
            return int(os.pread(self._usage_fd, 32, 0))
        except OSError:
            return None

    def oom_killed(self) -> bool:
        """True once the kernel's OOM killer has killed a process of this sandbox."""
        name = "memory.oom_control" if self.v1 else "memory.events"
        counters = dict(line.split() for line in (self.path / name).read_text().splitlines())
        return int(counters.get("oom_kill", 0)) > 0

    def remove(self) -> None:
        os.close(self._peak_fd)
        os.close(self._usage_fd)
        if self.owned:
            try:
                self.path.rmdir()
            except OSError:
                pass


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants now (the kernel's ``children`` lists): a sandbox's launchers and bootstrap."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        try:
            queue += [
                int(child)
                for child in Path(f"/proc/{current}/task/{current}/children").read_text().split()
            ]
        except (OSError, ValueError):
            pass
    return found


STOPPED = {b"T", b"t"}  # SIGSTOP, a debugger: it cannot answer until someone resumes it
DEAD = {b"Z", b"X", b"gone"}  # killed (a zombie until reaped) or reaped


class Watch:
    """The kernel's view of a sandbox's launcher and bootstrap processes, and of its container's freezer, read
    through files opened once (a sandbox is looked at twice a call: a ``pread`` costs about 1 µs, opening
    ``/proc/<pid>/stat`` by name 8). An open ``/proc/<pid>/stat`` stays bound to its process: once that is
    reaped, reading it fails (``gone``); it never answers for a later process given the same pid."""

    def __init__(self, pids: list[int], container_id: str | None = None) -> None:
        # A closed descriptor's number may be given to another file at once: never read one after close.
        self._lock = threading.Lock()
        self._stats = [_open(f"/proc/{pid}/stat") for pid in pids]
        self._freezer: int | None = None
        self._freezer_v1 = V1_FREEZER.is_dir()
        if container_id is not None:
            root, name = (
                (V1_FREEZER, "freezer.state") if self._freezer_v1 else (V2_ROOT, "cgroup.events")
            )
            for path in _container_dirs(root, container_id):
                self._freezer = _open(str(path / name))
                if self._freezer is not None:
                    break

    def states(self) -> set[bytes]:
        """The processes' states (``R``, ``S``, ``T``, ``Z``...); ``b"gone"`` for one that no longer exists."""
        found = set()
        with self._lock:
            for fd in self._stats:
                try:
                    if fd is None:  # it was gone before it could be opened
                        raise FileNotFoundError
                    found.add(os.pread(fd, 1024, 0).rsplit(b")", 1)[1].split()[0])
                except (OSError, IndexError):
                    found.add(b"gone")
        return found

    def stopped(self) -> bool:
        """True when one of the processes is stopped (SIGSTOP, a debugger): it cannot answer until resumed."""
        return bool(self.states() & STOPPED)

    def container_frozen(self) -> bool:
        """True while the container's cgroup is frozen (``docker pause``)."""
        with self._lock:
            if self._freezer is None:
                return False
            try:
                state = os.pread(self._freezer, 256, 0)
            except OSError:
                return False
        return (
            state.strip() in (b"FROZEN", b"FREEZING") if self._freezer_v1 else b"frozen 1" in state
        )

    def close(self) -> None:
        with self._lock:
            for fd in [*self._stats, self._freezer]:
                if fd is not None:
                    os.close(fd)
            self._stats, self._freezer = [], None


def _open(path: str) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def container_pids(container_id: str) -> list[int]:
    """The processes of a container (its init and the bootstrap, right after the bootstrap is ready)."""
    for path in _container_dirs(
        V1_ROOT if (V1_ROOT / "memory.limit_in_bytes").exists() else V2_ROOT, container_id
    ):
        try:
            return [int(pid) for pid in (path / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            continue
    return []


def _container_dirs(root: Path, container_id: str) -> list[Path]:
    """Where Docker puts a container's cgroup under ``root`` (cgroupfs and systemd drivers)."""
    return [root / "docker" / container_id, root / "system.slice" / f"docker-{container_id}.scope"]


def ours(prefix: str) -> list[Path]:
    """The memory cgroups whose names start with ``prefix`` (a grid's identity and a dash)."""
    parent = (V1_ROOT if (V1_ROOT / "memory.limit_in_bytes").exists() else V2_ROOT) / "nanogrid"
    try:
        return sorted(
            path for path in parent.iterdir() if path.is_dir() and path.name.startswith(prefix)
        )
    except OSError:  # no cgroup of ours was ever made here, or this account cannot see them
        return []


def sweep(prefix: str) -> int:
    """Remove the cgroups ``ours(prefix)`` names, killing any process still in one first; how many went."""
    removed = 0
    for path in ours(prefix):
        if _remove_with_processes(path):
            removed += 1
        else:
            log.warning("could not remove the memory cgroup %s left by an earlier run", path)
    return removed


def _remove_with_processes(path: Path) -> bool:
    for _ in range(50):  # processes leave a cgroup only once the kernel has reaped them: a few ms
        try:
            path.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError:
            pass
        with contextlib.suppress(OSError, ValueError):
            for pid in (path / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.02)
    return False
