"""Volumes in AWS mode: a volume lives in S3, and each worker keeps a copy of it that it syncs around calls.

An owner's volume is the objects under ``volumes/<owner digest>/<name>/`` in the data bucket (one object per file;
the record, with its size, in the registry). The controller reads and writes those objects for ``put``, ``get``,
``listdir`` and ``remove`` (``S3Volumes``). A worker mounts its own copy, an ext4 volume of the same size made the
way the embedded grid makes volumes (``volumes.py``), and syncs it (``SyncedVolumes``):

- before each call that mounts the volume, it downloads the files whose S3 version differs from its copy's (their
  ETags), and removes those deleted in S3 since: a warm worker whose copy is current downloads nothing, and lists
  nothing either when the volume's change marker (an object every change rewrites) is the one it saw last;
- after each call that mounts it read-write, it uploads the regular files the call made or changed (size or
  modification time differ from what it last synced) and deletes from S3 those the call removed.

Concurrent writers: **the last upload of a file wins, per file**. A file is never seen half-written (an S3 object is
replaced whole), but two calls on different workers changing the same file at once keep the one uploaded last, and
changes of files nobody else changed are all kept (merged per file). Only regular files travel: links, fifos and
empty directories stay on the worker that made them. A volume's size bounds each copy (the copy is a filesystem of
that size: a full one is ``OutOfDisk`` naming the volume) and ``put``; files uploaded after calls on several workers
at once may together exceed it until the next put says the volume is full.

The host never trusts a copy's contents: it reads them as the embedded grid does (one component at a time, links
never followed, regular files only) and writes downloads through the same calls as ``put``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from nanogrid_backend.registry.base import RegistryError
from nanogrid_backend.volumes import (
    DIR_FLAGS,
    VolumeError,
    VolumeMount,
    VolumeSet,
    VolumeStore,
    check_size,
    checked_name,
    checked_parts,
    new_record,
    owner_digest,
)
from nanogrid_contract.volumes import check_volume_path

log = logging.getLogger(__name__)

PREFIX = "volumes/"
MAX_SYNCED_FILES = (
    100_000  # a copy with more regular files than this is not uploaded past them (and says so)
)
MAX_KEY_BYTES = 1024  # S3's limit on a key


def volume_prefix(owner: str, name: str) -> str:
    return f"{PREFIX}{owner_digest(owner)}/{name}/"


def marker_key(owner: str, name: str) -> str:
    """The object every change of the volume rewrites (beside its files' prefix, never inside it)."""
    return f"{PREFIX}{owner_digest(owner)}/{name}.changed"


class S3Volumes:
    """The owners' volumes kept in S3: what the controller serves (``/v1/volumes``) in AWS mode."""

    problem = ""  # volumes are always available here
    stop_idle = None  # no sandboxes run beside the controller

    def __init__(
        self,
        s3: Any,
        bucket: str,
        registry: Any,
        *,
        max_volume_mib: int = 256 << 10,
        owner_volume_mib: int = 512 << 10,
    ) -> None:
        self.s3, self.bucket, self.registry = s3, bucket, registry
        self.max_volume_mib, self.owner_volume_mib = max_volume_mib, owner_volume_mib
        self._lock = threading.Lock()
        # (owner, name) -> (its marker then, bytes)
        self._usage: dict[tuple[str, str], tuple[str, int]] = {}

    # records
    def create(self, owner: str, name: str, size_mib: int | None) -> dict[str, Any]:
        name = checked_name(name)
        earlier = self.registry.get_volume(owner, name)
        if earlier is not None and size_mib is None:
            return self.describe(owner, earlier)
        size_mib = check_size(size_mib, self.max_volume_mib)
        with self._lock:
            record = new_record(self.registry, owner, name, size_mib, self.owner_volume_mib)
            if record is None:
                return self.describe(owner, self.registry.get_volume(owner, name))
            try:
                self.registry.put_volume(record)
            # made by another controller meanwhile: it stands, if it has this size
            except RegistryError:
                if (
                    new_record(self.registry, owner, name, size_mib, self.owner_volume_mib)
                    is not None
                ):
                    raise
                return self.describe(owner, self.registry.get_volume(owner, name))
        return self.describe(owner, record)

    def get(self, owner: str, name: str) -> dict[str, Any]:
        return self.describe(owner, self._record(owner, name))

    def list_volumes(self, owner: str) -> list[dict[str, Any]]:
        return [self.describe(owner, record) for record in self.registry.list_volumes(owner)]

    def delete(self, owner: str, name: str) -> dict[str, Any]:
        """Remove the volume and its files. Workers' copies go with their next sync (the record is gone first)."""
        record = self._record(owner, name)
        self.registry.delete_volume(owner, record["name"])
        self._delete(
            [item["Key"] for item in self._objects(volume_prefix(owner, record["name"]))]
            + [marker_key(owner, record["name"])]
        )
        return {**record, "used_bytes": 0}

    def describe(self, owner: str, record: dict[str, Any]) -> dict[str, Any]:
        """The record with ``used_bytes``: what its files take in S3."""
        return {
            "name": record["name"],
            "size_mib": record["size_mib"],
            "created_at": record["created_at"],
            "used_bytes": self._used(owner, record["name"]),
        }

    def attach(self, owner: str, wanted: list[dict[str, Any]]) -> VolumeSet:
        raise VolumeError("volumes are mounted by workers, not by the controller", 503)

    def close(self) -> None:
        """Nothing is held between requests."""

    # files
    def put(self, owner: str, name: str, path: str, source: Path) -> int:
        """Upload the host's file ``source`` to ``path``; VolumeError 507 when the volume's files would exceed its
        size, 409 when ``path`` is a directory."""
        record = self._record(owner, name)
        key = self._key(owner, record["name"], path)
        size = source.stat().st_size
        below = self.s3.list_objects_v2(Bucket=self.bucket, Prefix=key + "/", MaxKeys=1)
        if below.get("KeyCount", 0):
            raise VolumeError(f"{path!r} is a directory on volume {record['name']!r}", 409)
        try:
            replaced = int(self.s3.head_object(Bucket=self.bucket, Key=key)["ContentLength"])
        except ClientError:
            replaced = 0
        used = self._used(owner, record["name"])
        if used - replaced + size > record["size_mib"] << 20:
            raise VolumeError(
                f"volume {record['name']!r} is full ({record['size_mib']} MiB): remove files from it "
                "or use a larger volume",
                507,
            )
        self.s3.upload_file(str(source), self.bucket, key)
        self._changed(owner, record["name"], size - replaced)
        return size

    def open_file(self, owner: str, name: str, path: str) -> tuple[int, int]:
        """A descriptor of the file's bytes (an unnamed temporary file on the controller) and its size."""
        record = self._record(owner, name)
        key = self._key(owner, record["name"], path)
        spool = tempfile.TemporaryFile()
        try:
            self.s3.download_fileobj(self.bucket, key, spool)
        except ClientError:
            spool.close()
            raise VolumeError(f"no file {path!r} on volume {record['name']!r}", 404) from None
        spool.flush()
        fd = os.dup(spool.fileno())
        size = os.fstat(fd).st_size
        spool.close()
        os.lseek(fd, 0, os.SEEK_SET)
        return fd, size

    def listdir(self, owner: str, name: str, path: str = "") -> list[dict[str, Any]]:
        record = self._record(owner, name)
        base = volume_prefix(owner, record["name"])
        if path.strip("/"):
            base = self._key(owner, record["name"], path) + "/"
        entries: list[dict[str, Any]] = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=base, Delimiter="/"
        ):
            for folder in page.get("CommonPrefixes", []):
                entries.append(
                    {
                        "name": folder["Prefix"][len(base) :].rstrip("/"),
                        "kind": "dir",
                        "size": 0,
                        "modified": 0.0,
                    }
                )
            for item in page.get("Contents", []):
                entries.append(
                    {
                        "name": item["Key"][len(base) :],
                        "kind": "file",
                        "size": int(item["Size"]),
                        "modified": item["LastModified"].timestamp(),
                    }
                )
        if path.strip("/") and not entries:
            raise VolumeError(f"no directory {path.strip('/')!r} on the volume", 404)
        return sorted(entries, key=lambda e: e["name"])

    def remove(self, owner: str, name: str, path: str) -> None:
        """Remove a file, or a directory with everything in it."""
        record = self._record(owner, name)
        key = self._key(owner, record["name"], path)
        found = [
            item["Key"]
            for item in self._objects(key)
            if item["Key"] == key or item["Key"].startswith(key + "/")
        ]
        if not found:
            raise VolumeError(f"no {path!r} on volume {record['name']!r}", 404)
        self._delete(found)
        self._changed(owner, record["name"], None)

    # what workers sync against
    def remote_files(self, owner: str, name: str) -> dict[str, tuple[str, int]]:
        """Every file of the volume in S3: path -> (ETag, size)."""
        prefix = volume_prefix(owner, name)
        return {
            item["Key"][len(prefix) :]: (item["ETag"], int(item["Size"]))
            for item in self._objects(prefix)
        }

    def download(self, owner: str, name: str, path: str, target: int) -> str:
        """Write the file's S3 version into the descriptor ``target``; its ETag (what was written)."""
        body = self.s3.get_object(Bucket=self.bucket, Key=volume_prefix(owner, name) + path)
        for chunk in body["Body"].iter_chunks(4 << 20):
            view = memoryview(chunk)
            while view:
                view = view[os.write(target, view) :]
        return str(body["ETag"])

    def upload(self, owner: str, name: str, path: str, source: Any) -> str:
        """Upload ``source`` (a file object) as the file ``path``; its new ETag. (``mark`` the change after.)"""
        key = volume_prefix(owner, name) + path
        self.s3.upload_fileobj(source, self.bucket, key)
        return str(self.s3.head_object(Bucket=self.bucket, Key=key)["ETag"])

    def forget(self, owner: str, name: str, paths: list[str]) -> None:
        """Delete these files. (``mark`` the change after.)"""
        prefix = volume_prefix(owner, name)
        self._delete([prefix + path for path in paths])

    def marker(self, owner: str, name: str) -> str:
        """The volume's change marker as it is now ('' before its first change)."""
        try:
            return str(self.s3.head_object(Bucket=self.bucket, Key=marker_key(owner, name))["ETag"])
        except ClientError:
            return ""

    def mark(self, owner: str, name: str) -> str:
        """Rewrite the change marker (after the change is in S3): workers list the volume again. Its new ETag."""
        reply = self.s3.put_object(
            Bucket=self.bucket, Key=marker_key(owner, name), Body=os.urandom(16)
        )
        return str(reply["ETag"])

    # inside
    def _used(self, owner: str, name: str) -> int:
        """Bytes the volume's files take in S3: listed again only when its change marker moved (a worker's upload,
        another controller's put), else one HEAD."""
        marker = self.marker(owner, name)
        with self._lock:
            cached = self._usage.get((owner, name))
        if cached is not None and marker and cached[0] == marker:
            return cached[1]
        used = sum(int(item.get("Size", 0)) for item in self._objects(volume_prefix(owner, name)))
        with self._lock:
            self._usage[(owner, name)] = (marker, used)
        return used

    def _changed(self, owner: str, name: str, grew_by: int | None) -> None:
        """A change made here: the marker is rewritten, and the counted bytes follow it (None: counted again)."""
        marker = self.mark(owner, name)
        with self._lock:
            cached = self._usage.pop((owner, name), None)
            if cached is not None and grew_by is not None:
                self._usage[(owner, name)] = (marker, cached[1] + grew_by)

    def _record(self, owner: str, name: str) -> dict[str, Any]:
        record = self.registry.get_volume(owner, checked_name(name))
        if record is None:
            raise VolumeError(f"no volume {name!r}; `nanogrid volumes list` shows yours", 404)
        return record

    def _key(self, owner: str, name: str, path: str) -> str:
        key = volume_prefix(owner, name) + "/".join(checked_parts(path))
        if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
            raise VolumeError(
                f"the path {path!r} is too long for a volume kept in S3 (keys of at most "
                f"{MAX_KEY_BYTES} bytes)",
                422,
            )
        return key

    def _objects(self, prefix: str) -> Iterator[dict[str, Any]]:
        for page in self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        ):
            yield from page.get("Contents", [])

    def _delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            self.s3.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": k} for k in keys[start : start + 1000]], "Quiet": True},
            )


class SyncedVolumes(VolumeStore):
    """A worker's copies of the volumes kept in S3 (``home``): local volumes synced before and after each call."""

    def __init__(
        self, directory: Path, registry: Any, home: S3Volumes, uid: int, **limits: int
    ) -> None:
        super().__init__(directory, registry, uid, **limits)
        self.home = home
        self._sync_locks: dict[tuple[str, str], threading.Lock] = {}
        # the change marker each copy was last synced at
        self._seen_marker: dict[tuple[str, str], str] = {}
        self.downloads = self.uploads = (
            0  # files moved since the start (what a warm copy saves shows here)
        )

    def attach(self, owner: str, wanted: list[dict[str, Any]]) -> VolumeSet:
        """Make this worker's copy of each volume where it has none, then mount them as the embedded grid does;
        the copies are brought up to date before each call (``SyncedVolumeSet.before_call``)."""
        self._usable()
        for entry in wanted:
            record = self.registry.get_volume(owner, checked_name(str(entry.get("name"))))
            if record is not None:
                with self._sync_lock(owner, record["name"]):
                    self._copy_of(owner, record)
        return super().attach(owner, wanted)

    def sync_down(self, owner: str, name: str) -> None:
        """Bring this worker's copy up to date with S3 (nothing is listed when the change marker has not moved)."""
        with self._sync_lock(owner, name):
            self._sync_down(owner, name)

    def _volume_set(self, owner: str, mounts: list[VolumeMount]) -> VolumeSet:
        return SyncedVolumeSet(self, owner, mounts)

    def sync_up(self, owner: str, name: str) -> None:
        """Upload what calls changed on this worker's copy, and delete in S3 what they removed."""
        with self._sync_lock(owner, name):
            synced = self._state(owner, name)
            local = self._local_files(owner, name)
            changed = False
            for path, (size, mtime_ns) in local.items():
                known = synced.get(path)
                if known is not None and (known[1], known[2]) == (size, mtime_ns):
                    continue
                try:
                    fd, _size = self.open_file(owner, name, path)
                except VolumeError:
                    continue  # gone or replaced by something else since the walk
                with os.fdopen(fd, "rb") as source:
                    info = os.fstat(source.fileno())
                    etag = self.home.upload(owner, name, path, source)
                synced[path] = (etag, info.st_size, info.st_mtime_ns)
                self.uploads += 1
                changed = True
            removed = [path for path in synced if path not in local]
            if removed:
                self.home.forget(owner, name, removed)
                for path in removed:
                    del synced[path]
            if removed or changed:
                self._seen_marker[(owner, name)] = (
                    ""  # its own change: listed again next time, like any other
                )
                self.home.mark(owner, name)
                self._save_state(owner, name, synced)

    # inside
    def _sync_lock(self, owner: str, name: str) -> threading.Lock:
        with self._lock:
            return self._sync_locks.setdefault((owner, name), threading.Lock())

    def _copy_of(self, owner: str, record: dict[str, Any]) -> None:
        """This worker's copy of the volume, made (empty) or remade when the volume was made again with another
        size."""
        name, image = record["name"], self._image(owner, record["name"])
        with self._lock:
            try:
                size = image.stat().st_size
            except FileNotFoundError:
                size = -1
            if size == record["size_mib"] << 20:
                return
            if size >= 0:
                self._unmount(owner, name)
                image.unlink()
                self._state_file(owner, name).unlink(missing_ok=True)
            self._check_host_room(record["size_mib"])
            self._make_image(owner, name, record["size_mib"])

    def _sync_down(self, owner: str, name: str) -> None:
        marker = self.home.marker(owner, name)
        if marker and marker == self._seen_marker.get((owner, name)):
            return  # nothing changed in S3 since this copy was last synced: nothing to list
        remote = self.home.remote_files(owner, name)
        synced = self._state(owner, name)
        changed = False
        for path, (etag, _size) in remote.items():
            if synced.get(path, ("",))[0] == etag:
                continue
            try:
                check_volume_path(path)
            except ValueError:
                continue  # not a name this side writes; nothing a call could read either
            got: list[str] = []

            def fill(target: int, path: str = path, got: list[str] = got) -> None:
                got.append(self.home.download(owner, name, path, target))

            info = self.replace(owner, name, path, fill)
            synced[path] = (got[0], info.st_size, info.st_mtime_ns)
            self.downloads += 1
            changed = True
        # removed in S3 since this copy was synced
        for path in [p for p in synced if p not in remote]:
            with contextlib.suppress(VolumeError):
                self.remove(owner, name, path)
            del synced[path]
            changed = True
        if changed:
            self._save_state(owner, name, synced)
        self._seen_marker[(owner, name)] = marker

    def _local_files(self, owner: str, name: str) -> dict[str, tuple[int, int]]:
        """The copy's regular files: path -> (size, mtime in ns), reached without following links."""
        found: dict[str, tuple[int, int]] = {}
        with self._root(owner, name) as root:
            stack: list[tuple[int, list[str]]] = [(os.dup(root), [])]
            try:
                while stack:
                    fd, parts = stack.pop()
                    try:
                        with os.scandir(fd) as entries:
                            for entry in entries:
                                if entry.name.startswith(".nanogrid-put-"):
                                    continue
                                info = entry.stat(follow_symlinks=False)
                                path = "/".join([*parts, entry.name])
                                if stat.S_ISREG(info.st_mode):
                                    if len(found) >= MAX_SYNCED_FILES:
                                        log.warning(
                                            "volume %s of %s: more than %d files; the rest stay on this "
                                            "worker",
                                            name,
                                            owner_digest(owner),
                                            MAX_SYNCED_FILES,
                                        )
                                        return found
                                    found[path] = (info.st_size, info.st_mtime_ns)
                                elif stat.S_ISDIR(info.st_mode) and len(parts) < 31:
                                    with contextlib.suppress(OSError):
                                        stack.append(
                                            (
                                                os.open(entry.name, DIR_FLAGS, dir_fd=fd),
                                                [*parts, entry.name],
                                            )
                                        )
                    finally:
                        os.close(fd)
            finally:
                for fd, _ in stack:
                    os.close(fd)
        prefix = volume_prefix(owner, name).encode()
        return {path: state for path, state in found.items() if _valid(prefix, path)}

    def _state_file(self, owner: str, name: str) -> Path:
        return self._image(owner, name).with_suffix(".sync.json")

    def _state(self, owner: str, name: str) -> dict[str, tuple[str, int, int]]:
        """What this copy held when last synced: path -> (ETag, size, mtime in ns). Written by the host only."""
        try:
            return {
                path: (str(e), int(s), int(m))
                for path, (e, s, m) in json.loads(self._state_file(owner, name).read_text()).items()
            }
        except (OSError, ValueError, TypeError):
            return {}

    def _save_state(self, owner: str, name: str, state: dict[str, tuple[str, int, int]]) -> None:
        target = self._state_file(owner, name)
        temporary = target.with_suffix(".tmp")
        temporary.write_text(json.dumps(state))
        temporary.replace(target)


class SyncedVolumeSet(VolumeSet):
    """A sandbox's volumes on a worker whose volumes live in S3: brought up to date before each call (a warm
    sandbox's too), and what a call changed uploaded when it ends."""

    store: SyncedVolumes

    def before_call(self) -> None:
        """VolumeError (503) when S3 cannot be reached: the call does not run on a copy that may be stale."""
        for mount in self.mounts:
            try:
                self.store.sync_down(self.owner, mount.name)
            except (OSError, ClientError) as exc:
                raise VolumeError(
                    f"volume {mount.name!r} could not be brought up to date on this worker ({exc})",
                    503,
                ) from None

    def after_call(self) -> None:
        for mount in self.mounts:
            if not mount.read_only:
                try:
                    self.store.sync_up(self.owner, mount.name)
                except (OSError, ClientError, VolumeError) as exc:
                    log.warning(
                        "volume %s: could not upload what a call changed (%s); it stays on this worker "
                        "until the next call's sync",
                        mount.name,
                        exc,
                    )


def _valid(prefix: bytes, path: str) -> bool:
    """Whether a file of a copy can be kept in S3: a volume path (no control characters...) that fits in a key."""
    try:
        check_volume_path(path)
    except ValueError:
        return False
    return len(prefix) + len(path.encode("utf-8", "surrogatepass")) <= MAX_KEY_BYTES
