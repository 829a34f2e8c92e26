"""The Docker sandbox: the production sandbox, for code you do not trust.

Every container runs the runtime image's bootstrap as nobody (65534), with a read-only root
filesystem, a disk of its own for /tmp, its working and its output directory (``scratch.py``: the
function's ``disk=`` quota, not counted against its memory), all capabilities dropped,
no-new-privileges, a pids limit, memory and CPU limits, no network at all (functions with
``ai=True`` reach the AI node through the host, over the same channel) and no host mounts.

Code goes in over the bootstrap's own channel while the container is still an unspecialised stem cell: a
unix socket the host listens on, on the sandbox's own disk (``CHANNEL_MOUNT``, read-only in the container),
which the bootstrap connects to before any function runs, after which the host takes no other connection; or,
for runtime images whose bootstrap predates it and where there is no such disk, the attach socket's stdin and
stdout, relayed by the engine (dockerd and the container's shim copy every frame: about 280 µs of their CPU a
warm call). Either way: Docker cannot copy into a read-only container, and copying
into or out of a container where user code ran has had host-escape bugs (CVE-2018-15664,
CVE-2019-14271). Output files come out the same way, as records the host checks and writes
itself (no archive is ever unpacked here). Peak memory is read straight from the container's
memory cgroup.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import shutil
import socket
import stat
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import docker
import docker.errors
import docker.types
import requests.exceptions

from nanogrid_backend.builds.builder import BuiltEnvironment, docker_runtimes, too_little_memory
from nanogrid_backend.sandbox import cgroup, leftovers, protocol, scratch
from nanogrid_backend.sandbox.base import Limits, SandboxError, _Spool
from nanogrid_backend.sandbox.cgroup import MemoryCgroup
from nanogrid_backend.sandbox.liveness import WatchedSandbox
from nanogrid_backend.sandbox.outputs import OutputWriter, read_tree
from nanogrid_backend.sandbox.protocol import (
    ChannelClosed,
    ChannelTimeout,
    DockerAttachStream,
    FrameReader,
    ProtocolViolation,
    encode_frame,
    reply_header_cap,
)
from nanogrid_backend.volumes import VolumeSet, bind, shared_root
from nanogrid_contract.errors import NanoGridError

log = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0
SANDBOX_UID = "65534:65534"
OUTPUT_MOUNT = "/output"  # the seed's output directory, where its functions write (OUTPUT_DIR)
CHANNEL_MOUNT = "/run/nanogrid"  # the channel socket's directory in the container (read-only there)
CHANNEL_LABEL = (
    "nanogrid.channel"  # "socket": the image's bootstrap connects to NANOGRID_CHANNEL when given
)
VOLUME_ROOT = "/data"  # where stem cells can be given volumes when they are specialised (any other path: own container)


COMPILED_RUNTIMES = (
    "runtime-go",
    "runtime-cpp",
)  # BuiltEnvironment.env_id of language_runtimes' compiled ones
BLOB_FILE_PREFIX = (
    ".nanogrid-blob-"  # in the sandbox's working directory: an argument blob the host wrote there
)
BLOB_FILE_OVER = 1 << 20  # smaller blobs go over the channel
RESULT_FILE = (
    ".nanogrid-result"  # in the sandbox's working directory: a large result, for the host to read
)
LANGUAGE_ENV_IDS = ("runtime-nodejs", "runtime-go", "runtime-cpp")
LANGUAGE_IMAGES = (
    "nanogrid/runtime-node:latest",
    "nanogrid/runtime-go:latest",
    "nanogrid/runtime-cpp:latest",
)


def language_runtimes(client: docker.DockerClient) -> dict[str, BuiltEnvironment]:
    """The seed platform's other languages whose image is built here (nanogrid_runtimes/build.py --runtime node|go|cpp):
    runtime name (nodejs, go, cpp) -> what its sandboxes start with (the image, its language version)."""
    found = {}
    for image in LANGUAGE_IMAGES:
        try:
            labels = client.images.get(image).labels or {}
        except docker.errors.ImageNotFound:
            continue
        if labels.get("nanogrid.runtime") and labels.get("nanogrid.version"):
            name = labels["nanogrid.runtime"]
            found[name] = BuiltEnvironment(
                f"runtime-{name}", labels["nanogrid.version"], image=image
            )
    return found


class DockerUnavailable(NanoGridError, RuntimeError):
    """No Docker engine or no runtime image: a configuration mistake (`--sandbox docker`), reported in one line."""


class DockerSandboxFactory:
    """Starts hardened containers of one runtime image with one grid's settings."""

    kind = "docker"
    sandbox_uid = scratch.SANDBOX_UID  # non-root in every container

    def __init__(
        self,
        image: str,
        host_dir: Path,
        *,
        kill_grace_s: float = 1.0,
        limits: Limits | None = None,
        disk_mib: int = 1024,
        pids_limit: int = 64,
        cpus: float = 1.0,
        stem_memory_mib: int = 256,
    ) -> None:
        try:
            self.client = docker.from_env(timeout=60)
            self.client.ping()
        except docker.errors.DockerException as exc:
            raise DockerUnavailable(f"the Docker engine does not answer ({exc})") from None
        try:
            labels = self.client.images.get(image).labels or {}
        except docker.errors.ImageNotFound:
            raise DockerUnavailable(
                f"no runtime image {image!r}: build it with `python nanogrid_runtimes/build.py`"
            ) from None
        self.image = image
        self.python = labels.get("nanogrid.python", "")
        if not self.python:
            raise DockerUnavailable(
                f"image {image!r} has no nanogrid.python label: build it with "
                "nanogrid_runtimes/build.py"
            )
        self.host_dir = host_dir
        self.kill_grace_s = kill_grace_s
        self.limits = limits or Limits()
        self.disk_mib = (
            disk_mib  # stem cells' scratch disk; a function asking for another size starts its own
        )
        self.pids_limit = pids_limit
        self.cpus = cpus
        self.stem_memory_mib = stem_memory_mib
        host_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Which grid a container belongs to: the one whose sandboxes live in this directory.
        self.grid_label = leftovers.grid_identity(host_dir)
        # Containers are removed one at a time, off the path of the call that closed them: the engine (20.10's
        # libnetwork) has deadlocked on many containers exiting at once, as a grid's stop closing its pool did.
        self._removals: queue.SimpleQueue[docker.models.containers.Container | None] = (
            queue.SimpleQueue()
        )
        self._remover = threading.Thread(
            target=self._remove_queued, name="remove-containers", daemon=True
        )
        self._remover.start()
        self.sweep()
        self.scratch_problem = scratch.probe(host_dir)  # '' when sandboxes get disks of their own
        self.disk_room = scratch.DiskRoom(host_dir)
        if self.scratch_problem:
            log.warning(
                "sandbox scratch space is memory-backed (tmpfs, counted against each function's memory): %s",
                self.scratch_problem,
            )

    def remove_later(self, container: docker.models.containers.Container) -> None:
        if self._remover.is_alive():
            self._removals.put(container)
        else:  # after the grid's stop
            _remove(container)

    def _remove_queued(self) -> None:
        while (container := self._removals.get()) is not None:
            _remove(container)

    def sweep(self, wait_s: float = 0.0) -> int:
        """Remove this grid's containers and their host directories left by a run that crashed (or was killed)
        before closing them; at shutdown (``wait_s``: how long the removals under way may take first), those of
        sandboxes that were still closing."""
        if wait_s:
            self._removals.put(None)  # the remover ends after what is queued
            self._remover.join(wait_s)
        # ignore_removed: a container whose removal finishes between the listing and its inspection is no error
        left = self.client.containers.list(
            all=True, filters={"label": f"nanogrid.grid={self.grid_label}"}, ignore_removed=True
        )
        for container in left:
            _remove(container)
        # before the directories: their evidence
        legacy = leftovers.remove_legacy(self.host_dir, self.client)
        dirs = leftovers.remove_dirs(self.host_dir)
        if left or dirs or legacy:
            log.info(
                "removed %d sandbox containers and %d sandbox directories left by an earlier run (and %d "
                "containers and cgroups of an older release)",
                len(left),
                dirs,
                legacy,
            )
        return len(left) + dirs + legacy

    def takes_volumes(self, volumes: VolumeSet) -> bool:
        """Whether a stem cell can be given these volumes as it is specialised: all at or under VOLUME_ROOT, and the
        host can mount (else the function starts a container of its own with them)."""
        return not self.scratch_problem and all(
            m.target == VOLUME_ROOT or m.target.startswith(VOLUME_ROOT + "/")
            for m in volumes.mounts
        )

    def disk_shortfall(self) -> str | None:
        return (
            None
            if self.scratch_problem
            else self.disk_room.shortfall(self.disk_mib, evicting_idle=True)
        )

    def runtime_images(self) -> dict[str, str]:
        return docker_runtimes(self.client, self.image, self.python)

    def language_runtimes(self) -> dict[str, BuiltEnvironment]:
        return language_runtimes(self.client)

    def describe(self) -> str:
        disk = (
            f"a {self.disk_mib} MiB disk of its own"
            if not self.scratch_problem
            else f"memory-backed scratch: {self.scratch_problem}"
        )
        return f"docker sandbox ({self.image}, non-root, read-only, no network, {disk})"

    def start(
        self,
        ai: bool = False,
        environment: BuiltEnvironment | None = None,
        disk_mib: int | None = None,
        evict_idle: bool = False,
        volumes: VolumeSet | None = None,
    ) -> DockerSandbox:
        """A stem cell: no network, whatever the function (the AI node is reached through the host).

        With an ``environment``, the container runs its image (the runtime plus the environment's layer);
        ``disk_mib`` sizes its scratch disk (default: the grid's); ``evict_idle``: a call needs it, and idle
        sandboxes give up their disk room for it if the host has too little (``scratch.DiskRoom``); ``volumes``: the
        owner's volumes it binds, held until it closes (never a stem cell's: mounts are fixed at a container's start).
        """
        return DockerSandbox(self, environment, disk_mib or self.disk_mib, evict_idle, volumes)


class DockerSandbox(WatchedSandbox):
    def __init__(
        self,
        factory: DockerSandboxFactory,
        environment: BuiltEnvironment | None = None,
        disk_mib: int = 1024,
        evict_idle: bool = False,
        volumes: VolumeSet | None = None,
    ) -> None:
        self.factory = factory
        self.volumes = volumes
        self.volume_root: Path | None = (
            None  # a stem cell's VOLUME_ROOT on the host, shared with its container
        )
        self._keep_dir = (
            False  # a mount under it could not be let go of: never removed (the next sweep does it)
        )
        self.limits = factory.limits
        self.id = "ctr-" + uuid.uuid4().hex[:12]
        # where output files land on this side, written by the host
        self.host_dir = factory.host_dir / self.id
        self.output_dir = self.host_dir / "output"
        self.output_dir.mkdir(mode=0o700, parents=True)
        self.memory_mib = factory.stem_memory_mib
        self._kill_reason: str | None = None
        self._closed = False
        self.cgroup: MemoryCgroup | None = None
        self._watch = cgroup.Watch([])  # its processes' and freezer's, once it has started
        self._listener: socket.socket | None = (
            None  # where its bootstrap connects (its disk's channel/)
        )
        self._channel: socket.socket | None = (
            None  # that connection: the frames' way, when there is one
        )
        self.channel = "attach"  # or "socket"
        self.disk_mib = disk_mib
        self.scratch: scratch.ScratchDisk | None = None
        # Go and C++ compile the function into the scratch space and run it from there.
        executable = environment is not None and environment.env_id in COMPILED_RUNTIMES
        # Python's output files are read from its disk by the host; the other languages' bootstraps send theirs.
        self._host_reads_outputs = environment is None or environment.env_id not in LANGUAGE_ENV_IDS
        space: dict[str, Any]
        if factory.scratch_problem:  # no loop devices here: tmpfs, counted against the memory limit
            options = f"rw,nosuid,nodev,size={disk_mib}m,uid=65534,gid=65534,mode=0700" + (
                ",exec" if executable else ""
            )
            space = {
                "tmpfs": {
                    "/tmp": "rw,nosuid,nodev,size=64m,mode=1777",
                    "/sandbox": options,
                    OUTPUT_MOUNT: options.replace(",exec", ""),
                }
            }
        else:
            try:
                self.scratch = factory.disk_room.make(
                    self.host_dir, disk_mib, executable=executable, evict_idle=evict_idle
                )
            except scratch.ScratchError as exc:
                shutil.rmtree(self.host_dir, ignore_errors=True)
                # said by /health, up, doctor
                log.debug("a %d MiB sandbox disk was refused: %s", disk_mib, exc)
                raise SandboxError(
                    "storage", f"{exc.tenant}; the sandbox was not started"
                ) from None
            # made before anything runs in it: no link to follow
            outputs = Path(self.scratch.work_dir) / "output"
            outputs.mkdir(mode=0o700)
            os.chown(outputs, scratch.SANDBOX_UID, scratch.SANDBOX_UID)
            space = {
                "mounts": [
                    docker.types.Mount("/sandbox", self.scratch.work_dir, type="bind"),
                    docker.types.Mount(OUTPUT_MOUNT, str(outputs), type="bind"),
                    docker.types.Mount("/tmp", self.scratch.tmp_dir, type="bind"),
                ]
            }
            channel = self._listen()
            if channel is not None:
                space["mounts"].append(
                    docker.types.Mount(CHANNEL_MOUNT, channel, type="bind", read_only=True)
                )
        # The owner's volumes: each one's directory on the host's mount of it, bound where the function asked; or,
        # in a stem cell, VOLUME_ROOT: the host binds a function's volumes under it when it is specialised.
        binds = [
            docker.types.Mount(m.target, m.source, type="bind", read_only=m.read_only)
            for m in (volumes.mounts if volumes is not None else [])
        ]
        if volumes is not None and binds:
            volumes.hold()
        # the host mounts (it is root): binds it makes later reach the container
        elif not factory.scratch_problem:
            self.volume_root = self.host_dir / "volumes"
            self.volume_root.mkdir(mode=0o755)
            try:
                shared_root(self.volume_root)
                binds = [
                    docker.types.Mount(
                        VOLUME_ROOT, str(self.volume_root), type="bind", propagation="rslave"
                    )
                ]
            except OSError as exc:
                log.debug(
                    "stem cells cannot take volumes here (%s): functions with volumes start their own",
                    exc,
                )
                self.volume_root = None
        space["mounts"] = [*space.get("mounts", []), *binds]
        try:
            self.container = self._create(environment, space, disk_mib)
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            # e.g. its image was removed since it was built: nothing of it may stay behind (disk, loop device, mount)
            if self._listener is not None:
                self._listener.close()
            if self.scratch is not None:
                self.scratch.close()
            self._unbind_volumes()
            if volumes is not None:
                volumes.release()
            shutil.rmtree(self.host_dir, ignore_errors=True)
            raise SandboxError(
                "crash", f"the Docker engine could not create the sandbox: {exc}"
            ) from None
        self._attach_and_start()

    def _listen(self) -> str | None:
        """Listen on ``channel/ch`` at the root of the sandbox's disk, made now, before anything runs on it: a
        directory of root's the sandbox cannot change, whose socket it may connect to. Returns the directory;
        None where it cannot be made (the frames then go through the engine)."""
        assert self.scratch is not None
        directory = Path(self.scratch.mountpoint) / "channel"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            directory.mkdir()
            directory.chmod(0o755)  # whatever this process's umask: uid 65534 enters it
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                # Through the directory's descriptor: a data dir's path may be longer than a socket address may be
                listener.bind(f"/proc/self/fd/{fd}/ch")
                os.chmod("ch", 0o666, dir_fd=fd)  # uid 65534 connects
            finally:
                os.close(fd)
            listener.listen(1)
        except OSError as exc:
            listener.close()
            log.warning(
                "sandbox %s: no channel socket (%s); frames go through the engine", self.id, exc
            )
            return None
        self._listener = listener
        return str(directory)

    def _create(
        self, environment: BuiltEnvironment | None, space: dict[str, Any], disk_mib: int
    ) -> docker.models.containers.Container:
        """The container, created but not started (its scratch space ``space`` made already)."""
        factory = self.factory
        return factory.client.containers.create(
            environment.image if environment is not None and environment.image else factory.image,
            name=f"nanogrid-{self.id}",
            stdin_open=True,
            user=SANDBOX_UID,
            read_only=True,
            **space,
            # The seed's functions write to /output itself: it is the output directory, also seen as /sandbox/output.
            environment={
                "NANOGRID_WORK_DIR": "/sandbox",
                "NANOGRID_OUTPUT_DIR": OUTPUT_MOUNT,
                "TMPDIR": "/tmp",
                "NANOGRID_CAPTURE_LIMIT": str(factory.limits.capture_bytes),
                "HOME": "/sandbox",
                "NANOGRID_DISK_MIB": str(disk_mib),
                # Large results are left on its disk for the host to read (not through the engine's stream).
                **(
                    {"NANOGRID_RESULT_FILE": RESULT_FILE}
                    if self.scratch is not None and self._host_reads_outputs
                    else {}
                ),
                **({"NANOGRID_CHANNEL": f"{CHANNEL_MOUNT}/ch"} if self._listener else {}),
            },
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            pids_limit=factory.pids_limit,
            mem_limit=f"{self.memory_mib}m",
            memswap_limit=f"{self.memory_mib}m",
            nano_cpus=int(factory.cpus * 1e9),
            network_mode="none",
            init=True,  # a tiny init as PID 1, so the bootstrap can be signalled (and can kill itself)
            # No log driver: stdout is the result channel. The engine's default (json-file) copies every byte of it
            # into a log file on the host, escaped as JSON: results came out at ~35 MB/s instead of ~220 MB/s, and
            # the file grew with every result and output file sent.
            log_config=docker.types.LogConfig(type="none"),
            labels={"nanogrid.sandbox": self.id, "nanogrid.grid": factory.grid_label},
        )

    def _attach_and_start(self) -> None:
        """Start the container and wait for its bootstrap's ready frame; on any failure, nothing of it is left."""
        factory, api = self.factory, self.factory.client.api
        try:
            # Attach before starting, so the bootstrap's first frame cannot be missed.
            self._socket = api.attach_socket(
                self.container.id, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1}
            )
            raw = getattr(self._socket, "_sock", self._socket)
            self._raw = raw
            self._stream = DockerAttachStream(raw)
            self.reader = FrameReader(
                raw.fileno(),
                self._stream.read_some,
                self._stream.pending,
                max_header=reply_header_cap(factory.limits.capture_bytes),
                read_into=self._stream.read_into,
            )
            self.container.start()
            deadline = time.monotonic() + START_TIMEOUT_S
            if self._listener is not None and self.container.labels.get(CHANNEL_LABEL) == "socket":
                self._take_channel(deadline)
            ready, _ = self.reader.read(deadline, 0)
            self.python = self.check_ready(ready)
        except (ChannelClosed, ChannelTimeout, docker.errors.APIError) as exc:
            said = (
                bytes(self._stream.stderr).decode(errors="replace")[-2000:]
                if hasattr(self, "_stream")
                else ""
            )
            self.close()
            raise SandboxError(
                "crash", f"the container's bootstrap did not start: {said or exc}"
            ) from None
        except BaseException:
            self.close()
            raise
        if self._listener is not None:  # nothing else may connect, now or later
            self._listener.close()
            self._listener = None
        self.cgroup = MemoryCgroup.of_container(self.container.id)
        # its init and bootstrap, not the function's processes; and its freezer (`docker pause`)
        self._watch = cgroup.Watch(cgroup.container_pids(self.container.id), self.container.id)

    def _take_channel(self, deadline: float) -> None:
        """Accept the bootstrap's connection (the first and only one: no function has run yet), watching the
        attach stream meanwhile for the container's end; the frames then go through it."""
        assert self._listener is not None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChannelTimeout("the bootstrap did not connect to its channel")
            if protocol.readable(self._listener.fileno(), min(left, 0.05)):
                break
            if protocol.readable(self._raw.fileno(), 0) and not self._stream.read_pending():
                while self._stream.read_some(1 << 16):  # what it said on stderr, for the error
                    pass
                raise ChannelClosed("the container ended before its bootstrap connected")
        conn, _ = self._listener.accept()
        conn.setblocking(True)
        self._channel = conn
        self.channel = "socket"
        self.reader = FrameReader(
            conn.fileno(), max_header=reply_header_cap(self.factory.limits.capture_bytes)
        )

    @property
    def alive(self) -> bool:
        return (
            not self._closed
            and self._kill_reason is None
            and not self._channel_ended()
            and not self.frozen()
        )

    def frozen(self) -> bool:
        return self._watch.container_frozen() or self._watch.stopped()

    def _channel_ended(self) -> bool:
        """True once the attach socket has reached its end: the container stopped or was removed, or the engine
        restarted. A poll and a peek (microseconds), never a call to the engine."""
        try:
            return (
                protocol.readable(self._raw.fileno(), 0)
                and self._raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
            )
        except BlockingIOError:
            return False
        except (OSError, ValueError):  # reset, or already closed
            return True

    def load(
        self, function_id: str, package: bytes, memory_mib: int, env: dict[str, str] | None = None
    ) -> None:
        # stem cells start with a default; the function sets its own
        if memory_mib != self.memory_mib:
            try:
                # In the container's cgroup straight away (microseconds); through the engine only where this
                # process cannot write it (tens of milliseconds)
                if self.cgroup is not None:
                    self.cgroup.set_limit(memory_mib << 20)
                else:
                    self.container.update(
                        mem_limit=f"{memory_mib}m", memswap_limit=f"{memory_mib}m"
                    )
            except (OSError, docker.errors.APIError):
                self.close()
                raise SandboxError("memory", too_little_memory(memory_mib)) from None
            self.memory_mib = memory_mib
        # The file size limit: the disk itself bounds files in /tmp; output files are capped when they are sent.
        file_limit = max(self.limits.output_bytes, self.disk_mib << 20)
        self.load_package(
            function_id,
            {"op": "load", "max_output_bytes": file_limit, "env": env or {}},
            package,
            env,
            START_TIMEOUT_S,
        )

    def bind_volumes(self, volumes: VolumeSet) -> None:
        """Bind the owner's volumes under this stem cell's VOLUME_ROOT (they appear in the running container at once,
        by mount propagation, read-only ones read-only): a function with volumes specialises a stem cell like any
        other, without starting a container of its own."""
        if (
            self.volume_root is None
            or self.volumes is not None
            or not self.factory.takes_volumes(volumes)
        ):
            self.close()  # as a stem cell that died: the pool starts a sandbox of its own for the function
            raise SandboxError("crash", "this stem cell cannot be given volumes")
        self.volumes = volumes
        volumes.hold()
        try:
            for mount in volumes.mounts:
                target = self.volume_root.joinpath(
                    *Path(mount.target).relative_to(VOLUME_ROOT).parts
                )
                # the host's own directories: no link to follow
                target.mkdir(mode=0o755, parents=True, exist_ok=True)
                bind(mount.source, target)
        except OSError as exc:
            self.close()
            raise SandboxError(
                "volume",
                f"the grid could not bind the function's volumes ({os.strerror(exc.errno or 0)})",
            ) from None

    def _unbind_volumes(self) -> None:
        """Let go of VOLUME_ROOT and every volume bound under it (lazily: the container may still hold them)."""
        if self.volume_root is not None:
            root = str(self.volume_root.resolve())
            # A volume bound at VOLUME_ROOT itself sits on the shared mount: both go (a bind of a directory on the
            # same filesystem is not seen by os.path.ismount, so the mount table says when it is done).
            for _ in range(3):
                if root not in scratch.mounted_under(self.host_dir):
                    break
                scratch._libc.umount2(root.encode(), scratch.MNT_DETACH)
            if root in scratch.mounted_under(self.host_dir):
                log.warning(
                    "sandbox %s: its volume root is still mounted; its directory is kept", self.id
                )
                self._keep_dir = True
            self.volume_root = None

    def _receive_outputs(self) -> list[str]:
        """The call's output files, read by the host straight from the sandbox's own disk (through the same checks
        and caps as files sent over the channel, which is several times slower through the engine's attach stream)."""
        if self.scratch is None or not self._host_reads_outputs:
            return super()._receive_outputs()
        writer = OutputWriter(self.output_dir, self.limits.output_bytes, self.limits.output_files)
        return read_tree(self.scratch.mountpoint, ("work", "output"), writer)

    def _receive_result(
        self, job_id: str, size: int, deadline: float, in_file: bool = False
    ) -> tuple[Path, str]:
        """A large result the bootstrap left on the sandbox's disk, read by the host (a regular file of exactly the
        announced size, opened without following links), hashed and spooled as a streamed one is; then removed."""
        if not in_file or self.scratch is None or not self._host_reads_outputs:
            return super()._receive_result(job_id, size, deadline, in_file)
        path = self.output_dir.with_name(f"{self.output_dir.name}.{job_id}.result")
        work = source = -1
        # the host's own file: its errors (a full disk) are the host's, raised as they are
        spool = _Spool(path)
        try:
            try:
                work = self.scratch.open_work()
                source = os.open(
                    RESULT_FILE,
                    os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                    dir_fd=work,
                )
                info = os.fstat(source)
            except OSError:
                raise ProtocolViolation("a result file the host could not open") from None
            if not stat.S_ISREG(info.st_mode) or info.st_size != size:
                raise ProtocolViolation(
                    "a result file that is not a regular file of its announced size"
                )
            received = 0
            while received < size:
                buffer = spool.free_buffer()
                try:
                    got = os.readv(source, [memoryview(buffer)[: size - received]])
                except OSError:
                    raise ProtocolViolation("a result file the host could not read") from None
                if not got:
                    raise ProtocolViolation("a result file shorter than its announced size")
                received += got
                spool.write(buffer, memoryview(buffer)[:got])
            os.unlink(RESULT_FILE, dir_fd=work)  # its space is the sandbox's again
            return path, spool.finish()
        except BaseException:
            spool.finish(abort=True)
            path.unlink(missing_ok=True)
            raise
        finally:
            for fd in (source, work):
                if fd >= 0:
                    os.close(fd)

    def _send_blob(self, path: Path) -> None:
        """A blob written by the host into the sandbox's working directory (a new file, created without following
        any link), then named to the bootstrap, which reads and removes it; over the channel where the sandbox
        has no disk of its own, or its disk has no room for it."""
        size = path.stat().st_size
        if self.scratch is None or not self._host_reads_outputs or size < BLOB_FILE_OVER:
            return super()._send_blob(path)
        name = BLOB_FILE_PREFIX + uuid.uuid4().hex
        work = self.scratch.open_work()
        try:
            try:
                target = os.open(
                    name,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o644,
                    dir_fd=work,
                )
                try:
                    # readable by the sandbox's user (the grid's umask is 077)
                    os.fchmod(target, 0o644)
                    with path.open("rb") as source:
                        offset = 0
                        while offset < size:
                            sent = os.sendfile(target, source.fileno(), offset, size - offset)
                            if not sent:
                                raise OSError(errno.EIO, "the blob file ended early")
                            offset += sent
                finally:
                    os.close(target)
            # no room on its disk (or the sandbox got in the way): the channel instead
            except OSError:
                try:
                    os.unlink(name, dir_fd=work)
                except OSError:
                    pass
                return super()._send_blob(path)
        finally:
            os.close(work)
        self._send({"op": "blob_file", "name": name})

    def _send(self, header: dict, body: bytes = b"") -> None:
        try:
            (self._channel or self._raw).sendall(encode_frame(header, body))
        except OSError:
            raise self._death() from None

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
            return SandboxError(
                "memory",
                f"out of memory (limit {self.memory_mib} MiB"
                + (
                    "; files in /tmp and the output directory count against it on this grid)"
                    if self.scratch is None
                    else ")"
                ),
            )
        return SandboxError(
            "crash",
            f"the sandbox died (exit code {state.get('ExitCode', '?')}) while running the function",
        )

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
        self._unbind_volumes()  # before anything below may remove its directory: never a walk into a volume
        if self.volumes is not None:
            self.volumes.release()  # the container's binds go with it (removed below); the volume stays mounted
        if self.cgroup:
            self.cgroup.remove()
            self.cgroup = None
        self._watch.close()
        for sock in (self._channel, self._listener, getattr(self, "_socket", None)):
            try:
                if sock is not None:
                    sock.close()
            except OSError:
                pass
        # Removal takes ~50 ms of engine time: off the path of the job that is finishing.
        self.factory.remove_later(self.container)
        if self.scratch is not None:
            self.scratch.close()  # the kernel lets go of the disk once the container is gone
            if os.path.ismount(self.scratch.mountpoint):
                return  # never walk into it: the next sweep unmounts it
        if not self._keep_dir:
            shutil.rmtree(self.host_dir, ignore_errors=True)


def _remove(container: docker.models.containers.Container) -> None:
    try:
        container.remove(force=True)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as exc:
        # 409: its removal is already under way (a sweep and a close at once)
        if exc.status_code != 409:
            log.warning("could not remove container %s: %s", container.id[:12], exc)
    except docker.errors.DockerException as exc:
        log.warning("could not remove container %s: %s", container.id[:12], exc)
