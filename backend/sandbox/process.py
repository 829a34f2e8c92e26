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
import threading
import time
import uuid
from pathlib import Path

from backend.sandbox import cgroup
from backend.sandbox.base import Sandbox, SandboxError
from backend.sandbox.protocol import ChannelClosed, ChannelTimeout, FrameReader, encode_frame, write_all

log = logging.getLogger(__name__)

BOOTSTRAP = Path(__file__).resolve().parents[2] / "runtimes" / "python" / "bootstrap.py"
START_TIMEOUT_S = 30.0


def _interpreter_paths() -> list[Path]:
    """Directories the bootstrap's interpreter imports from: its prefixes and sys.path."""
    paths = {Path(sys.prefix), Path(sys.base_prefix), BOOTSTRAP.parent}
    paths.update(Path(p) for p in sys.path if p and Path(p).is_dir())
    roots = sorted(p.resolve() for p in paths)
    return [p for i, p in enumerate(roots) if not any(p.is_relative_to(q) for q in roots[:i])]


class ProcessSandboxFactory:
    """Starts process sandboxes with one grid's settings."""

    kind = "process"

    def __init__(self, base_dir: Path, hide_dir: Path, *, bubblewrap: str = "auto", cgroups: str = "auto",
                 kill_grace_s: float = 1.0, capture_limit: int = 1 << 20, max_output_bytes: int = 1 << 30,
                 ai_endpoint: str = "", ai_model: str = "") -> None:
        self.base_dir = base_dir
        self.hide_dir = hide_dir
        self.bwrap = shutil.which("bwrap") if bubblewrap != "off" else None
        if bubblewrap == "on" and not self.bwrap:
            raise RuntimeError("bubblewrap=on but no `bwrap` on PATH: apt-get install bubblewrap")
        self.use_cgroups = cgroups != "off" and cgroup.available()
        self.kill_grace_s = kill_grace_s
        self.capture_limit = capture_limit
        self.max_output_bytes = max_output_bytes
        self.ai_env = {k: v for k, v in (("AI_ENDPOINT", ai_endpoint), ("LLM_MODEL", ai_model)) if v}
        base_dir.mkdir(parents=True, exist_ok=True)

    def describe(self) -> str:
        parts = ["process sandbox (trusted code only)"]
        parts.append("bubblewrap namespaces" if self.bwrap else "no bubblewrap")
        parts.append("memory cgroups" if self.use_cgroups else "rlimits")
        return ", ".join(parts)

    @property
    def ai_capable(self) -> bool:
        return False  # with an AI node configured, every process sandbox already shares the host's network

    def start(self, ai: bool = False) -> ProcessSandbox:
        return ProcessSandbox(self)


class ProcessSandbox(Sandbox):
    def __init__(self, factory: ProcessSandboxFactory) -> None:
        self.factory = factory
        self.id = "proc-" + uuid.uuid4().hex[:12]
        self.work_dir = factory.base_dir / self.id
        self.output_dir = self.work_dir / "output"
        self.output_dir.mkdir(parents=True)
        self.memory_mib = 0
        self._kill_reason: str | None = None
        self._lock = threading.Lock()
        self.cgroup = cgroup.MemoryCgroup(self.id) if factory.use_cgroups else None
        startup_log = self._startup_log()
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
            raise SandboxError("crash", f"could not start the sandbox process: {exc}") from None
        finally:
            os.close(startup_log)
        self.reader = FrameReader(self.proc.stdout.fileno())
        try:
            ready, _ = self.reader.read(time.monotonic() + START_TIMEOUT_S)
        except (ChannelClosed, ChannelTimeout):
            log_text = (self.work_dir / "startup.log").read_text(errors="replace")[-2000:].strip()
            self.close()
            raise SandboxError("crash", f"the Python bootstrap did not start: {log_text or 'no output'}") from None
        self.python = ready["python"]

    def _startup_log(self) -> int:
        """What the interpreter says before the bootstrap takes over fd 2 (why it could not start)."""
        return os.open(self.work_dir / "startup.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

    def _join_cgroup(self) -> None:
        with open(self.cgroup.procs_file, "w") as f:
            f.write(str(os.getpid()))

    def _command(self) -> list[str]:
        python = [sys.executable, "-I", str(BOOTSTRAP)]
        if not self.factory.bwrap:
            return python
        # With an AI node the sandboxes keep the host's network to reach it (trusted code only);
        # Docker sandboxes are the ones that limit it.
        network = ["--share-net"] if self.factory.ai_env else []
        # Order matters: later mounts go on top of earlier ones. The interpreter and its packages
        # are mounted back read-only in case they live under /tmp (a venv in a temporary checkout).
        interpreter = []
        for path in _interpreter_paths():
            if not path.is_relative_to(self.factory.hide_dir):
                interpreter += ["--ro-bind", str(path), str(path)]
        return [
            self.factory.bwrap, "--unshare-all", *network, "--die-with-parent",
            "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
            "--tmpfs", str(self.factory.hide_dir), *interpreter, "--bind", str(self.work_dir), str(self.work_dir),
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
            "NANOGRID_OUTPUT_DIR": str(self.output_dir),
            "NANOGRID_CAPTURE_LIMIT": str(self.factory.capture_limit),
            **self.factory.ai_env,
        }

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None and self._kill_reason is None

    def load(self, function_id: str, package: bytes, memory_mib: int) -> None:
        limit = memory_mib << 20
        header = {"op": "load", "max_output_bytes": self.factory.max_output_bytes}
        if self.cgroup:
            self.cgroup.set_limit(limit)
        else:
            header["rlimit_data"] = limit
        self.memory_mib = memory_mib
        reply, _ = self._roundtrip(header, package, START_TIMEOUT_S)
        if not reply["ok"]:
            error = reply["error"]
            self.close()
            raise SandboxError("load", f"the function could not be loaded: {error.get('traceback') or error}")
        self.function_id = function_id

    def _collect_outputs(self) -> None:
        pass  # the sandbox writes straight into output_dir on this machine

    def _roundtrip(self, header: dict, body: bytes, timeout_s: float) -> tuple[dict, bytes]:
        try:
            write_all(self.proc.stdin.fileno(), encode_frame(header, body))
            return self.reader.read(time.monotonic() + timeout_s)
        except ChannelTimeout:
            self._stop(graceful=True)
            raise SandboxError("timeout", f"timed out after {timeout_s:g} s; the sandbox was replaced") from None
        except (ChannelClosed, BrokenPipeError):
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
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        if self.cgroup:
            self.cgroup.remove()
            self.cgroup = None
        shutil.rmtree(self.work_dir, ignore_errors=True)
