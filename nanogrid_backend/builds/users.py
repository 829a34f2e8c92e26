"""Which environments are in use on this machine, so that the cache never evicts one of them.

An environment is in use while a sandbox started with it is alive (a warm process sandbox reads
its packages from the layer all day), or while a call that was given it has not yet started its
sandbox (it may queue for a place in the pool). Each process that uses an environment holds a
shared lock on its ``.use`` file; eviction takes an exclusive one without waiting, so it sees the
users of every process here, and a process that dies lets go of its locks with it.
"""

from __future__ import annotations

import fcntl
import threading
import time
import weakref
from pathlib import Path
from typing import IO, Any

STARTING_S = (
    600.0  # how long a call given an environment may take to start its sandbox (it may queue)
)


class EnvironmentUsers:
    """The users of environments in this process, and the ``.use`` file locks that tell other processes."""

    def __init__(self, locks: Path) -> None:
        self.locks = locks
        self._lock = threading.Lock()
        self._sandboxes: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        self._starting: dict[str, list[float]] = {}  # environment id -> when calls were given it
        self._held: dict[str, IO[str]] = {}  # environment id -> its .use file, locked shared

    def starting(self, env_id: str) -> None:
        """A call was given the environment; it counts as in use until its sandbox starts (or STARTING_S)."""
        with self._lock:
            self._starting.setdefault(env_id, []).append(time.monotonic())
        self._hold(env_id)

    def started(self, env_id: str, sandbox: Any) -> None:
        """A sandbox of the environment started: in use for as long as ``sandbox.alive``."""
        with self._lock:
            self._sandboxes[sandbox] = env_id
            waiting = self._starting.get(env_id)
            if waiting:
                waiting.pop(0)  # the call that was given it has its sandbox now
        self._hold(env_id)

    def done_starting(self, env_id: str) -> None:
        """A caller that counted the environment in use with ``starting`` no longer needs it."""
        with self._lock:
            waiting = self._starting.get(env_id)
            if waiting:
                waiting.pop(0)
        self.release_unused()

    def environment_of(self, sandbox: Any) -> str | None:
        return self._sandboxes.get(sandbox)

    def _hold(self, env_id: str) -> None:
        with self._lock:
            if env_id not in self._held:
                handle = open(self.locks / f"{env_id}.use", "a")  # noqa: SIM115  (open while in use)
                # waits only while an eviction of it decides (a rename)
                fcntl.flock(handle, fcntl.LOCK_SH)
                self._held[env_id] = handle

    def release_unused(self) -> None:
        """Let go of the ``.use`` files of environments this process no longer uses (their sandboxes died)."""
        now = time.monotonic()
        with self._lock:
            used = {env_id for sandbox, env_id in list(self._sandboxes.items()) if _alive(sandbox)}
            for env_id, since in list(self._starting.items()):
                self._starting[env_id] = [t for t in since if now - t < STARTING_S]
                if self._starting[env_id]:
                    used.add(env_id)
                else:
                    del self._starting[env_id]
            for env_id in set(self._held) - used:
                self._held.pop(env_id).close()  # closing drops the shared lock


def _alive(sandbox: Any) -> bool:
    try:
        return bool(sandbox.alive)
    except Exception:  # a sandbox that cannot say is closed or broken: it holds nothing
        return False
