"""Volumes: an owner's named filesystems that outlive calls, mounted into that owner's sandboxes.

Each volume is an ext4 filesystem in a sparse file of its own (``size_mib``: a full volume is ENOSPC for whoever
writes to it, and for nothing else), made and loop-mounted by the host the way sandbox scratch disks are
(``sandbox/scratch.py``'s helpers), once per grid, under ``<data dir>/volumes/<owner digest>/``. Sandboxes get its
``data`` directory bind-mounted at the path the function named (read-only when asked): every sandbox of the owner that
mounts it sees the one filesystem, so a write is visible to the others as soon as it is made (POSIX semantics on one
kernel, no commit or reload; two writers of one file interleave as they would on a laptop, and ``fcntl``/``flock``
locks work across sandboxes).

The host never trusts what is on a volume: sandboxes wrote it. ``put``, ``get``, ``listdir`` and ``remove`` reach
every file from the volume's root descriptor, one component at a time with ``O_NOFOLLOW`` (``openat``), take only
regular files and directories, and replace a file by renaming a new one over its name (a planted link is replaced,
never followed). Nothing is ever unpacked on the host.

Names are per owner: another owner's "datasets" is another volume, and an owner who names one it does not have
gets 404, whoever else has one of that name.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanogrid_backend.registry.base import VolumeRegistry
from nanogrid_backend.sandbox import scratch
from nanogrid_backend.sandbox.scratch import (
    MNT_DETACH,
    MS_NOATIME,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    SANDBOX_UID,
    ScratchError,
)
from nanogrid_contract.errors import NanoGridError
from nanogrid_contract.volumes import check_mount_path, check_volume_name, check_volume_path

MIN_VOLUME_MIB, DEFAULT_VOLUME_MIB = 16, 1024
MAX_VOLUMES_PER_FUNCTION = 8
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_SHARED = 0x1, 0x20, 0x1000, 1 << 20
COPY_CHUNK = 1 << 30
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_libc = ctypes.CDLL(None, use_errno=True)


class VolumeError(NanoGridError):
    """A volume request the grid refuses; ``status`` is the HTTP status that fits."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class VolumeMount:
    """One volume as a function's sandbox sees it: ``source`` (the host's directory) bound at ``target``."""

    name: str
    source: str
    target: str
    read_only: bool


def requested(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The volumes a function's manifest asks for (``[{"name", "path", "read_only"}]``), checked: VolumeError if not."""
    wanted = manifest.get("volumes") or []
    if not isinstance(wanted, list) or len(wanted) > MAX_VOLUMES_PER_FUNCTION:
        raise VolumeError(f"a function mounts at most {MAX_VOLUMES_PER_FUNCTION} volumes")
    seen: set[str] = set()
    for entry in wanted:
        if not isinstance(entry, dict) or not isinstance(entry.get("read_only", False), bool):
            raise VolumeError("a volume entry of the manifest is not {name, path, read_only}")
        try:
            check_volume_name(entry.get("name"))
            check_mount_path(entry.get("path"))
        except ValueError as exc:
            raise VolumeError(str(exc)) from None
        if any(
            entry["path"] == p
            or entry["path"].startswith(p + "/")
            or p.startswith(entry["path"] + "/")
            for p in seen
        ):
            raise VolumeError(f"two volumes mounted at or inside {entry['path']}")
        seen.add(entry["path"])
    return wanted


def owner_digest(owner: str) -> str:
    """Where an owner's volumes live (a folder on the host, a prefix in S3): a hash, never the name itself."""
    return hashlib.sha256(owner.encode()).hexdigest()[:24]


def check_size(size_mib: object, max_volume_mib: int) -> int:
    """A volume's size as asked (None: DEFAULT_VOLUME_MIB), within the grid's bounds: VolumeError 422 if not."""
    size_mib = DEFAULT_VOLUME_MIB if size_mib is None else size_mib
    if (
        isinstance(size_mib, bool)
        or not isinstance(size_mib, int)
        or not MIN_VOLUME_MIB <= size_mib <= max_volume_mib
    ):
        raise VolumeError(
            f"size_mib is a whole number of MiB from {MIN_VOLUME_MIB} to {max_volume_mib}, "
            f"not {size_mib!r}",
            422,
        )
    return size_mib


def new_record(
    registry: Any, owner: str, name: str, size_mib: int, owner_volume_mib: int
) -> dict[str, Any] | None:
    """The record of a volume about to be made, or None when it exists with that size already; VolumeError when it
    exists with another size (409) or the owner's volumes would hold more than ``owner_volume_mib`` (413)."""
    earlier = registry.get_volume(owner, name)
    if earlier is not None:
        if earlier["size_mib"] != size_mib:
            raise VolumeError(
                f"volume {name!r} exists with {earlier['size_mib']} MiB; a volume keeps its "
                "size (remove it and make it again, or use another name)",
                409,
            )
        return None
    held = sum(v["size_mib"] for v in registry.list_volumes(owner))
    if held + size_mib > owner_volume_mib:
        raise VolumeError(
            f"your volumes hold {held} MiB of your {owner_volume_mib} MiB; a {size_mib} MiB "
            f"volume does not fit: remove one (`nanogrid volumes rm NAME`) or ask for less",
            413,
        )
    return {"owner": owner, "name": name, "size_mib": size_mib, "created_at": time.time()}


class VolumeSet:
    """The volumes one sandbox binds; it holds them (``hold``) from its start to its close (``release``), and a
    volume is not removed while held."""

    def __init__(self, store: VolumeStore, owner: str, mounts: list[VolumeMount]) -> None:
        self.store, self.owner, self.mounts = store, owner, mounts
        self._held = False

    def hold(self) -> None:
        if not self._held:
            self._held = True
            self.store._use(self.owner, [m.name for m in self.mounts], +1)

    def release(self) -> None:
        if self._held:
            self._held = False
            self.store._use(self.owner, [m.name for m in self.mounts], -1)

    def names(self) -> dict[str, str]:
        """Mount path -> volume name: what the sandbox's bootstrap names when a volume fills up."""
        return {m.target: m.name for m in self.mounts}

    def before_call(self) -> None:
        """A call that binds these volumes is about to run. Here nothing is left to do: every sandbox of the owner
        sees the one filesystem. (In AWS mode the worker brings its copy up to date: ``volume_sync.py``.)"""

    def after_call(self) -> None:
        """A call that binds these volumes has ended (before its outcome is recorded). Nothing to do here either.
        (In AWS mode the worker uploads what the call changed.)"""


class _Mounted:
    """A volume's filesystem as the host holds it: its loop device, its mount point, the sandboxes using it."""

    def __init__(self, device: str, mountpoint: Path, read_only: Path) -> None:
        self.device, self.mountpoint, self.users = device, mountpoint, 0
        self.read_only = read_only  # its data directory bound read-only: what read-only mounts bind (flags included)


class VolumeStore:
    """The volumes of one grid (embedded: this machine's data dir; its registry holds their records)."""

    def __init__(
        self,
        directory: Path,
        registry: Any,
        uid: int = SANDBOX_UID,
        *,
        max_volume_mib: int = 256 << 10,
        owner_volume_mib: int = 512 << 10,
    ) -> None:
        self.directory = directory
        self.max_volume_mib, self.owner_volume_mib = (
            max_volume_mib,
            owner_volume_mib,
        )  # the grid's settings
        self.registry = registry
        self.uid = uid  # who sandboxes run as: the owner of what the host puts on a volume (so functions may change it)
        # Set by the grid: stops the warm pool's idle sandboxes a predicate picks (WarmPool.stop_idle)
        self.stop_idle: Callable[[Callable[[Any], bool]], int] | None = None
        # Set by the grid: bytes sandbox disks on the same host disk may still take (``scratch.DiskRoom.promised``)
        self.also_promised: Callable[[], int] = lambda: 0
        self.problem = scratch.unavailable() or (
            "" if isinstance(registry, VolumeRegistry) else "this grid's registry keeps no volumes"
        )
        self._lock = threading.RLock()
        self._mounted: dict[tuple[str, str], _Mounted] = {}
        if not self.problem:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            scratch.sweep(directory)  # mounts and loop devices a crashed grid left; the images stay

    # records
    def create(self, owner: str, name: str, size_mib: int | None) -> dict[str, Any]:
        """Make the volume (an empty filesystem) of ``size_mib`` (None: DEFAULT_VOLUME_MIB) unless it exists; an
        existing one is returned as it is, unless another size was named."""
        self._usable()
        name = checked_name(name)
        with self._lock:
            earlier = self.registry.get_volume(owner, name)
        if earlier is not None and size_mib is None:
            return self.describe(owner, earlier)
        size_mib = check_size(size_mib, self.max_volume_mib)
        with self._lock:
            record = new_record(self.registry, owner, name, size_mib, self.owner_volume_mib)
            if record is None:
                return self.describe(owner, self.registry.get_volume(owner, name))
            self._check_host_room(size_mib)
            self._make_image(owner, name, size_mib)
            self.registry.put_volume(record)
            return self.describe(owner, record)

    def get(self, owner: str, name: str) -> dict[str, Any]:
        return self.describe(owner, self._record(owner, name))

    def list_volumes(self, owner: str) -> list[dict[str, Any]]:
        return (
            [self.describe(owner, record) for record in self.registry.list_volumes(owner)]
            if not self.problem
            else []
        )

    def delete(self, owner: str, name: str) -> dict[str, Any]:
        """Remove the volume and everything on it; refused while a sandbox has it mounted."""
        record = self._record(owner, name)
        # idle sandboxes keep nothing worth a refusal: they are stopped
        if self.stop_idle is not None:
            self.stop_idle(lambda sandbox: _holds(sandbox, owner, record["name"]))
        with self._lock:
            mounted = self._mounted.get((owner, record["name"]))
            if mounted is not None and mounted.users:
                raise VolumeError(
                    f"volume {name!r} is mounted in {mounted.users} sandbox(es) running calls of yours; "
                    "try again once they have finished",
                    409,
                )
            self._unmount(owner, record["name"])
            self._image(owner, record["name"]).unlink(missing_ok=True)
            self.registry.delete_volume(owner, record["name"])
            return {**record, "used_bytes": 0}

    def describe(self, owner: str, record: dict[str, Any]) -> dict[str, Any]:
        """The record with ``used_bytes``: blocks its file takes on the host (what the volume's files fill)."""
        try:
            used = os.stat(self._image(owner, record["name"])).st_blocks * 512
        except OSError:
            used = 0
        return {
            "name": record["name"],
            "size_mib": record["size_mib"],
            "created_at": record["created_at"],
            "used_bytes": used,
        }

    # sandboxes
    def attach(self, owner: str, wanted: list[dict[str, Any]]) -> VolumeSet:
        """Mount what a function's manifest asks for (each volume mounted once per grid, bound into each sandbox):
        VolumeError naming a volume the owner does not have. A sandbox that binds them holds the set while it lives."""
        self._usable()
        mounts: list[VolumeMount] = []
        for entry in requested({"volumes": wanted}):
            with self._lock:
                if self.registry.get_volume(owner, entry["name"]) is None:
                    raise VolumeError(
                        f"the function mounts volume {entry['name']!r}, which you do not have: make "
                        f"it with nanogrid.Volume({entry['name']!r}, size_mib=...)",
                        404,
                    )
                held = self._mount(owner, entry["name"])
            read_only = bool(entry.get("read_only", False))
            mounts.append(
                VolumeMount(
                    entry["name"],
                    str(held.read_only if read_only else held.mountpoint / "data"),
                    entry["path"],
                    read_only,
                )
            )
        return self._volume_set(owner, mounts)

    def _volume_set(self, owner: str, mounts: list[VolumeMount]) -> VolumeSet:
        return VolumeSet(self, owner, mounts)

    def _use(self, owner: str, names: list[str], change: int) -> None:
        with self._lock:
            for name in names:
                held = self._mounted.get((owner, name))
                if held is not None:
                    held.users = max(0, held.users + change)

    # files, reached by the host without following links
    def put(self, owner: str, name: str, path: str, source: Path) -> int:
        """Copy the host's file ``source`` to ``path`` on the volume (a new file renamed over whatever was there,
        directories made as needed); its size. VolumeError 507 naming the volume when it is full."""

        def fill(target: int) -> None:
            with source.open("rb") as f:
                size, offset = os.fstat(f.fileno()).st_size, 0
                while offset < size:
                    sent = os.sendfile(target, f.fileno(), offset, min(size - offset, COPY_CHUNK))
                    if not sent:
                        raise OSError(errno.EIO, "the upload ended early")
                    offset += sent

        return self.replace(owner, name, path, fill).st_size

    def replace(
        self, owner: str, name: str, path: str, fill: Callable[[int], None]
    ) -> os.stat_result:
        """Write ``path`` on the volume as ``fill`` writes the descriptor it is given, into a new file renamed over
        whatever was there (a link there is replaced, never followed; directories made as needed); the new file's
        status. VolumeError 507 naming the volume when it is full, 409 when ``path`` is a directory."""
        parts = checked_parts(path)
        with self._root(owner, name) as root:
            parent = _walk(root, parts[:-1], create=self.uid)
            temporary = f".nanogrid-put-{uuid.uuid4().hex}"
            try:
                target = os.open(
                    temporary,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o644,
                    dir_fd=parent,
                )
                try:
                    os.fchown(target, self.uid, self.uid)  # the owner's functions may change it
                    fill(target)
                    os.fsync(target)
                finally:
                    os.close(target)
                # a link there is replaced
                os.rename(temporary, parts[-1], src_dir_fd=parent, dst_dir_fd=parent)
                return os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
            except OSError as exc:
                try:
                    os.unlink(temporary, dir_fd=parent)
                except OSError:
                    pass
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise VolumeError(
                        f"volume {name!r} is full ({self._record(owner, name)['size_mib']} MiB): "
                        "remove files from it or use a larger volume",
                        507,
                    ) from None
                if exc.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                    raise VolumeError(f"{path!r} is a directory on volume {name!r}", 409) from None
                raise
            finally:
                os.close(parent)

    def open_file(self, owner: str, name: str, path: str) -> tuple[int, int]:
        """A descriptor of a regular file on the volume and its size, fixed now (the caller closes it)."""
        parts = checked_parts(path)
        with self._root(owner, name) as root:
            parent = _walk(root, parts[:-1])
            try:
                fd = os.open(
                    parts[-1],
                    os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                    dir_fd=parent,
                )
            except FileNotFoundError:
                raise VolumeError(f"no file {path!r} on volume {name!r}", 404) from None
            except OSError:
                raise VolumeError(
                    f"{path!r} on volume {name!r} is not a regular file", 409
                ) from None
            finally:
                os.close(parent)
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                os.close(fd)
                raise VolumeError(f"{path!r} on volume {name!r} is not a regular file", 409)
            return fd, info.st_size

    def listdir(self, owner: str, name: str, path: str = "") -> list[dict[str, Any]]:
        """The entries of a directory on the volume: name, kind (file, dir, link, other) and size."""
        parts = checked_parts(path) if path.strip("/") else []
        with self._root(owner, name) as root:
            directory = _walk(root, parts)
            try:
                entries: list[dict[str, Any]] = []
                with os.scandir(directory) as found:
                    for entry in found:
                        if entry.name.startswith(".nanogrid-put-"):
                            continue  # a put under way
                        info = entry.stat(follow_symlinks=False)
                        kind = (
                            "dir"
                            if stat.S_ISDIR(info.st_mode)
                            else "file"
                            if stat.S_ISREG(info.st_mode)
                            else "link"
                            if stat.S_ISLNK(info.st_mode)
                            else "other"
                        )
                        entries.append(
                            {
                                "name": entry.name,
                                "kind": kind,
                                "size": info.st_size if kind == "file" else 0,
                                "modified": info.st_mtime,
                            }
                        )
                return sorted(entries, key=lambda e: e["name"])
            finally:
                os.close(directory)

    def remove(self, owner: str, name: str, path: str) -> None:
        """Remove a file, link or directory (with what is in it) from the volume; links are removed, not followed."""
        parts = checked_parts(path)
        with self._root(owner, name) as root:
            parent = _walk(root, parts[:-1])
            try:
                info = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
                if stat.S_ISDIR(info.st_mode):
                    # fd-based on Linux: never follows a link it finds
                    shutil.rmtree(parts[-1], dir_fd=parent)
                else:
                    os.unlink(parts[-1], dir_fd=parent)
            except FileNotFoundError:
                raise VolumeError(f"no {path!r} on volume {name!r}", 404) from None
            finally:
                os.close(parent)

    def close(self) -> None:
        """Unmount every volume (the grid stops); their images stay for the next start."""
        with self._lock:
            for owner, name in list(self._mounted):
                self._unmount(owner, name)

    # inside
    def _usable(self) -> None:
        if self.problem:
            raise VolumeError(f"this grid cannot keep volumes: {self.problem}", 503)

    def _record(self, owner: str, name: str) -> dict[str, Any]:
        self._usable()
        record = self.registry.get_volume(owner, checked_name(name))
        if record is None:
            raise VolumeError(f"no volume {name!r}; `nanogrid volumes list` shows yours", 404)
        return record

    def _image(self, owner: str, name: str) -> Path:
        return self.directory / owner_digest(owner) / f"{name}.img"

    def _make_image(self, owner: str, name: str, size_mib: int) -> None:
        """The volume's empty filesystem in a sparse file of ``size_mib`` (call with the lock)."""
        image = self._image(owner, name)
        image.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, size_mib << 20)  # sparse: blocks are taken as files are written
            finally:
                os.close(fd)
            # A journal, unlike scratch disks: what is on a volume must survive the host's crash.
            scratch._run(
                "mkfs.ext4", "-q", "-F", "-m", "0", "-E", "nodiscard,root_owner=0:0", str(image)
            )
        except (OSError, ScratchError) as exc:
            image.unlink(missing_ok=True)
            raise VolumeError(f"the grid could not make volume {name!r} ({exc})", 507) from None

    def _mount(self, owner: str, name: str) -> _Mounted:
        """The volume's filesystem, mounted on the host once (call with the lock)."""
        held = self._mounted.get((owner, name))
        if held is not None:
            return held
        image = self._image(owner, name)
        mountpoint, read_only = image.with_suffix(".mnt"), image.with_suffix(".ro")
        device = ""
        try:
            device = scratch._run(
                "losetup", "--find", "--show", "--direct-io=on", str(image)
            ).strip()
            mountpoint.mkdir(mode=0o700, exist_ok=True)
            if (
                _libc.mount(
                    device.encode(),
                    str(mountpoint).encode(),
                    b"ext4",
                    MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME,
                    None,
                )
                != 0
            ):
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
            root = os.open(mountpoint, DIR_FLAGS)
            try:
                try:
                    os.mkdir("data", 0o755, dir_fd=root)
                except FileExistsError:
                    pass
                data = os.open("data", DIR_FLAGS, dir_fd=root)
                try:
                    os.fchown(data, self.uid, self.uid)
                finally:
                    os.close(data)
            finally:
                os.close(root)
            # A bind keeps the flags of what it binds: a read-only copy here makes every bind of it read-only too.
            read_only.mkdir(mode=0o700, exist_ok=True)
            _mount_call(str(mountpoint / "data"), read_only, MS_BIND)
            _mount_call(
                None, read_only, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
            )
        except (OSError, ScratchError) as exc:
            if device:
                _libc.umount2(str(read_only).encode(), MNT_DETACH)
                _libc.umount2(str(mountpoint).encode(), MNT_DETACH)
                scratch._detach(device)
            raise VolumeError(f"the grid could not mount volume {name!r} ({exc})", 503) from None
        held = self._mounted[(owner, name)] = _Mounted(device, mountpoint, read_only)
        return held

    def _unmount(self, owner: str, name: str) -> None:
        held = self._mounted.pop((owner, name), None)
        if held is None:
            return
        _libc.umount2(str(held.read_only).encode(), MNT_DETACH)
        _libc.umount2(str(held.mountpoint).encode(), MNT_DETACH)
        scratch._detach(held.device)
        for directory in (held.read_only, held.mountpoint):
            try:
                directory.rmdir()
            except OSError:
                pass

    def _check_host_room(self, size_mib: int) -> None:
        """Volumes are sparse: a new one is made only while the host's free space covers what all of them may still
        grow by, plus the reserve scratch disks keep for the grid's own data."""
        may_grow = self.promised() + self.also_promised()
        free = shutil.disk_usage(self.directory).free
        if may_grow + (size_mib << 20) + scratch.HOST_RESERVE_BYTES > free:
            raise VolumeError(
                f"the grid has no room for a {size_mib} MiB volume now: ask for a smaller one", 507
            )

    def promised(self) -> int:
        """Bytes the volumes' files may still take on the host's disk (their images are sparse)."""
        may_grow = 0
        for image in self.directory.glob("*/*.img"):
            try:
                info = image.stat()
            except OSError:
                continue
            may_grow += max(0, info.st_size - info.st_blocks * 512)
        return may_grow

    def _root(self, owner: str, name: str) -> _RootFd:
        record = self._record(owner, name)
        with self._lock:
            held = self._mount(owner, record["name"])
            return _RootFd(os.open(held.mountpoint / "data", DIR_FLAGS))


class _RootFd:
    """The volume's data directory as a descriptor, for a ``with`` block."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> int:
        return self.fd

    def __exit__(self, *_: object) -> None:
        os.close(self.fd)


def _holds(sandbox: Any, owner: str, name: str) -> bool:
    """Whether a sandbox binds the owner's volume ``name``."""
    volumes = sandbox.volumes
    return (
        isinstance(volumes, VolumeSet)
        and volumes.owner == owner
        and any(m.name == name for m in volumes.mounts)
    )


def _mount_call(source: str | None, target: Path, flags: int) -> None:
    """mount(2) with no filesystem type or data (binds, remounts, propagation); OSError if refused."""
    if (
        _libc.mount(source.encode() if source else None, str(target).encode(), None, flags, None)
        != 0
    ):
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


def bind(source: str, target: Path) -> None:
    """Bind ``source`` (a volume's directory, or its read-only copy) at ``target``; the bind keeps its flags."""
    _mount_call(source, target, MS_BIND)


def shared_root(directory: Path) -> None:
    """Make ``directory`` a mount of its own whose later binds propagate to the containers that bind it ``rslave``."""
    _mount_call(str(directory), directory, MS_BIND)
    _mount_call(None, directory, MS_SHARED)


def checked_name(name: str) -> str:
    try:
        return check_volume_name(name)
    except ValueError as exc:
        raise VolumeError(str(exc), 422) from None


def checked_parts(path: str) -> list[str]:
    try:
        return check_volume_path(path)
    except ValueError as exc:
        raise VolumeError(str(exc), 422) from None


def _walk(root: int, parts: list[str], create: int | None = None) -> int:
    """A descriptor of the directory ``parts`` below ``root``, each component entered without following links
    (made when missing, owned by the user ``create``, if given); VolumeError when one is missing or not a directory."""
    fd = os.dup(root)
    try:
        for part in parts:
            if create is not None:
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                    os.chown(part, create, create, dir_fd=fd, follow_symlinks=False)
                except FileExistsError:
                    pass
            try:
                child = os.open(part, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                raise VolumeError(f"no directory {'/'.join(parts)!r} on the volume", 404) from None
            except OSError:
                raise VolumeError(
                    f"{'/'.join(parts)!r} on the volume goes through something that is not a "
                    "directory (a link is never followed)",
                    409,
                ) from None
            os.close(fd)
            fd = child
        return fd
    except BaseException:
        os.close(fd)
        raise


def chunks(fd: int, size: int, piece: int = 4 << 20) -> Iterator[bytes]:
    """A file's first ``size`` bytes (fixed when it was opened), in pieces; closes the descriptor."""
    try:
        left = size
        while left:
            data = os.read(fd, min(piece, left))
            if not data:
                break
            left -= len(data)
            yield data
    finally:
        os.close(fd)
