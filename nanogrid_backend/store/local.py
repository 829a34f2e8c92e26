from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from nanogrid_backend.store.base import BlobSpace, BlobStore, Expired, QuotaExceeded

log = logging.getLogger(__name__)

DIR_MODE, FILE_MODE = 0o700, 0o600  # only the grid's own account reads what it stores
OWNER_SUFFIX = ".owner"  # outputs/{job_id}.owner names the owner of outputs/{job_id}/ (job ids never end in it)
RECOUNT_S = 600.0  # blob space is counted by a walk at most this often; in between, as this process adds and removes
TOUCH_EVERY_S = 3600.0  # a used blob is made young again (retention) at most this often


class LocalStore(BlobStore):
    """A directory on this machine (``store=file:///path``), readable by the grid's account only.

    Each job's outputs sit in ``outputs/{job_id}/`` with its owner's name in ``outputs/{job_id}.owner``,
    written when its first file is saved: that file's age is the outputs' age for retention, and the
    owners' usage is summed from these at the first quota check, then kept up to date in memory.
    """

    def __init__(
        self,
        root: Path,
        *,
        quota: Callable[[str], int | None] | None = None,
        owner_of: Callable[[str], str] | None = None,
    ) -> None:
        self.root = root
        self._quota = quota or (lambda owner: None)
        self._owner_of = owner_of or (lambda job_id: "")
        for path in (root, root / "packages", root / "outputs", root / "blobs"):
            path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            path.chmod(DIR_MODE)  # also a store made by an older version, or under a looser umask
        self._lock = threading.Lock()
        self._usage: dict[str, int] | None = None  # owner -> bytes stored; summed on first use
        self._space: dict[str, list[int]] | None = (
            None  # a blob key's directory -> [count, bytes]; walked on first use
        )
        self._space_at = 0.0

    def _package_path(self, function_id: str) -> Path:
        return self.root / "packages" / f"{function_id}.zip"

    def put_package(self, function_id: str, data: bytes) -> None:
        _replace_private(self._package_path(function_id), data)  # readers never see half a package

    def get_package(self, function_id: str) -> bytes:
        return self._package_path(function_id).read_bytes()

    def delete_package(self, function_id: str) -> None:
        self._package_path(function_id).unlink(missing_ok=True)

    def _blob_path(self, key: str) -> Path:
        if (
            not key
            or key.startswith("/")
            or any(part in ("", ".", "..") for part in key.split("/"))
        ):
            raise ValueError(f"blob key {key!r} is not a plain relative path")
        return self.root / "blobs" / key

    def put_blob(self, key: str, data: bytes) -> None:
        path = self._blob_path(key)
        _mkdirs(self.root / "blobs", path.parent)
        before = _size_or_none(path)
        _replace_private(path, data)
        self._count(key, before, len(data))

    def get_blob(self, key: str) -> bytes:
        return self._blob_path(key).read_bytes()

    def put_blob_file(self, key: str, source: Path) -> None:
        path = self._blob_path(key)
        _mkdirs(self.root / "blobs", path.parent)
        os.chmod(source, FILE_MODE)
        before, size = _size_or_none(path), source.lstat().st_size
        # a rename on the same file system: readers see the whole blob or none
        shutil.move(source, path)
        self._count(key, before, size)

    def delete_blob(self, key: str) -> None:
        path = self._blob_path(key)
        before = _size_or_none(path)
        path.unlink(missing_ok=True)
        self._count(key, before, None)

    def blob_space(self, prefix: str) -> BlobSpace:
        with self._lock:
            if self._space is None or time.monotonic() - self._space_at > RECOUNT_S:
                self._space, self._space_at = self._walk_space(), time.monotonic()
            counted = [v for k, v in self._space.items() if f"{k}/".startswith(prefix)]
        return BlobSpace(sum(c for c, _ in counted), sum(b for _, b in counted))

    def _walk_space(self) -> dict[str, list[int]]:
        """The data plane's blobs (``blobs/data/{scope}/{sha256}``) counted per directory: one walk."""
        space: dict[str, list[int]] = {}
        base = self.root / "blobs"
        for dirpath, _, filenames in os.walk(base / "data"):
            counted = space.setdefault(os.path.relpath(dirpath, base), [0, 0])
            for name in filenames:
                size = _size_or_none(Path(dirpath, name))
                if size is not None:
                    counted[0] += 1
                    counted[1] += size
        return space

    def _count(self, key: str, before: int | None, after: int | None) -> None:
        """Keep the blob space up to date as a blob is written (``after`` its size) or deleted (``after`` None)."""
        if not key.startswith("data/"):
            return
        with self._lock:
            if self._space is None:
                return  # counted by the first walk
            counted = self._space.setdefault(key.rsplit("/", 1)[0], [0, 0])
            counted[0] += (after is not None) - (before is not None)
            counted[1] += (after or 0) - (before or 0)

    def open_blob(self, key: str) -> Iterator[bytes]:
        path = self._blob_path(key)
        if not path.is_file() or path.is_symlink():
            raise FileNotFoundError(key)
        return _chunks(path)

    def blob_size(self, key: str, touch: bool = False) -> int | None:
        path = self._blob_path(key)
        try:
            info = path.lstat()
            # Kept young by use, at most once an hour: a touch changes the file's ctime, which makes the worker
            # hash the blob again before its next call (nanogrid_backend/store/blobs.py).
            if touch and time.time() - info.st_mtime > TOUCH_EVERY_S:
                os.utime(path)
        except FileNotFoundError:
            return None
        return info.st_size

    def blob_path(self, key: str) -> Path | None:
        return self._blob_path(key)

    def _output_path(self, job_id: str, name: str) -> Path:
        base = (self.root / "outputs" / job_id).resolve()
        path = (base / name).resolve()
        if base not in path.parents or job_id.endswith(OWNER_SUFFIX):
            raise FileNotFoundError(name)
        return path

    # quotas
    def _usage_table(self) -> dict[str, int]:
        """Owner -> bytes stored (call with the lock held)."""
        if self._usage is None:
            self._usage = {}
            for job_dir in (self.root / "outputs").iterdir():
                if job_dir.is_dir() and not job_dir.is_symlink():
                    owner = _read_owner(job_dir)
                    self._usage[owner] = self._usage.get(owner, 0) + _tree_size(job_dir)
        return self._usage

    def usage(self, owner: str) -> int:
        with self._lock:
            return self._usage_table().get(owner, 0)

    def save_output(self, job_id: str, name: str, source: Path, owner: str | None = None) -> int:
        if owner is None:
            owner = self._owner_of(job_id)
        target = self._output_path(job_id, name)
        size = source.lstat().st_size  # the apparent size: a sparse file counts in full
        quota = self.quota_of(owner)
        job_dir = self.root / "outputs" / job_id
        with self._lock:
            usage = self._usage_table()
            used = usage.get(owner, 0)
            if quota is not None and used + size > quota:
                # this call's files saved so far
                kept = _tree_size(job_dir) if job_dir.is_dir() else 0
                usage[owner] = used - kept
                self._delete_job(job_id)
                raise QuotaExceeded(owner, used - kept, kept + size, quota)
            usage[owner] = used + size  # counted before the move, so a concurrent call sees it
        try:
            if not job_dir.exists():
                job_dir.mkdir(mode=DIR_MODE)
                _write_private(job_dir.with_name(job_id + OWNER_SUFFIX), owner.encode())
            _mkdirs(job_dir, target.parent)
            shutil.move(source, target)
            target.chmod(FILE_MODE)
        except BaseException:
            with self._lock:
                self._usage_table()[owner] -= size
            raise
        return size

    def _delete_job(self, job_id: str) -> None:
        shutil.rmtree(self.root / "outputs" / job_id, ignore_errors=True)
        (self.root / "outputs" / (job_id + OWNER_SUFFIX)).unlink(missing_ok=True)

    def open_output(self, job_id: str, name: str) -> Iterator[bytes]:
        path = self._output_path(job_id, name)
        if not path.is_file():
            raise FileNotFoundError(name)
        return _chunks(path)

    # retention
    def expire(self, before: float) -> Expired:
        """Delete the outputs of jobs whose first output was saved before ``before``, and blobs older than it."""
        expired = Expired()
        outputs = self.root / "outputs"
        for entry in list(outputs.iterdir()):
            # an owner file goes with its outputs, or alone if they are gone
            if entry.name.endswith(OWNER_SUFFIX):
                if (
                    not entry.with_name(entry.name.removesuffix(OWNER_SUFFIX)).exists()
                    and _mtime(entry) < before
                ):
                    entry.unlink(missing_ok=True)
                continue
            marker = entry.with_name(entry.name + OWNER_SUFFIX)
            # the owner file's age; a job without one (stored by an older version) by its directory's
            if (_mtime(marker) if marker.exists() else _mtime(entry)) >= before:
                continue
            with self._lock:
                size = _tree_size(entry) if entry.is_dir() and not entry.is_symlink() else 0
                owner = _read_owner(entry)
                if self._usage is not None and size:
                    self._usage[owner] = max(0, self._usage.get(owner, 0) - size)
                if entry.is_symlink() or not entry.is_dir():
                    entry.unlink(missing_ok=True)
                self._delete_job(entry.name)
            expired.jobs += 1
            expired.bytes += size
        # files before their directories
        for blob in sorted((self.root / "blobs").rglob("*"), reverse=True):
            stat = blob.lstat()
            if blob.is_dir() and not blob.is_symlink():
                if not any(blob.iterdir()):
                    blob.rmdir()
            elif stat.st_mtime < before:
                blob.unlink(missing_ok=True)
                expired.blobs += 1
                expired.bytes += stat.st_size
        if expired.blobs:
            with self._lock:
                self._space = None  # counted again when next asked
        return expired


def _write_private(path: Path, data: bytes) -> None:
    """Write a file only this account can read, whatever the umask (and never through a planted link)."""
    path.unlink(missing_ok=True)
    fd = os.open(
        path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE
    )
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _replace_private(path: Path, data: bytes) -> None:
    """Write a private file under a temporary name, then swap it in whole."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    _write_private(tmp, data)
    os.replace(tmp, path)


def _mkdirs(base: Path, path: Path) -> None:
    """``path`` and its parents up to ``base``, each mode 0700."""
    for parent in reversed([path, *path.parents]):
        if parent == base or base not in parent.parents:
            continue
        parent.mkdir(mode=DIR_MODE, exist_ok=True)


def _size_or_none(path: Path) -> int | None:
    try:
        stat = path.lstat()
    except FileNotFoundError:
        return None
    return None if path.is_symlink() else stat.st_size


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except FileNotFoundError:
        return float("inf")  # gone meanwhile: nothing to expire


def _read_owner(job_dir: Path) -> str:
    try:
        return job_dir.with_name(job_dir.name + OWNER_SUFFIX).read_text()
    except FileNotFoundError:
        return ""


def _tree_size(path: Path) -> int:
    """Apparent bytes of the regular files under ``path`` (links are not followed)."""
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for filename in filenames:
            try:
                stat = os.lstat(os.path.join(dirpath, filename))
            except FileNotFoundError:
                continue
            if not os.path.islink(os.path.join(dirpath, filename)):
                total += stat.st_size
    return total


def _chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            yield chunk
