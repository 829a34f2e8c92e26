"""A sandbox's own disk: its working directory, output directory and /tmp on a filesystem of their own.

Memory-backed scratch (tmpfs) counts every byte a function writes against its memory limit: a
1 GiB file would need 1 GiB of memory. Instead each Docker sandbox gets a fresh ext4 filesystem
in a sparse file in its own directory under the grid's sandbox directory, attached to a loop
device with direct I/O (so written pages are not cached a second time on the host) and mounted
with nosuid, nodev and, unless the runtime compiles code, noexec. Its size is the function's
``disk=`` quota: a full disk is ENOSPC inside that sandbox and nowhere else. Pages the function
writes sit in its memory cgroup only until they are written back (they are reclaimable, unlike
tmpfs pages), so a file larger than the memory limit can be written.

The container sees two directories of it, bound at ``/sandbox`` (work and output files) and ``/tmp``;
no host directory or file is ever visible to it, and the filesystem's root (the host's) is not. The host
reads only the output directory, without following links (``outputs.read_tree``), and removing the disk
is a lazy unmount, a loop detach (deferred by the kernel until the container lets go) and one unlink:
never a walk through a tree the function built.

Needs root, loop devices, ``mkfs.ext4`` and ``losetup`` next to a local Docker engine. Where they are
missing (rootless engines, Docker Desktop) ``unavailable()`` says why and the grid falls back to
memory-backed tmpfs of the same size, saying so at start.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

SANDBOX_UID = 65534  # nobody: the user every sandbox runs as
DISK_FILE, MOUNT_DIR = "disk.img", "disk"
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_NOATIME = 0x2, 0x4, 0x8, 0x400
MNT_DETACH = 0x2
LOOP_CLR_FD = 0x4C01
_libc = ctypes.CDLL(None, use_errno=True)
# kept free on the worker's disk for the grid's own data, whatever sandboxes write
HOST_RESERVE_BYTES = 1 << 30


class ScratchError(Exception):
    """The scratch disk could not be made (the host's disk is full, say): the sandbox does not start.

    ``str()`` is for the grid's operator; ``tenant`` is what the caller is told (never the host's free space)."""

    def __init__(self, message: str, tenant: str = "") -> None:
        super().__init__(message)
        self.tenant = tenant or message


def unavailable() -> str:
    """Why sandboxes cannot have disk-backed scratch on this machine ('' when they can)."""
    if os.geteuid() != 0:
        return "the grid does not run as root (loop devices need it)"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices (/dev/loop-control)"
    missing = [tool for tool in ("mkfs.ext4", "losetup") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (Debian: e2fsprogs, mount)"
    return ""


def probe(directory: Path) -> str:
    """Make and remove a small scratch disk: '' if that works here, else why not (said once, at start)."""
    reason = unavailable()
    if reason:
        return reason
    probe_dir = directory / "scratch-probe"
    shutil.rmtree(probe_dir, ignore_errors=True)
    probe_dir.mkdir(mode=0o700, parents=True)
    try:
        ScratchDisk(probe_dir, 16).close()
        return ""
    except ScratchError as exc:
        return str(exc)
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)


class ScratchDisk:
    """One sandbox's filesystem of ``size_mib`` MiB in ``directory`` (the sandbox's own host directory)."""

    def __init__(self, directory: Path, size_mib: int, *, executable: bool = False) -> None:
        self.size_mib = size_mib
        self.image = directory / DISK_FILE
        self.mountpoint = directory / MOUNT_DIR
        self.device = ""
        self._mounted = False
        self.on_close: Callable[[], None] | None = None
        try:
            fd = os.open(self.image, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                # sparse: blocks are taken only as the function writes
                os.ftruncate(fd, size_mib << 20)
            finally:
                os.close(fd)
            # No journal: nothing on it outlives the sandbox. Its root stays root's; the sandbox gets two directories.
            _run(
                "mkfs.ext4",
                "-q",
                "-F",
                "-m",
                "0",
                "-O",
                "^has_journal",
                "-E",
                "nodiscard,root_owner=0:0",
                str(self.image),
            )
            self.device = _run(
                "losetup", "--find", "--show", "--direct-io=on", str(self.image)
            ).strip()
            self.mountpoint.mkdir(mode=0o700)
            flags = MS_NOSUID | MS_NODEV | MS_NOATIME | (0 if executable else MS_NOEXEC)
            if (
                _libc.mount(
                    self.device.encode(), str(self.mountpoint).encode(), b"ext4", flags, None
                )
                != 0
            ):
                raise ScratchError(
                    f"could not mount the scratch disk: {os.strerror(ctypes.get_errno())}"
                )
            self._mounted = True
            for name, mode in (("work", 0o700), ("tmp", 0o1777)):
                path = self.mountpoint / name
                path.mkdir()
                os.chown(path, SANDBOX_UID, SANDBOX_UID)
                path.chmod(mode)
        except (OSError, subprocess.SubprocessError) as exc:
            self.close()
            raise ScratchError(
                f"could not make the sandbox's {size_mib} MiB scratch disk ({exc})"
            ) from None
        except ScratchError:
            self.close()
            raise

    @property
    def work_dir(self) -> str:
        return str(self.mountpoint / "work")

    @property
    def tmp_dir(self) -> str:
        return str(self.mountpoint / "tmp")

    def open_work(self) -> int:
        """A descriptor of the sandbox's working directory, reached without following links (the host creates and
        reads files there only relative to it, with ``O_NOFOLLOW``)."""
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        root = os.open(self.mountpoint, flags)
        try:
            return os.open("work", flags, dir_fd=root)
        finally:
            os.close(root)

    def may_grow(self) -> int:
        """Bytes its sparse file may still take on the host's disk."""
        try:
            return max(0, (self.size_mib << 20) - os.stat(self.image).st_blocks * 512)
        except OSError:
            return 0

    def close(self) -> None:
        """Unmount (lazily: the container may still hold it), detach and delete; safe to call twice."""
        if self.on_close is not None:
            self.on_close()
            self.on_close = None
        if self._mounted:
            _libc.umount2(str(self.mountpoint).encode(), MNT_DETACH)
            self._mounted = False
        if self.device:
            _detach(self.device)
            self.device = ""
        self.image.unlink(missing_ok=True)
        try:
            self.mountpoint.rmdir()
        except OSError:
            pass


class DiskRoom:
    """The host's room for sandbox disks. They are sparse, so each may still grow to its size: a new one is made
    only while the host's free space covers what all of them may still take, plus a reserve for the grid's own
    data (registry, store, results). Filling every sandbox disk at once therefore never fills the host's.

    Idle sandboxes keep their disks, and so their room. A call that needs a disk the host has no room for first
    has the warm pool stop idle sandboxes, least recently used first and whoever's they are (``reclaim``), when
    that can make room at all; only then is it refused."""

    def __init__(self, directory: Path, reserve: int = HOST_RESERVE_BYTES) -> None:
        self.directory, self.reserve = directory, reserve
        self._disks: set[ScratchDisk] = set()
        self._lock = threading.Lock()
        # Set by the warm pool: bytes its idle sandboxes' disks hold in promises, and a way to stop the least
        # recently used of them (False when none is idle).
        self.reclaimable: Callable[[], int] = lambda: 0
        self.reclaim: Callable[[], bool] = lambda: False
        # Set by the grid: bytes others on the same disk may still take (the owners' volumes, sparse too).
        self.also_promised: Callable[[], int] = lambda: 0

    def make(
        self, directory: Path, size_mib: int, *, executable: bool = False, evict_idle: bool = False
    ) -> ScratchDisk:
        """A new disk; ``evict_idle``: idle sandboxes make room for it if they can (a call's disk,
        not a stem cell's)."""
        while True:
            with self._lock:
                short = self._short_by(size_mib)
                if not short:
                    disk = ScratchDisk(directory, size_mib, executable=executable)
                    self._disks.add(disk)
                    break
            if not (evict_idle and short <= self.reclaimable() and self.reclaim()):
                raise ScratchError(
                    self.shortfall(size_mib) or "the host's disk filled meanwhile",
                    tenant=(
                        f"this worker has no room for a {size_mib} MiB sandbox disk now: ask for a smaller one "
                        "(@remote(disk=MiB)), or try again once other calls have finished"
                    ),
                )
        disk.on_close = lambda: self._forget(disk)
        return disk

    def shortfall(self, size_mib: int, evicting_idle: bool = False) -> str:
        """'' when a new disk of ``size_mib`` fits now (``evicting_idle``: once idle sandboxes gave up their room);
        else why not, with the host's numbers (for the operator)."""
        with self._lock:
            short = self._short_by(size_mib)
        if not short or (evicting_idle and short <= self.reclaimable()):
            return ""
        may_grow, volumes = self.promised(), self.also_promised()
        free = shutil.disk_usage(self.directory).free
        return (
            f"the worker's disk has {free >> 20} MiB free: too little for another {size_mib} MiB sandbox disk "
            f"beside the {may_grow >> 20} MiB its other sandboxes may still fill"
            + (f", the {volumes >> 20} MiB volumes may still fill" if volumes else "")
            + f" and the {self.reserve >> 20} MiB kept for the grid itself"
        )

    def promised(self) -> int:
        """Bytes the sandbox disks made here may still take on the host's disk (they are sparse)."""
        with self._lock:
            return sum(disk.may_grow() for disk in self._disks)

    def _short_by(self, size_mib: int) -> int:
        """Bytes missing for a new disk of ``size_mib`` (0: it fits); call with the lock."""
        may_grow = sum(disk.may_grow() for disk in self._disks) + self.also_promised()
        return max(
            0, may_grow + (size_mib << 20) + self.reserve - shutil.disk_usage(self.directory).free
        )

    def _forget(self, disk: ScratchDisk) -> None:
        with self._lock:
            self._disks.discard(disk)


def sweep(directory: Path) -> int:
    """Unmount and detach the scratch disks of sandboxes under ``directory`` that a crashed grid left; how many.

    Called before their directories are removed, so removal never walks into a mounted filesystem.
    """
    root = str(directory.resolve()) + "/"
    count = 0
    try:
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split()[4] for line in f]
    except OSError:
        mounts = []
    for mountpoint in sorted(mounts, reverse=True):  # deepest first
        if mountpoint.startswith(root):
            _libc.umount2(mountpoint.encode(), MNT_DETACH)
            count += 1
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            path = backing.read_text().strip().removesuffix(" (deleted)")
        except OSError:
            continue
        if path.startswith(root):
            _detach("/dev/" + backing.parent.parent.name)
            count += 1
    return count


def mounted_under(directory: Path) -> list[str]:
    """Scratch disks still mounted under ``directory`` (what `nanogrid doctor` reports)."""
    root = str(directory.resolve()) + "/"
    try:
        with open("/proc/self/mountinfo") as f:
            return sorted(p for p in (line.split()[4] for line in f) if p.startswith(root))
    except OSError:
        return []


def _detach(device: str) -> None:
    """Detach a loop device; the kernel defers it (autoclear) while a container still has it mounted."""
    try:
        fd = os.open(device, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.ioctl(fd, LOOP_CLR_FD)
    except OSError:
        pass  # already detached
    finally:
        os.close(fd)


def _run(*command: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise ScratchError(f"{command[0]} failed: {(done.stderr or done.stdout).strip()[:300]}")
    return done.stdout
