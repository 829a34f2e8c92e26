"""The Docker sandbox: the production sandbox, for code you do not trust.

Every container runs the runtime image's bootstrap as nobody (65534), with a read-only root
filesystem, size-capped tmpfs for /tmp and its working directory, all capabilities dropped,
no-new-privileges, a pids limit, memory and CPU limits, no network and no host mounts.

Code goes in over the bootstrap's own channel (the attach socket's stdin) while the container is
still an unspecialised stem cell: Docker cannot copy into a read-only container, and copying
into or out of a container where user code ran has had host-escape bugs (CVE-2018-15664,
CVE-2019-14271). Output files come out the same way, as a capped, chunked tar stream spooled to
disk. Peak memory is read straight from the container's memory cgroup.
"""

from __future__ import annotations

import logging
import shutil
import tarfile
import threading
import time
import uuid
from pathlib import Path

import docker
import docker.errors
import requests.exceptions

from backend.sandbox.base import Sandbox, SandboxError
from backend.sandbox.cgroup import MemoryCgroup
from backend.sandbox.protocol import (
    ChannelClosed,
    ChannelTimeout,
    DockerAttachStream,
    FrameReader,
    encode_frame,
)

log = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0
SANDBOX_UID = "65534:65534"


class DockerUnavailable(RuntimeError):
    pass


class DockerSandboxFactory:
    """Starts hardened containers of one runtime image with one grid's settings."""

    kind = "docker"

    def __init__(self, image: str, host_dir: Path, *, kill_grace_s: float = 1.0, capture_limit: int = 1 << 20,
                 max_output_bytes: int = 1 << 30, scratch_mib: int = 1024, pids_limit: int = 64,
                 cpus: float = 1.0, stem_memory_mib: int = 256, ai_endpoint: str = "", ai_model: str = "",
                 ai_network: str = "nanogrid-ai") -> None:
        try:
            self.client = docker.from_env(timeout=60)
            self.client.ping()
        except docker.errors.DockerException as exc:
            raise DockerUnavailable(f"the Docker engine does not answer ({exc})") from None
        try:
            labels = self.client.images.get(image).labels or {}
        except docker.errors.ImageNotFound:
            raise DockerUnavailable(f"no runtime image {image!r}: build it with `python runtimes/build.py`") from None
        self.image = image
        self.python = labels.get("nanogrid.python", "")
        if not self.python:
            raise DockerUnavailable(f"image {image!r} has no nanogrid.python label: build it with runtimes/build.py")
        self.host_dir = host_dir
        self.kill_grace_s = kill_grace_s
        self.capture_limit = capture_limit
        self.max_output_bytes = max_output_bytes
        self.scratch_mib = scratch_mib
        self.pids_limit = pids_limit
        self.cpus = cpus
        self.stem_memory_mib = stem_memory_mib
        self.ai_env = {k: v for k, v in (("AI_ENDPOINT", ai_endpoint), ("LLM_MODEL", ai_model)) if v}
        self.ai_network = ai_network
        if ai_endpoint:
            self._ensure_ai_network()
        host_dir.mkdir(parents=True, exist_ok=True)

    @property
    def ai_capable(self) -> bool:
        return bool(self.ai_env)

    def _ensure_ai_network(self) -> None:
        """An internal network (no route out of it): the AI node joins it, and sandboxes that asked for it."""
        if not self.client.networks.list(names=[self.ai_network]):
            self.client.networks.create(self.ai_network, driver="bridge", internal=True,
                                        labels={"nanogrid": "ai-network"})

    def describe(self) -> str:
        network = f"no network; AI functions: network {self.ai_network} only" if self.ai_env else "no network"
        return f"docker sandbox ({self.image}, non-root, read-only, {network})"

    def start(self, ai: bool = False) -> DockerSandbox:
        """A stem cell on no network; with ``ai``, a sandbox on the AI network, which reaches only the AI node."""
        return DockerSandbox(self, ai=ai and self.ai_capable)


class DockerSandbox(Sandbox):
    def __init__(self, factory: DockerSandboxFactory, ai: bool = False) -> None:
        self.factory = factory
        self.id = "ctr-" + uuid.uuid4().hex[:12]
        self.host_dir = factory.host_dir / self.id  # where output files land on this side
        self.output_dir = self.host_dir / "output"
        self.output_dir.mkdir(parents=True)
        self.memory_mib = factory.stem_memory_mib
        self._kill_reason: str | None = None
        self._closed = False
        self.cgroup: MemoryCgroup | None = None
        api = factory.client.api
        scratch = f"rw,nosuid,nodev,size={factory.scratch_mib}m,uid=65534,gid=65534,mode=0700"
        self.container = factory.client.containers.create(
            factory.image,
            name=f"nanogrid-{self.id}",
            stdin_open=True,
            user=SANDBOX_UID,
            read_only=True,
            tmpfs={"/tmp": "rw,nosuid,nodev,size=64m,mode=1777", "/sandbox": scratch},
            environment={"NANOGRID_WORK_DIR": "/sandbox", "NANOGRID_OUTPUT_DIR": "/sandbox/output",
                         "NANOGRID_CAPTURE_LIMIT": str(factory.capture_limit), "HOME": "/sandbox",
                         **(factory.ai_env if ai else {})},
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            pids_limit=factory.pids_limit,
            mem_limit=f"{self.memory_mib}m",
            memswap_limit=f"{self.memory_mib}m",
            nano_cpus=int(factory.cpus * 1e9),
            network_mode=factory.ai_network if ai else "none",
            init=True,  # a tiny init as PID 1, so the bootstrap can be signalled (and can kill itself)
            labels={"nanogrid.sandbox": self.id},
        )
        try:
            # Attach before starting, so the bootstrap's first frame cannot be missed.
            self._socket = api.attach_socket(self.container.id, params={"stdin": 1, "stdout": 1, "stderr": 1,
                                                                         "stream": 1})
            raw = getattr(self._socket, "_sock", self._socket)
            self._raw = raw
            self._stream = DockerAttachStream(raw)
            self.reader = FrameReader(raw.fileno(), self._stream.read_some, self._stream.pending)
            self.container.start()
            ready, _ = self.reader.read(time.monotonic() + START_TIMEOUT_S)
        except (ChannelClosed, ChannelTimeout, docker.errors.APIError) as exc:
            said = bytes(self._stream.stderr).decode(errors="replace")[-2000:] if hasattr(self, "_stream") else ""
            self.close()
            raise SandboxError("crash", f"the container's bootstrap did not start: {said or exc}") from None
        self.python = ready["python"]
        self.cgroup = MemoryCgroup.of_container(self.container.id)

    @property
    def alive(self) -> bool:
        return not self._closed and self._kill_reason is None

    def load(self, function_id: str, package: bytes, memory_mib: int) -> None:
        if memory_mib != self.memory_mib:  # stem cells start with a default; the function sets its own
            self.container.update(mem_limit=f"{memory_mib}m", memswap_limit=f"{memory_mib}m")
            self.memory_mib = memory_mib
        header = {"op": "load", "max_output_bytes": self.factory.max_output_bytes}
        reply, _ = self._roundtrip(header, package, START_TIMEOUT_S)
        if not reply["ok"]:
            error = reply["error"]
            self.close()
            raise SandboxError("load", f"the function could not be loaded: {error.get('traceback') or error}")
        self.function_id = function_id

    def _collect_outputs(self) -> None:
        """Receive the output directory as tar chunks, spooled to disk, then unpacked safely."""
        spool = self.host_dir / "outputs.tar"
        deadline = time.monotonic() + 600
        self._send({"op": "outputs", "limit": self.factory.max_output_bytes})
        with spool.open("wb") as f:
            while True:
                header, body = self._receive(deadline)
                if header.get("done"):
                    break
                f.write(body)
        if not header["ok"]:
            spool.unlink()
            raise SandboxError("output", f"{header['error']['message']}; none were kept")
        with tarfile.open(spool) as tar:
            tar.extractall(self.output_dir, filter="data")  # no links out, no absolute paths, no devices
        spool.unlink()

    def _send(self, header: dict, body: bytes = b"") -> None:
        try:
            self._raw.sendall(encode_frame(header, body))
        except OSError:
            raise self._death() from None

    def _receive(self, deadline: float) -> tuple[dict, bytes]:
        try:
            return self.reader.read(deadline)
        except ChannelClosed:
            raise self._death() from None

    def _roundtrip(self, header: dict, body: bytes, timeout_s: float) -> tuple[dict, bytes]:
        self._send(header, body)
        try:
            return self._receive(time.monotonic() + timeout_s)
        except ChannelTimeout:
            self._stop(graceful=True)
            self.close()
            raise SandboxError("timeout", f"timed out after {timeout_s:g} s; the sandbox was replaced") from None

    def _death(self) -> SandboxError:
        """Why the container's bootstrap went away mid-call: our kill, the OOM killer, or the function."""
        reason = self._kill_reason
        try:
            self.container.wait(timeout=10)
            self.container.reload()
            state = self.container.attrs["State"]
        except (docker.errors.DockerException, requests.exceptions.RequestException):
            state = {}
        self.close()
        if reason:
            return SandboxError("cancelled", reason)
        if state.get("OOMKilled"):
            return SandboxError("memory", f"out of memory (limit {self.memory_mib} MiB; files in /tmp and the "
                                          "output directory count against it)")
        return SandboxError("crash", f"the sandbox died (exit code {state.get('ExitCode', '?')}) while running "
                                     "the function")

    def kill(self, reason: str) -> None:
        self._kill_reason = reason
        try:
            self.container.kill()
        except docker.errors.DockerException:
            pass

    def _stop(self, graceful: bool) -> None:
        try:
            if graceful:
                self.container.kill(signal="SIGTERM")
                try:
                    self.container.wait(timeout=self.factory.kill_grace_s)
                    return
                except (requests.exceptions.RequestException, docker.errors.DockerException):
                    pass
            self.container.kill()
        except docker.errors.DockerException:
            pass  # already gone

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.cgroup:
            self.cgroup.remove()
            self.cgroup = None
        try:
            self._socket.close()
        except (AttributeError, OSError):
            pass
        container = self.container
        # Removal takes ~50 ms of engine time: keep it off the path of the job that is finishing.
        threading.Thread(target=_remove, args=(container,), name="remove-container", daemon=True).start()
        shutil.rmtree(self.host_dir, ignore_errors=True)


def _remove(container: docker.models.containers.Container) -> None:
    try:
        container.remove(force=True)
    except docker.errors.NotFound:
        pass
    except docker.errors.DockerException as exc:
        log.warning("could not remove container %s: %s", container.id[:12], exc)
