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
    def save_output(self, job_id: str, name: str, source: Path) -> int:
        """Move or stream one finished output file into the store; returns its size."""

    @abstractmethod
    def open_output(self, job_id: str, name: str) -> Iterator[bytes]:
        """The file's bytes in chunks; FileNotFoundError if there is none."""
