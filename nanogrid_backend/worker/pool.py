"""The warm pool: started sandboxes kept ready, each serving one function version for life.

Stem cells are started unspecialised ahead of time; a function's first call specialises one
(cold), later calls reuse it (warm). A sandbox is never handed to a different function. Idle
sandboxes are stopped after a TTL. The cap bounds specialised sandboxes (stem cells come on top
of it, so a cold start always finds one): at the cap, the longest-idle sandbox of another
function makes room.

Stem cells are per environment (a runtime image or interpreter with a layer of packages): the
plain runtime keeps ``stem_cells`` of them, and each of the few most recently used environments
keeps one, so a new function in an environment that is already built starts warm too.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nanogrid_backend.builds.builder import BuiltEnvironment, Environments
from nanogrid_backend.sandbox.base import Sandbox, SandboxError
from nanogrid_backend.sandbox.factory import SandboxFactory

log = logging.getLogger(__name__)

ENVIRONMENTS_WITH_STEM_CELLS = (
    3  # the most recently used environments that keep a stem cell started
)
RETRY_FIRST_S, RETRY_MAX_S = (
    1.0,
    60.0,
)  # pauses between tries to start a stem cell after a failed one


@dataclass
class FunctionCode:
    package: bytes
    memory_mib: int
    ai: bool = (
        False  # may reach the AI node (through the worker; the sandbox itself has no network)
    )
    env: dict[str, str] | None = (
        None  # environment variables set in the sandbox when the function loads
    )
    environment: BuiltEnvironment | None = (
        None  # what its sandbox starts with; None: the plain runtime
    )
    disk_mib: int | None = (
        None  # its scratch disk (/tmp, work and output files); None: the grid's default
    )
    volumes: Any = None  # the owner's volumes its sandbox binds (nanogrid_backend/volumes.py VolumeSet); None: none

    @property
    def stem_key(self) -> str:
        return self.environment.key if self.environment is not None else ""


class WarmPool:
    def __init__(
        self,
        factory: SandboxFactory,
        *,
        cap: int,
        stem_cells: int,
        idle_ttl_s: float,
        environments: Environments | None = None,
        languages: dict[str, BuiltEnvironment] | None = None,
    ) -> None:
        self.factory = factory
        # runtime name (nodejs, go, cpp) -> the image its sandboxes start
        self.languages = languages or {}
        self.environments = (
            environments  # builds what function packages ask for (None: plain runtime only)
        )
        self.cap = cap
        self.stem_cells = stem_cells
        self.idle_ttl_s = idle_ttl_s
        self._cond = threading.Condition()
        self._idle: dict[str, list[Sandbox]] = {}  # function id -> idle sandboxes, most recent last
        self._idle_since: dict[str, float] = {}  # sandbox id -> when it became idle
        # environment key ("" the plain runtime) -> stem cells
        self._stems: dict[str, list[Sandbox]] = {"": []}
        # most recently used last
        self._stem_environments: OrderedDict[str, BuiltEnvironment] = OrderedDict()
        self._busy: set[str] = set()
        self._specialised = 0  # busy + idle + being loaded: the number the cap bounds
        self._stems_starting: dict[str, int] = {}
        self._closing: list[
            Sandbox
        ] = []  # replaced sandboxes the maintenance thread closes (_close_later)
        self._closed = False
        self.problem: str | None = (
            None  # why stem cells cannot start now (said once in the log, and by /health)
        )
        self.problem_kind: str | None = (
            None  # the SandboxError kind of that failure ("error": any other exception)
        )
        self._retry_pause, self._retry_at = 0.0, 0.0
        self._wake = threading.Event()
        self._wake.set()  # the first stem cells start at once, not after the maintenance thread's first wait
        room = factory.disk_room  # the Docker sandboxes' share of the host's disk
        if room is not None:
            room.reclaimable, room.reclaim = self._idle_disk_bytes, self._stop_least_recently_used
        self._thread = threading.Thread(target=self._maintain, name="warm-pool", daemon=True)
        self._thread.start()

    def acquire(self, function_id: str, code: Callable[[], FunctionCode]) -> tuple[Sandbox, bool]:
        """A sandbox for this function and whether it was a cold start. Blocks while the pool is full."""
        victims: list[Sandbox] = []
        function: FunctionCode | None = None
        sandbox: Sandbox | None = None
        warm = False
        with self._cond:
            while True:
                if self._closed:
                    raise RuntimeError("the worker is shutting down")
                idle = self._idle.get(function_id)
                if idle:
                    sandbox = idle.pop()
                    self._idle_since.pop(sandbox.id, None)
                    # died while idle (OOM killer, `docker rm -f`): replaced, never handed out
                    if not sandbox.alive:
                        self._specialised -= 1
                        victims.append(sandbox)
                        continue
                    self._busy.add(sandbox.id)
                    warm = True
                    break
                if function is None:  # cold: the package decides what kind of sandbox it needs
                    self._cond.release()
                    try:
                        function = code()
                        if function.environment is None:
                            function.environment = self._language_of(function.package)
                    finally:
                        self._cond.acquire()
                    continue
                if self._specialised < self.cap:
                    self._specialised += 1
                    # Stem cells have the default disk; a function that asks for another size starts its own.
                    sandbox = (
                        self._live_stem(function.stem_key, victims)
                        if self._stem_fits(function)
                        else None
                    )
                    self._note_environment(function.environment)
                    break
                victim = self._take_longest_idle()
                if victim is not None:
                    victims.append(victim)
                    continue
                self._cond.wait()
        if warm:
            assert sandbox is not None
            self._close_later(victims, wake=True)
            if self.environments is not None:
                # its environment stays "recently used" while served warm
                self.environments.note_use_of(sandbox)
            return sandbox, False
        assert function is not None  # a cold start: its code was fetched in the loop
        if sandbox is None:
            self._close(
                victims
            )  # a sandbox of its own starts: what it replaces makes room for it first
        else:
            self._close_later(victims, wake=False)
        try:
            if sandbox is None:
                sandbox = self._start(
                    function.environment, function.disk_mib, for_call=True, volumes=function.volumes
                )
                self._load(sandbox, function_id, function)
            else:
                try:
                    self._load(sandbox, function_id, function)
                except SandboxError as exc:
                    if exc.kind not in ("crash", "frozen"):
                        raise
                    # The stem cell died or froze between its check and its load: once more, on a fresh one.
                    log.warning(
                        "a stem cell failed while loading function %s (%s); starting another",
                        function_id,
                        exc.message,
                    )
                    self._forget(sandbox, counted=False)
                    sandbox = None  # if the next start fails, there is nothing left to close
                    sandbox = self._start(
                        function.environment,
                        function.disk_mib,
                        for_call=True,
                        volumes=function.volumes,
                    )
                    self._load(sandbox, function_id, function)
        except BaseException:
            self._forget(sandbox)
            raise
        finally:
            # Only now: the replaced sandboxes' closing and a new stem cell's start (a disk made and mounted, a
            # container started) would otherwise compete with this cold start for the CPU.
            self._wake.set()
        return sandbox, True

    def _close_later(self, sandboxes: list[Sandbox], wake: bool) -> None:
        """Hand ``sandboxes`` to the maintenance thread to close: closing a Docker sandbox unmounts and detaches its
        disk, milliseconds a call that does not need their room should not wait for."""
        if not sandboxes:
            return
        with self._cond:
            closed = self._closed
            if not closed:
                self._closing += sandboxes
        if closed:  # nobody is left to do it
            self._close(sandboxes)
        elif wake:
            self._wake.set()

    def _language_of(self, package: bytes) -> BuiltEnvironment | None:
        """A Node.js, Go or C++ function's sandbox starts its language's image (a stem cell kept for the few most
        recently used, as for environments); None for Python. The package was verified by the worker already."""
        try:
            with zipfile.ZipFile(io.BytesIO(package)) as zf:
                runtime = str(json.loads(zf.read("manifest.json")).get("runtime") or "")
        except (zipfile.BadZipFile, KeyError, ValueError):
            return None  # not a package this pool can read: the sandbox's load says what is wrong with it
        if not runtime or runtime.startswith("python"):
            return None
        if runtime not in self.languages:
            raise SandboxError(
                "runtime",
                f"this worker has no {runtime} runtime (its runtimes: Python"
                f"{''.join(', ' + name for name in self.languages)}); build it with "
                "`python nanogrid_runtimes/build.py --runtime "
                f"{runtime.replace('nodejs', 'node')}`",
            )
        return self.languages[runtime]

    def _load(self, sandbox: Sandbox, function_id: str, function: FunctionCode) -> None:
        with self._cond:
            self._busy.add(sandbox.id)
        if function.volumes is not None and getattr(sandbox, "volumes", None) is None:
            sandbox.bind_volumes(function.volumes)  # type: ignore[attr-defined]  # a stem cell that takes volumes
        sandbox.load(function_id, function.package, function.memory_mib, function.env)

    def _live_stem(self, key: str, dead: list[Sandbox]) -> Sandbox | None:
        """A started stem cell of this environment that is still alive; dead ones go to ``dead``
        (call with the lock)."""
        stems = self._stems.get(key) or []
        while stems:
            stem = stems.pop()
            if stem.alive:
                return stem
            dead.append(stem)
        return None

    @staticmethod
    def _close(sandboxes: list[Sandbox]) -> None:
        for sandbox in sandboxes:
            sandbox.close()
        sandboxes.clear()

    def release(self, sandbox: Sandbox) -> None:
        """Give a sandbox back after a call; a dead one is dropped."""
        if not sandbox.alive:
            self.discard(sandbox)
            return
        with self._cond:
            self._busy.discard(sandbox.id)
            if not self._closed:  # after close, a sandbox that was busy is closed, never kept
                self._idle.setdefault(sandbox.function_id or "", []).append(sandbox)
                self._idle_since[sandbox.id] = time.monotonic()
                self._cond.notify()
                return
        sandbox.close()

    def discard(self, sandbox: Sandbox) -> None:
        """Stop a sandbox that must not serve again (it timed out, crashed or was killed)."""
        self._forget(sandbox)

    def _start(
        self,
        environment: BuiltEnvironment | None,
        disk_mib: int | None = None,
        for_call: bool = False,
        volumes: Any = None,
    ) -> Sandbox:
        """A new sandbox; ``for_call``: a call waits for it, and idle sandboxes give up their disk room for it;
        ``volumes``: what it binds (only at its start: a stem cell never serves a function with volumes)."""
        options: dict[str, Any] = {} if environment is None else {"environment": environment}
        if volumes is not None:
            options["volumes"] = volumes
        if disk_mib is not None:
            options["disk_mib"] = disk_mib
        if for_call and self.factory.disk_room is not None:  # sandboxes with disks of their own
            options["evict_idle"] = True
        sandbox = self.factory.start(**options)
        if environment is not None and self.environments is not None:
            # never evicted while this sandbox lives
            self.environments.hold(environment.env_id, sandbox)
        return sandbox

    def _idle_disk_bytes(self) -> int:
        """What idle sandboxes' scratch disks hold in promises of room on the host (``scratch.DiskRoom``)."""
        with self._cond:
            idle = [sandbox for sandboxes in self._idle.values() for sandbox in sandboxes]
        return sum(
            disk.may_grow()
            for sandbox in idle
            if (disk := getattr(sandbox, "scratch", None)) is not None
        )

    def _stop_least_recently_used(self) -> bool:
        """Stop the idle sandbox unused for longest, whichever function and owner it serves; False if none is idle."""
        with self._cond:
            victim = self._take_longest_idle()
            self._cond.notify()
        if victim is None:
            return False
        log.info("stopped idle sandbox %s to make disk room for a call", victim.id)
        victim.close()
        return True

    def _stem_fits(self, function: FunctionCode) -> bool:
        """Whether a stem cell's scratch disk is the size this function asks for (always without ``disk=``, and
        where the sandbox has no scratch disk of its own: the process sandbox)."""
        if function.volumes is not None and not self.factory.takes_volumes(function.volumes):
            return False  # its volumes can only be bound as a sandbox starts: it starts its own
        default = self.factory.disk_mib
        return function.disk_mib is None or default is None or function.disk_mib == default

    def _note_environment(self, environment: BuiltEnvironment | None) -> None:
        """Remember a recently used environment (it keeps a stem cell); the oldest beyond the limit lose theirs."""
        if environment is None or not self.stem_cells:
            return
        self._stem_environments[environment.key] = environment
        self._stem_environments.move_to_end(environment.key)
        self._stems.setdefault(environment.key, [])
        while len(self._stem_environments) > ENVIRONMENTS_WITH_STEM_CELLS:
            old, _ = self._stem_environments.popitem(last=False)
            for stem in self._stems.pop(old, []):
                stem.close()

    def _forget(self, sandbox: Sandbox | None, counted: bool = True) -> None:
        """Close a sandbox taken from the pool; ``counted=False`` keeps its place under the cap for a replacement."""
        if sandbox is not None:
            sandbox.close()
        with self._cond:
            if sandbox is not None:
                self._busy.discard(sandbox.id)
            if counted:
                self._specialised -= 1
            self._cond.notify()
        self._wake.set()

    def stop_idle(self, which: Callable[[Sandbox], bool]) -> int:
        """Stop the idle sandboxes ``which`` picks (those holding a volume its owner deletes); how many."""
        with self._cond:
            victims = [s for sandboxes in self._idle.values() for s in sandboxes if which(s)]
            for victim in victims:
                self._remove_idle(victim.id)
            self._cond.notify()
        self._close(victims)
        return len(victims)

    def _take_longest_idle(self) -> Sandbox | None:
        if not self._idle_since:
            return None
        return self._remove_idle(min(self._idle_since, key=self._idle_since.__getitem__))

    def _remove_idle(self, sandbox_id: str) -> Sandbox | None:
        for function_id, sandboxes in self._idle.items():
            for sandbox in sandboxes:
                if sandbox.id == sandbox_id:
                    sandboxes.remove(sandbox)
                    if not sandboxes:
                        del self._idle[function_id]
                    del self._idle_since[sandbox_id]
                    self._specialised -= 1
                    return sandbox
        return None

    def _maintain(self) -> None:
        """Keep stem cells started and stop sandboxes idle for longer than the TTL."""
        while not self._closed:
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            with self._cond:
                closing, self._closing = self._closing, []
            self._close(closing)
            self._evict_expired()
            self._refill()

    def _missing_stem(self) -> tuple[str, BuiltEnvironment | None] | None:
        """The environment that needs a stem cell started next: the plain runtime first, then recent ones."""
        wanted: list[tuple[str, BuiltEnvironment | None, int]] = [("", None, self.stem_cells)]
        wanted += [(key, env, 1) for key, env in reversed(self._stem_environments.items())]
        for key, environment, count in wanted:
            if len(self._stems.get(key, [])) + self._stems_starting.get(key, 0) < count:
                return key, environment
        return None

    def _refill(self) -> None:
        if time.monotonic() < self._retry_at:
            return  # the last start failed: the next try waits for its backoff
        while True:
            with self._cond:
                missing = None if self._closed else self._missing_stem()
                if missing is None:
                    return
                key, environment = missing
                self._stems_starting[key] = self._stems_starting.get(key, 0) + 1
            try:
                sandbox = self._start(environment)
            except Exception as exc:
                with self._cond:
                    self._stems_starting[key] -= 1
                self._start_failed(exc)
                return
            self._start_worked()
            with self._cond:
                self._stems_starting[key] -= 1
                if not self._closed and key in self._stems:
                    self._stems[key].append(sandbox)
                    self._cond.notify()
                    continue
            sandbox.close()
            if self._closed:
                return

    def _start_failed(self, exc: Exception) -> None:
        """Say once why stem cells cannot start (with the traceback only if it is not a sandbox's own refusal), then
        try again after a pause that doubles each time, up to ``RETRY_MAX_S``."""
        problem = exc.message if isinstance(exc, SandboxError) else f"{type(exc).__name__}: {exc}"
        if self.problem is None:
            log.warning(
                "could not start a stem cell: %s; trying again quietly, less and less often (every %g s at "
                "most) until one starts",
                problem,
                RETRY_MAX_S,
                exc_info=not isinstance(exc, SandboxError),
            )
        self.problem = f"sandboxes cannot start: {problem}"
        self.problem_kind = exc.kind if isinstance(exc, SandboxError) else "error"
        self._retry_pause = (
            min(RETRY_MAX_S, self._retry_pause * 2) if self._retry_pause else RETRY_FIRST_S
        )
        self._retry_at = time.monotonic() + self._retry_pause

    def _start_worked(self) -> None:
        if self.problem is not None:
            log.info("stem cells start again")
        self.problem, self.problem_kind, self._retry_pause, self._retry_at = None, None, 0.0, 0.0

    def _evict_expired(self) -> None:
        """Stop sandboxes idle past the TTL, and drop those that died while idle so stem cells are started again."""
        expired: list[Sandbox | None] = []
        now = time.monotonic()
        with self._cond:
            for sandbox_id, since in list(self._idle_since.items()):
                if now - since > self.idle_ttl_s:
                    expired.append(self._remove_idle(sandbox_id))
            for function_sandboxes in list(self._idle.values()):
                expired += [
                    self._remove_idle(s.id) for s in list(function_sandboxes) if not s.alive
                ]
            for key, stems in self._stems.items():
                dead = [stem for stem in stems if not stem.alive]
                self._stems[key] = [stem for stem in stems if stem not in dead]
                expired += dead
            self._cond.notify_all()
        for sandbox in expired:
            if sandbox is not None:
                sandbox.close()

    def wait_ready(self, timeout: float = 30.0) -> bool:
        """Block until the stem cells are started (used by `nanogrid up` and benchmarks)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._stems[""]) < self.stem_cells:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def snapshot(self) -> dict:
        with self._cond:
            return {
                "sandbox": self.factory.describe(),
                "cap": self.cap,
                "specialised": self._specialised,
                "busy": len(self._busy),
                "stem_cells": sum(len(s) for s in self._stems.values()),
                "stem_cells_by_environment": {
                    key: len(s) for key, s in self._stems.items() if key and s
                },
                "idle": sum(len(s) for s in self._idle.values()),
                "idle_by_function": {fid: len(s) for fid, s in self._idle.items() if s},
                "problem": self.problem,
            }

    def close(self) -> None:
        with self._cond:
            self._closed = True
            sandboxes = [
                s for group in [*self._stems.values(), *self._idle.values()] for s in group
            ] + self._closing
            self._closing = []
            self._stems, self._idle, self._idle_since = {"": []}, {}, {}
            self._cond.notify_all()
        self._wake.set()
        for sandbox in sandboxes:
            sandbox.close()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)  # what it was closing is closed when the pool is
