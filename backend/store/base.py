from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path


class BlobStore(ABC):
    """Code packages by function id; output files under ``outputs/{job_id}/``."""

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

    def output_url(self, job_id: str, name: str) -> str | None:
        """A direct download URL (a presigned one on S3), or None to serve it through the controller."""
        return None

    @abstractmethod
    def save_output(self, job_id: str, name: str, source: Path) -> int:
        """Move or stream one finished output file into the store; returns its size."""

    @abstractmethod
    def open_output(self, job_id: str, name: str) -> Iterator[bytes]:
        """The file's bytes in chunks; FileNotFoundError if there is none."""
