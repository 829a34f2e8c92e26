"""Packaging a Python function into a NanoGrid function package (a zip with a manifest).

The zip is deterministic (sorted names, fixed timestamps), so the same function with the same
settings always has the same content hash, and the grid stores and warms it once.
"""

from __future__ import annotations

import inspect
import json
import re
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import cloudpickle

from nanogrid.environment import Environment
from nanogrid_contract.packages import RESERVED_FILES, FunctionPackage, build_zip


def local_runtime() -> str:
    return "python%d.%d" % sys.version_info[:2]


def safe_name(name: str) -> str:
    """A function name in the grid's alphabet (``<lambda>`` becomes ``lambda``)."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.-") or "function"
    return cleaned[:64]


def package_function(
    fn: Callable[..., Any],
    *,
    name: str | None = None,
    memory_mib: int | None = None,
    disk_mib: int | None = None,
    timeout_s: float | None = None,
    runtime: str | None = None,
    ai: bool = False,
    environment: Environment | None = None,
    local_files: dict[str, bytes] | None = None,
    pickled: bytes | None = None,
    result: str = "pickle",
    env: dict[str, str] | None = None,
    secrets: list[str] | None = None,
    volumes: list[dict[str, Any]] | None = None,
) -> FunctionPackage:
    """Cloudpickle ``fn`` (by value, with what it closes over) into a package with its source for display.

    ``environment`` (its spec and id go in the manifest, so they are part of the content hash) says
    what the function runs with; ``local_files`` are the user's own modules it imports, shipped as
    files beside the code (the sandbox imports them from there).
    """
    pickled = pickled if pickled is not None else cloudpickle.dumps(fn)
    manifest: dict[str, Any] = {
        "name": safe_name(
            name or str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", "function"))
        ),
        "kind": "pickle",
        "runtime": runtime or local_runtime(),
        "handler": "function.pkl",
        "python": "%d.%d" % sys.version_info[:2],
        "cloudpickle": cloudpickle.__version__,
    }
    code = getattr(fn, "__code__", None)
    if code is not None:  # lets the sandbox show source lines in remote tracebacks
        manifest["source_file"], manifest["source_line"] = code.co_filename, code.co_firstlineno
    if result == "json":
        manifest["result"] = (
            "json"  # data-only: the value travels as JSON, nothing is unpickled by the caller
        )
    if ai:
        manifest["ai"] = True  # its sandbox may reach the AI node (and nothing else)
    if env:
        # set in the sandbox when the function loads
        manifest["env"] = {str(k): str(v) for k, v in env.items()}
    if secrets:
        # names only: the worker opens them at load
        manifest["secrets"] = [str(name) for name in secrets]
    if volumes:  # [{"name", "path", "read_only"}]: part of the hash, so the volume set is part of its identity
        manifest["volumes"] = volumes
    if memory_mib is not None:
        manifest["memory"] = int(memory_mib)
    if disk_mib is not None:
        manifest["disk"] = int(disk_mib)
    if timeout_s is not None:
        manifest["timeout"] = float(timeout_s)
    if environment is not None and not environment.empty:
        manifest["environment"], manifest["environment_id"] = environment.spec(), environment.id
        manifest["runtime"] = runtime or f"python{environment.spec()['python']}"
    files = {
        **{name: data for name, data in (local_files or {}).items() if name not in RESERVED_FILES},
        "manifest.json": json.dumps(manifest, sort_keys=True).encode(),
        "function.pkl": pickled,
        "source.py": _source(fn).encode(),
    }
    return FunctionPackage(build_zip(files), manifest)


def _source(fn: Callable[..., Any]) -> str:
    try:
        return textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return ""
