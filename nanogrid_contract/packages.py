"""The function package format: a deterministic zip with ``manifest.json``, named by the hash of its bytes."""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass
from typing import Any

RESERVED_FILES = {"manifest.json", "function.pkl", "source.py"}
ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def build_zip(files: dict[str, bytes]) -> bytes:
    """A deterministic zip of ``files`` (name -> bytes)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, files[name])
    return buffer.getvalue()


def function_id_for(data: bytes) -> str:
    """A package's function id: the same bytes always give the same id."""
    return "fn-" + hashlib.sha256(data).hexdigest()[:24]


@dataclass(frozen=True)
class FunctionPackage:
    data: bytes
    manifest: dict[str, Any]

    @property
    def function_id(self) -> str:
        return function_id_for(self.data)
