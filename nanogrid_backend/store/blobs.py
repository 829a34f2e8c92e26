"""The grid's side of the data plane: content-addressed blobs, scoped per owner, kept in the store.

A blob is stored under the key ``data/{owner scope}/{sha256}`` (in the store's ``blobs/`` on disk, a
prefix on S3), where the scope is a hash of the owner's name: another owner's blob does not exist
for you, even if you know its hash. A blob is written
to a temporary file while it is hashed and moved into place only if its hash is the one it was
named by, so a broken or forged upload never becomes a blob. Blobs age out with the store's
retention (``nanogrid_backend/retention.py``); using one again (a HEAD that finds it) makes it young again.

Calls reference blobs by hash: a call's payload in the format ``pickle+blobs`` is a JSON list of
the hashes, a newline, then the args pickle (``split_payload``), so the queue and the registry
carry it as any other payload. A blob is checked against its hash again before a sandbox gets it
(``local_files``): bytes changed on disk after the upload never reach a function.

A finished job's pickled result becomes a blob on request (``result_ref``, ``job.ref()``), so it can be
passed to the next call without a round trip through the client.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nanogrid_backend.models import COMPLETED, JobRecord
from nanogrid_backend.store.base import BlobSpace, BlobStore

SHA256 = re.compile(r"[0-9a-f]{64}")
BLOB_FORMAT = "pickle+blobs"  # a call's payload: JSON list of blob hashes, b"\n", the args pickle
RESULT_FORMAT = (
    "blob"  # a job's result stored as a blob: its ``result`` is JSON {sha256, size, format}
)
MAX_BLOBS_PER_CALL = 256
CHUNK_BYTES = 4 << 20
VERIFIED_MEMO = (
    4096  # blob files known to hash to their names, while their inode and ctime stay the same
)


class BlobError(Exception):
    """A blob could not be taken or found; ``status`` is the HTTP answer it maps to."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.status = message, status


def is_sha256(text: str) -> bool:
    return bool(SHA256.fullmatch(text))


def key_for(owner: str, sha256: str) -> str:
    if not is_sha256(sha256):
        raise BlobError(f"{sha256[:80]!r} is not a blob id (64 lowercase hex digits of SHA-256)")
    return f"{prefix_for(owner)}{sha256}"


def prefix_for(owner: str | None) -> str:
    """Where an owner's blobs are kept (``None``: every owner's)."""
    if owner is None:
        return "data/"
    return f"data/{hashlib.sha256(b'nanogrid-owner' + bytes(1) + owner.encode()).hexdigest()[:32]}/"


def join_payload(blobs: list[str], args_pickle: bytes) -> bytes:
    return json.dumps(blobs).encode() + b"\n" + args_pickle


def split_payload(payload: bytes) -> tuple[list[str], bytes]:
    """(blob hashes, args pickle) of a ``pickle+blobs`` payload."""
    head, _, args = payload.partition(b"\n")
    blobs = json.loads(head)
    if not isinstance(blobs, list) or not all(isinstance(b, str) and is_sha256(b) for b in blobs):
        raise BlobError("a call payload whose blob list is malformed")
    return blobs, args


def result_reference(sha256: str, size: int, result_format: str) -> bytes:
    return json.dumps({"sha256": sha256, "size": size, "format": result_format}).encode()


class Blobs:
    """Owner-scoped blobs in one store; ``spool`` is where uploads are written before they are checked."""

    def __init__(self, store: BlobStore, spool: Path) -> None:
        self.store = store
        self.spool = spool
        # path -> (inode, size, ctime) when it last hashed right
        self._verified: dict[Path, tuple[int, int, int]] = {}
        spool.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._swept = 0.0
        self.sweep()

    def sweep(self) -> int:
        """Remove partial files whose writer is gone (an upload cut off by a crash or ``kill -9`` never becomes a
        blob); how many. Each names its writer's pid; files named before that are removed after a day."""
        self._swept = time.monotonic()
        removed = 0
        for stale in self.spool.glob("*.part"):
            writer = _SPOOL_NAME.fullmatch(stale.name)
            try:
                gone = (
                    not _alive(int(writer[1]))
                    if writer
                    else stale.lstat().st_mtime < time.time() - 86400
                )
            except OSError:
                continue  # removed meanwhile
            if gone:
                stale.unlink(missing_ok=True)
                removed += 1
        return removed

    def size(self, owner: str, sha256: str) -> int | None:
        """Its size if this owner has it, else None; a blob asked about is kept as if new (retention)."""
        return self.store.blob_size(key_for(owner, sha256), touch=True)

    def missing(self, owner: str, blobs: list[str]) -> list[str]:
        return [sha for sha in blobs if self.size(owner, sha) is None]

    def temp_file(self) -> Path:
        """A new partial file's name, which carries this process's pid (``sweep``); stale ones go now and then."""
        if time.monotonic() - self._swept > SWEEP_EVERY_S:
            self.sweep()
        return self.spool / f"upload-{os.getpid()}-{uuid.uuid4().hex}.part"

    def commit(self, owner: str, sha256: str, path: Path, digest: str) -> None:
        """Move a received file into place, only if its content hashes to its name (else it is deleted)."""
        try:
            if digest != sha256:
                raise BlobError(
                    f"the upload does not hash to {sha256[:12]}… (it hashes to {digest[:12]}…); "
                    "nothing was stored",
                    400,
                )
            self.store.put_blob_file(key_for(owner, sha256), path)
        finally:
            path.unlink(missing_ok=True)

    def open(self, owner: str, sha256: str) -> Iterator[bytes]:
        """Its bytes in chunks; BlobError 404 if this owner has no such blob."""
        try:
            return self.store.open_blob(key_for(owner, sha256))
        except FileNotFoundError:
            raise BlobError(
                f"no blob {sha256[:12]}… (never uploaded by this key's owner, or deleted after the "
                "grid's retention)",
                404,
            ) from None

    @contextmanager
    def local_files(self, owner: str, blobs: list[str]) -> Iterator[list[Path]]:
        """The blobs as files on this machine for the length of the block (the store's own where it is local),
        each checked against its hash first: BlobError if one is missing or damaged."""
        made: list[Path] = []
        try:
            paths = []
            for sha in blobs:
                key = key_for(owner, sha)
                path = self.store.blob_path(key)
                # a remote store: fetched into the spool, streamed, hashed on the way
                if path is None:
                    path = self.temp_file()
                    made.append(path)
                    digest = hashlib.sha256()
                    with path.open("wb") as f:
                        for chunk in self.open(owner, sha):
                            digest.update(chunk)
                            f.write(chunk)
                    self._check(owner, sha, digest.hexdigest())
                elif not path.is_file():
                    raise BlobError(
                        f"blob {sha[:12]}… was deleted after the grid's retention; run the call again "
                        "(the client uploads it again)",
                        404,
                    )
                else:
                    self._verify(owner, sha, path)
                paths.append(path)
            yield paths
        finally:
            for path in made:
                path.unlink(missing_ok=True)

    def _verify(self, owner: str, sha256: str, path: Path) -> None:
        """Hash a stored file unless it hashed right before and has not changed since (a write changes its ctime;
        a retention touch does too, so a blob used by many calls is hashed about once per submitted batch)."""
        stat = path.stat()
        seen = (stat.st_ino, stat.st_size, stat.st_ctime_ns)
        if self._verified.get(path) == seen:
            return
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                digest.update(chunk)
        self._check(owner, sha256, digest.hexdigest())
        if len(self._verified) >= VERIFIED_MEMO:
            self._verified.clear()
        self._verified[path] = seen

    def _check(self, owner: str, sha256: str, digest: str) -> None:
        if digest != sha256:
            # so that the next upload of these bytes stores them again
            self.store.delete_blob(key_for(owner, sha256))
            raise BlobError(
                f"blob {sha256[:12]}… is damaged on the grid (its stored bytes no longer hash to its "
                "name); it was not given to the function and was deleted: upload the value again "
                "(nanogrid.put, or call again from a new client) and rerun",
                409,
            )

    def result_ref(self, job: JobRecord) -> tuple[str, int]:
        """(sha256, size) of the blob holding a finished job's pickled result: the blob it was stored as, or a copy
        of an inline one made now. BlobError when the job has no Python value to pass on."""
        if job.status != COMPLETED:
            if not job.finished:
                raise BlobError(
                    f"job {job.job_id} is still {job.status}; its result can be referenced once it "
                    "has finished (job.ref() waits for it)",
                    409,
                )
            message = (job.error or {}).get("message") or job.status
            raise BlobError(
                f"job {job.job_id} {job.status} ({message[:300]}): it has no result to pass on", 409
            )
        reference = (
            json.loads(job.result) if job.result_format == RESULT_FORMAT and job.result else None
        )
        if job.result_format == "json" or (reference or {}).get("format") == "json":
            raise BlobError(
                f"job {job.job_id}'s function returns JSON data (result='json'), not a Python value "
                "to pass to another call; pass job.result() instead",
                422,
            )
        if reference is not None:
            # touched: it lives another retention period
            size = self.size(job.owner, reference["sha256"])
            if size is None:
                raise BlobError(
                    f"the result of job {job.job_id} was deleted after the grid's retention; run the "
                    "call again",
                    410,
                )
            return reference["sha256"], size
        if job.result is None:
            raise BlobError(
                f"job {job.job_id} has no stored result (deleted after the grid's retention)", 410
            )
        sha256 = hashlib.sha256(job.result).hexdigest()
        if self.size(job.owner, sha256) is None:
            self.store.put_blob(key_for(job.owner, sha256), job.result)
        return sha256, len(job.result)

    def space(self, owner: str | None) -> BlobSpace:
        """How many blobs an owner (``None``: every owner) keeps and their bytes, as the store counts them."""
        return self.store.blob_space(prefix_for(owner))

    def store_result(self, owner: str, path: Path, sha256: str) -> None:
        """Keep a call's spooled result as this owner's blob (moved, not copied, where the store is local)."""
        self.store.put_blob_file(key_for(owner, sha256), path)


_SPACES: weakref.WeakKeyDictionary[Any, Blobs] = weakref.WeakKeyDictionary()


_SPOOL_NAME = re.compile(r"upload-(\d+)-[0-9a-f]{32}\.part")
SWEEP_EVERY_S = (
    60.0  # partial files of writers that died are looked for at most this often (and at start)
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another account's process: alive
    return True


def blobs_of(grid: Any) -> Blobs:
    """The blobs of a grid (nanogrid_backend/grid.py), made on first use: uploads spool next to its store."""
    space = _SPACES.get(grid)
    if space is None:
        space = _SPACES[grid] = Blobs(
            grid.store, spool_dir_for(grid.store, grid.config.data_dir / "blob-spool")
        )
    return space


def spool_dir_for(store: BlobStore, fallback: Path) -> Path:
    """Uploads are written next to the blobs (one rename puts them in place) when the store is local."""
    root = store.blob_path("spool")
    return root.parent.parent / "blob-spool" if root is not None else fallback
