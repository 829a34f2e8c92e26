from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from nanogrid_backend.sandbox.base import SandboxError

GiB = 1 << 30


class QuotaExceeded(SandboxError):
    """An owner's output files would go over its disk quota: the call fails and keeps none of them."""

    def __init__(self, owner: str, used: int, adding: int, quota: int) -> None:
        super().__init__(
            "quota",
            f"output files of {_size(adding)} would bring owner {owner!r} to "
            f"{_size(used + adding)}, over its disk quota of {_size(quota)}; none were kept "
            "(stored outputs are deleted after the grid's retention, or ask for a larger quota)",
        )
        self.owner, self.used, self.adding, self.quota = owner, used, adding, quota


def _size(n: int) -> str:
    return (
        f"{n / GiB:.2f} GiB"
        if n >= GiB
        else f"{n / (1 << 20):.1f} MiB"
        if n >= 1 << 20
        else f"{n} bytes"
    )


@dataclass
class Expired:
    """What one retention pass deleted."""

    jobs: int = 0  # jobs whose output files were all deleted
    blobs: int = 0
    bytes: int = 0  # apparent sizes, as quotas count them


@dataclass(frozen=True)
class BlobSpace:
    """The data plane's blobs under one key prefix: how many, and their bytes."""

    count: int = 0
    bytes: int = 0


class BlobStore(ABC):
    """Code packages by function id; output files under ``outputs/{job_id}/``.

    Output files count against their owner's disk quota at their apparent size (a sparse file counts in full).
    """

    _quota: Callable[[str], int | None] | None = None  # owner -> disk quota in bytes (None: none)

    @abstractmethod
    def put_package(self, function_id: str, data: bytes) -> None: ...

    @abstractmethod
    def get_package(self, function_id: str) -> bytes: ...

    @abstractmethod
    def delete_package(self, function_id: str) -> None: ...

    @abstractmethod
    def put_blob(self, key: str, data: bytes) -> None:
        """Anything else the grid keeps (large payloads), by key."""

    @abstractmethod
    def get_blob(self, key: str) -> bytes: ...

    # Streaming variants, for values too large to hold in memory (nanogrid_backend/store/blobs.py);
    # these defaults do hold them.
    def put_blob_file(self, key: str, source: Path) -> None:
        """Store a file as a blob (moved into place where the store is local: the caller's file is gone after)."""
        self.put_blob(key, source.read_bytes())
        source.unlink(missing_ok=True)

    def open_blob(self, key: str) -> Iterator[bytes]:
        """The blob's bytes in chunks; FileNotFoundError if there is none."""
        return iter([self.get_blob(key)])

    def blob_size(self, key: str, touch: bool = False) -> int | None:
        """Its size, None if there is no such blob; ``touch``: count it as stored now (retention)."""
        try:
            return len(self.get_blob(key))
        except FileNotFoundError:
            return None

    def blob_path(self, key: str) -> Path | None:
        """Where the blob is on this machine's disk (a local store), else None."""
        return None

    @abstractmethod
    def delete_blob(self, key: str) -> None:
        """Remove it (a damaged blob, so that the next upload stores it again); no error if there is none."""

    def blob_space(self, prefix: str) -> BlobSpace:
        """Count and bytes of the blobs whose keys start with ``prefix``, cheap to ask often (kept up to date as
        blobs come and go, or cached); stores that cannot say answer an empty space."""
        return BlobSpace()

    def output_url(self, job_id: str, name: str) -> str | None:
        """A direct download URL (a presigned one on S3), or None to serve it through the controller."""
        return None

    @abstractmethod
    def save_output(self, job_id: str, name: str, source: Path, owner: str | None = None) -> int:
        """Move or stream one finished output file into the store; returns its size.

        ``owner``: whose quota it counts against (None: looked up from the job). Over the quota it raises
        QuotaExceeded and deletes the job's outputs saved so far (a call keeps all its outputs or none).
        """

    def quota_left(self, owner: str) -> int | None:
        """Bytes the owner may still store; None: no quota. For a writer that caps a call's outputs as they arrive."""
        quota = self.quota_of(owner)
        return None if quota is None else max(0, quota - self.usage(owner))

    def check_quota(self, owner: str, adding: int) -> None:
        """QuotaExceeded if ``adding`` more bytes would take the owner over its quota (nothing is reserved)."""
        left = self.quota_left(owner)
        if left is not None and adding > left:
            quota = self.quota_of(owner) or 0
            raise QuotaExceeded(owner, quota - left, adding, quota)

    def quota_of(self, owner: str) -> int | None:
        """The owner's disk quota in bytes; None: none (a store given a quota function answers from it)."""
        return self._quota(owner) if self._quota is not None else None

    def usage(self, owner: str) -> int:
        """Bytes of output files the owner has stored."""
        return 0

    def expire(self, before: float) -> Expired:
        """Delete output files and blobs stored before ``before`` (a Unix time); what was deleted."""
        return Expired()

    @abstractmethod
    def open_output(self, job_id: str, name: str) -> Iterator[bytes]:
        """The file's bytes in chunks; FileNotFoundError if there is none."""
