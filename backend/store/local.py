from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from backend.store.base import BlobStore


class LocalStore(BlobStore):
    """A directory on this machine (``store=file:///path``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "packages").mkdir(parents=True, exist_ok=True)
        (root / "outputs").mkdir(parents=True, exist_ok=True)

    def _package_path(self, function_id: str) -> Path:
        return self.root / "packages" / f"{function_id}.zip"

    def put_package(self, function_id: str, data: bytes) -> None:
        path = self._package_path(function_id)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # readers never see half a package

    def get_package(self, function_id: str) -> bytes:
        return self._package_path(function_id).read_bytes()

    def delete_package(self, function_id: str) -> None:
        self._package_path(function_id).unlink(missing_ok=True)

    def put_blob(self, key: str, data: bytes) -> None:
        path = self.root / "blobs" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def get_blob(self, key: str) -> bytes:
        return (self.root / "blobs" / key).read_bytes()

    def _output_path(self, job_id: str, name: str) -> Path:
        base = (self.root / "outputs" / job_id).resolve()
        path = (base / name).resolve()
        if base not in path.parents:
            raise FileNotFoundError(name)
        return path

    def save_output(self, job_id: str, name: str, source: Path) -> int:
        target = self._output_path(job_id, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(source, target)
        return target.stat().st_size

    def open_output(self, job_id: str, name: str) -> Iterator[bytes]:
        path = self._output_path(job_id, name)
        if not path.is_file():
            raise FileNotFoundError(name)
        return _chunks(path)


def _chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            yield chunk
