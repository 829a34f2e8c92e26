"""The process sandbox: a bootstrap in a child process, for trusted code on your own machine.

It is not a security boundary against hostile code (use the Docker sandbox for that). Where
``bwrap`` (bubblewrap) exists, each process also gets its own network, pid and mount namespaces:
a read-only view of the system, a private ``/tmp``, no network, and the grid's data directory
hidden except for its own working directory. Where memory cgroups can be created, each sandbox
gets one for a hard memory limit and an exact per-call peak; elsewhere ``RLIMIT_DATA`` limits
memory and the kernel's own high-water mark (VmHWM) gives the peak.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from nanogrid_backend.builds.builder import BuiltEnvironment, too_little_memory
from nanogrid_backend.sandbox import cgroup, leftovers
from nanogrid_backend.sandbox.base import Limits, SandboxError
from nanogrid_backend.sandbox.liveness import WatchedSandbox
from nanogrid_backend.sandbox.protocol import (
    ChannelClosed,
    ChannelTimeout,
    FrameReader,
    encode_frame,
    reply_header_cap,
    write_all,
)
from nanogrid_backend.sandbox.scratch import DiskRoom
from nanogrid_backend.volumes import VolumeSet

log = logging.getLogger(__name__)

BOOTSTRAP = Path(__file__).resolve().parents[2] / "nanogrid_runtimes" / "python" / "bootstrap.py"
START_TIMEOUT_S = 30.0
EXIT_WAIT_S = 2.0  # how long close() waits for a killed sandbox's processes to be gone
OUTPUT_MOUNT = "/output"  # the seed's output directory, where its functions write (OUTPUT_DIR), with bubblewrap


# Never bound into a process sandbox: the container engine's storage (other sandboxes' files, and mounts that come
# and go as containers start and stop, which a recursive bind may meet half gone) and its control socket.
HOST_PATHS_HIDDEN = (
    "/var/lib/docker",
    "/var/lib/containerd",
    "/run/docker.sock",
    "/run/docker",
    "/run/containerd",
)


def _host_root() -> list[str]:
    """The host's root read-only, entry by entry on bubblewrap's own root, so that ``/output`` can be made there
    (a read-only bind of ``/`` itself leaves nowhere to make it); ``/dev``, ``/proc`` and ``/tmp`` are the sandbox's.
    A directory holding a path of ``HOST_PATHS_HIDDEN`` is bound entry by entry in turn, without that path.
    The root is remounted read-only once everything is in place."""
    binds: list[str] = []

    def bind_entries(directory: str) -> None:
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            path = entry.path
            if path in ("/dev", "/proc", "/tmp", OUTPUT_MOUNT) or path in HOST_PATHS_HIDDEN:
                continue
            if entry.is_symlink():
                binds.extend(["--symlink", os.readlink(path), path])
            elif entry.is_dir() and any(
                hidden.startswith(path + "/") for hidden in HOST_PATHS_HIDDEN
            ):
                binds.extend(["--dir", path])
                bind_entries(path)
            else:
                binds.extend(["--ro-bind", path, path])

    bind_entries("/")
    return binds


def _interpreter_paths() -> list[Path]:
    """Directories the bootstrap's interpreter imports from: its prefixes and sys.path."""
    paths = {Path(sys.prefix), Path(sys.base_prefix), BOOTSTRAP.parent}
    paths.update(Path(p) for p in sys.path if p and Path(p).is_dir())
    roots = sorted(p.resolve() for p in paths)
    return [p for i, p in enumerate(roots) if not any(p.is_relative_to(q) for q in roots[:i])]


class ProcessSandboxFactory:
    """Starts process sandboxes with one grid's settings."""

    kind = "process"
    python = ""  # the grid's own interpreter
    disk_mib: int | None = None  # no disk of its own: trusted code writes to the host's
    disk_room: DiskRoom | None = None

    def __init__(
        self,
        base_dir: Path,
        hide_dir: Path,
        *,
        bubblewrap: str = "auto",
        cgroups: str = "auto",
        kill_grace_s: float = 1.0,
        limits: Limits | None = None,
    ) -> None:
        self.base_dir = base_dir
        self.hide_dir = hide_dir
        self.bwrap = shutil.which("bwrap") if bubblewrap != "off" else None
        if bubblewrap == "on" and not self.bwrap:
            raise RuntimeError("bubblewrap=on but no `bwrap` on PATH: apt-get install bubblewrap")
        self.use_cgroups = cgroups != "off" and cgroup.available()
        self.kill_grace_s = kill_grace_s
        self.limits = limits or Limits()
        self.sandbox_uid = os.getuid()  # sandboxes run as the grid's own account
        base_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.identity = leftovers.grid_identity(base_dir)  # in the names of its cgroups
        self.sweep()

    def sweep(self, wait_s: float = 0.0) -> int:
        """Remove sandbox directories and memory cgroups left by a run that crashed (or was killed) before closing
        them; at shutdown, those of sandboxes that were still closing. How many there were."""
        # An older release's containers and cgroups first: the directories are their evidence.
        count = leftovers.remove_legacy(self.base_dir)
        count += leftovers.remove_dirs(self.base_dir) + cgroup.sweep(self.identity + "-")
        if count:
            log.info(
                "removed %d sandbox directories and memory cgroups left by an earlier run", count
            )
        return count

    def takes_volumes(self, volumes: VolumeSet) -> bool:
        """Never: bubblewrap mounts volumes only as a process starts, so a function with volumes starts its own."""
        return False

    def disk_shortfall(self) -> None:
        return None  # no disk of its own to run short of

    def runtime_images(self) -> None:
        return None  # one Python: the grid's own, no image

    def language_runtimes(self) -> dict[str, BuiltEnvironment]:
        return {}  # Node.js, Go and C++ run in Docker sandboxes only

    def describe(self) -> str:
        parts = ["process sandbox (trusted code only)"]
        parts.append("bubblewrap namespaces" if self.bwrap else "no bubblewrap")
        parts.append("memory cgroups" if self.use_cgroups else "rlimits")
        return ", ".join(parts)

    def start(
        self,
        ai: bool = False,
        environment: BuiltEnvironment | None = None,
        disk_mib: int | None = None,
        evict_idle: bool = False,
        volumes: VolumeSet | None = None,
    ) -> ProcessSandbox:
        """A stem cell; with an ``environment``, its layer of packages comes first on the import path.

        ``disk_mib`` is not enforced here: trusted code writes to the host's disk (each file capped at the grid's
        max_output_bytes); the Docker sandbox gives each sandbox a disk of that size. With no disk of its own, a
        process sandbox has no disk room to take from idle ones (``evict_idle``). ``volumes`` are bound by bubblewrap
        (without it a process cannot be given a mount of its own, and a function with volumes is refused)."""
        if volumes is not None and volumes.mounts and not self.bwrap:
            raise SandboxError(
                "volume",
                "this grid's process sandboxes run without bubblewrap, which mounting a "
                "volume needs: install bubblewrap, or use Docker sandboxes",
            )
        return ProcessSandbox(self, environment, volumes)


class ProcessSandbox(WatchedSandbox):
    def __init__(
        self,
        factory: ProcessSandboxFactory,
        environment: BuiltEnvironment | None = None,
        volumes: VolumeSet | None = None,
    ) -> None:
        self.factory = factory
        self.volumes = volumes
        self.site_dir = environment.site_dir if environment is not None else None
        self.limits = factory.limits
        self.id = "proc-" + uuid.uuid4().hex[:12]
        self.work_dir = factory.base_dir / self.id
        self.work_dir.mkdir(mode=0o700, parents=True)
        # Output files come over the channel like the Docker sandbox's: the host writes them here, outside
        # the directory the process can write to.
        self.output_dir = factory.base_dir / f"{self.id}.outputs"
        self.output_dir.mkdir(mode=0o700)
        self.memory_mib = 0
        self._kill_reason: str | None = None
        self._watch = cgroup.Watch([])  # its processes', once it has started
        self._lock = threading.Lock()
        self.cgroup = (
            cgroup.MemoryCgroup(f"{factory.identity}-{self.id}") if factory.use_cgroups else None
        )
        startup_log = self._startup_log()
        if volumes is not None:
            volumes.hold()  # released by close(), whichever way the start ends
        try:
            self.proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=startup_log,
                cwd=self.work_dir,
                env=self._environment(),
                start_new_session=True,  # its own process group, so a kill reaches its children too
                preexec_fn=self._join_cgroup if self.cgroup else None,
            )
        except OSError as exc:
            if self.cgroup:
                self.cgroup.remove()
            shutil.rmtree(self.work_dir, ignore_errors=True)
            shutil.rmtree(self.output_dir, ignore_errors=True)
            if volumes is not None:
                volumes.release()
            raise SandboxError("crash", f"could not start the sandbox process: {exc}") from None
        finally:
            os.close(startup_log)
        # both are pipes (Popen above)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.reader = FrameReader(
            self.proc.stdout.fileno(), max_header=reply_header_cap(self.limits.capture_bytes)
        )
        try:
            ready, _ = self.reader.read(time.monotonic() + START_TIMEOUT_S, 0)
        except (ChannelClosed, ChannelTimeout):
            log_text = (self.work_dir / "startup.log").read_text(errors="replace")[-2000:].strip()
            self.close()
            raise SandboxError(
                "crash", f"the Python bootstrap did not start: {log_text or 'no output'}"
            ) from None
        self.python = self.check_ready(ready)
        # bubblewrap's and the bootstrap's processes, not the function's
        self._watch = cgroup.Watch(cgroup.process_tree(self.proc.pid))

    def _startup_log(self) -> int:
        """What the interpreter says before the bootstrap takes over fd 2 (why it could not start)."""
        return os.open(self.work_dir / "startup.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

    def _join_cgroup(self) -> None:
        assert self.cgroup is not None  # only called as the preexec_fn when there is one
        with open(self.cgroup.procs_file, "w") as f:
            f.write(str(os.getpid()))

    def _command(self) -> list[str]:
        # -I ignores PYTHONPATH; with an environment layer, -s -P keep the rest of isolated mode.
        python = [sys.executable, "-s", "-P" if self.site_dir else "-I", str(BOOTSTRAP)]
        if not self.factory.bwrap:
            return python
        layer = ["--ro-bind", str(self.site_dir), str(self.site_dir)] if self.site_dir else []
        # Order matters: later mounts go on top of earlier ones. The interpreter and its packages
        # are mounted back read-only in case they live under /tmp (a venv in a temporary checkout).
        interpreter = []
        for path in _interpreter_paths():
            if not path.is_relative_to(self.factory.hide_dir):
                interpreter += ["--ro-bind", str(path), str(path)]
        outputs = self.work_dir / "output"  # seen as /output too, the seed's output directory
        outputs.mkdir(mode=0o700, exist_ok=True)
        volumes = []  # the owner's volumes, bound where the function asked (the host's mount of each, never copied)
        for mount in self.volumes.mounts if self.volumes is not None else []:
            volumes += ["--ro-bind" if mount.read_only else "--bind", mount.source, mount.target]
        return [
            self.factory.bwrap,
            "--unshare-all",
            "--die-with-parent",
            *_host_root(),
            "--dev",
            "/dev",
            "--proc",
            "/proc",
            "--tmpfs",
            "/tmp",
            "--tmpfs",
            str(self.factory.hide_dir),
            *interpreter,
            *layer,
            "--bind",
            str(self.work_dir),
            str(self.work_dir),
            "--bind",
            str(outputs),
            OUTPUT_MOUNT,
            *volumes,
            "--remount-ro",
            "/",
            *python,
        ]

    def _environment(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.work_dir),
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "NANOGRID_WORK_DIR": str(self.work_dir),
            "NANOGRID_OUTPUT_DIR": OUTPUT_MOUNT
            if self.factory.bwrap
            else str(self.work_dir / "output"),
            "TMPDIR": "/tmp"
            if self.factory.bwrap
            else tempfile.gettempdir(),  # bubblewrap's /tmp is its own
            "NANOGRID_CAPTURE_LIMIT": str(self.limits.capture_bytes),
            **({"PYTHONPATH": str(self.site_dir)} if self.site_dir else {}),
        }

    @property
    def alive(self) -> bool:
        if self.proc.poll() is not None or self._kill_reason is not None:
            return False
        # The launcher (bubblewrap) outlives a killed bootstrap for a moment: the bootstrap's own state tells first
        return not (self._watch.states() & (cgroup.STOPPED | cgroup.DEAD))

    def frozen(self) -> bool:
        return self._watch.stopped()

    def load(
        self, function_id: str, package: bytes, memory_mib: int, env: dict[str, str] | None = None
    ) -> None:
        limit = memory_mib << 20
        header = {"op": "load", "max_output_bytes": self.limits.output_bytes, "env": env or {}}
        if self.cgroup:
            try:
                self.cgroup.set_limit(limit)
            except OSError:  # below what the process already holds (cgroup v1 refuses with EBUSY)
                self.close()
                raise SandboxError("memory", too_little_memory(memory_mib)) from None
        else:
            header["rlimit_data"] = limit
        self.memory_mib = memory_mib
        self.load_package(function_id, header, package, env, START_TIMEOUT_S)

    def _send(self, header: dict, body: bytes = b"") -> None:
        try:
            write_all(self.proc.stdin.fileno(), encode_frame(header, body))  # type: ignore[union-attr]  # a pipe
        except (BrokenPipeError, ValueError):
            raise self._death() from None

    def _death(self) -> SandboxError:
        """Why the bootstrap died mid-call: our kill, the OOM killer, or the function's own doing."""
        code = self.proc.wait()
        oom = self.cgroup is not None and self.cgroup.oom_killed()
        reason = self._kill_reason
        self.close()
        if reason:
            return SandboxError("cancelled", reason)
        if oom:
            return SandboxError("memory", f"out of memory (limit {self.memory_mib} MiB)")
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        return SandboxError("crash", f"the sandbox process died ({how}) while running the function")

    def _wait_until_exited(self) -> None:
        """Once the launcher is reaped, until every process of the sandbox has exited too: the bootstrap dies on
        its own schedule, and the files it holds open (an output file it was sending, say) keep their disk space
        until it has. A failure answered before then could send the next call into a disk still full; and a cgroup
        with processes left cannot be removed. At most ``EXIT_WAIT_S``."""
        deadline = time.monotonic() + EXIT_WAIT_S
        while True:
            if self.cgroup is not None:
                try:
                    exited = not self.cgroup.procs_file.read_text().strip()
                except OSError:  # no cgroup any more: nothing left in it
                    exited = True
            else:  # the launcher's and the bootstrap's own processes (a child dies with the pid namespace)
                exited = self._watch.states() <= cgroup.DEAD
            if exited or time.monotonic() > deadline:
                return
            time.sleep(0.001)

    def kill(self, reason: str) -> None:
        self._kill_reason = reason
        self._signal(signal.SIGKILL)

    def _signal(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def _stop(self, graceful: bool) -> None:
        with self._lock:
            if self.proc.poll() is None and graceful:
                self._signal(signal.SIGTERM)
                try:
                    self.proc.wait(self.factory.kill_grace_s)
                except subprocess.TimeoutExpired:
                    pass
            self._signal(signal.SIGKILL)
            self.proc.wait()

    def close(self) -> None:
        self._stop(graceful=False)
        self._wait_until_exited()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()  # type: ignore[union-attr]  # both are pipes
            except OSError:
                pass
        if self.cgroup:
            self.cgroup.remove()
            self.cgroup = None
        self._watch.close()
        shutil.rmtree(self.work_dir, ignore_errors=True)
        shutil.rmtree(self.output_dir, ignore_errors=True)
        if self.volumes is not None:
            self.volumes.release()
