"""Function packages: a zip with ``manifest.json`` plus code, checked before anything runs it."""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from typing import Any

from nanogrid_backend.builds.builder import EnvironmentBuildError, check_names
from nanogrid_contract.packages import FunctionPackage as Package
from nanogrid_contract.packages import build_zip, function_id_for

__all__ = [
    "Package",
    "PackageError",
    "from_upload",
    "check_manifest",
    "function_id_for",
    "owned_function_id",
    "seed_runtime",
]

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
HANDLER_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")
MAX_RATIO = 200  # real code compresses 3-10x; a bomb a thousand-fold
# The seed platform's other languages (nanogrid_runtimes/node, go, cpp): handler packages only, with these source files.
LANGUAGE_SOURCES = {"nodejs": (".js",), "go": (".go",), "cpp": (".cpp", ".cc", ".cxx")}
# The seeds' runtime names (python3.9, nodejs18.x, go1.x, cpp17, or the bare family): family, then a version.
SEED_RUNTIME_NAME = re.compile(r"^(python|nodejs|node|go|cpp)(\d[\w.]*)?$")
SEED_FAMILIES = {"node": "nodejs"}
# The most items an upload may list of each (a manifest is hostile input: a million names would be built, or opened).
MAX_ITEMS = {"packages": 2000, "system packages": 200, "environment variables": 500, "secrets": 200}


class PackageError(ValueError):
    """The package or its settings are wrong; ``status`` is the HTTP status that fits."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def from_upload(
    filename: str, data: bytes, form: dict[str, Any], *, max_bytes: int, runtimes: dict[str, str]
) -> Package:
    """Turn an upload (a ``.py`` file or a zip, with form fields) into a checked package."""
    if len(data) > max_bytes:
        raise PackageError(f"package is {len(data)} bytes, over the {max_bytes}-byte limit", 413)
    if filename.endswith(".py"):
        files = {filename.rsplit("/", 1)[-1]: data}
    else:
        files = _read_zip(data, max_bytes)
    try:
        manifest = json.loads(files.pop("manifest.json", b"{}") or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise PackageError(f"manifest.json is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise PackageError("manifest.json must hold a JSON object")
    manifest.update({k: v for k, v in form.items() if v not in (None, "")})
    manifest.setdefault("kind", "pickle" if "function.pkl" in files else "handler")
    if manifest["kind"] == "handler" and "handler" not in manifest:
        raise PackageError(
            "handler is required, e.g. handler=hello.handler for def handler(event, context) in hello.py"
        )
    manifest = check_manifest(manifest, runtimes)
    if manifest["kind"] == "handler" and manifest["runtime"] in LANGUAGE_SOURCES:
        suffixes = LANGUAGE_SOURCES[manifest["runtime"]]
        module = manifest["handler"].rsplit(".", 1)[0].replace(".", "/")
        if (
            manifest["runtime"] == "nodejs"
            and f"{module}.js" not in files
            and f"{module}/index.js" not in files
        ):
            raise PackageError(
                f"handler {manifest['handler']!r} names module {module}.js, which is not in the package"
            )
        if not any(name.endswith(suffixes) for name in files):
            raise PackageError(
                f"a {manifest['runtime']} package needs a {' or '.join(suffixes)} source file"
            )
    elif manifest["kind"] == "handler":
        module = manifest["handler"].rsplit(".", 1)[0].replace(".", "/")
        if f"{module}.py" not in files and f"{module}/__init__.py" not in files:
            raise PackageError(
                f"handler {manifest['handler']!r} names module {module}.py, which is not in the package"
            )
    elif "function.pkl" not in files:
        raise PackageError("a pickle package needs function.pkl")
    files["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    return Package(build_zip(files), manifest)


def seed_runtime(name: str, runtimes: dict[str, str]) -> tuple[str, str | None]:
    """The grid's runtime for a seed's runtime name, and a warning when it is not the version asked for.

    ``python3.9`` ... ``python3.13`` run on the nearest Python the grid has (the seed's workers ran whatever image
    they had, so a function written for 3.9 is expected to run on 3.11); ``nodejs18.x``, ``go1.x``, ``cpp17`` run on
    the grid's Node.js, Go and C++ runtimes. An unknown name raises ``PackageError`` (400) listing the known ones.
    """
    match = SEED_RUNTIME_NAME.match(name.strip().lower())
    served = ", ".join(sorted(runtimes)) or "none"
    if match is None:
        raise PackageError(
            f"Invalid runtime {name!r}. Allowed: python (python3.9 ... python3.13), nodejs "
            f"(nodejs18.x, nodejs20.x), go (go1.x), cpp; this grid runs: {served}",
            400,
        )
    family, version = SEED_FAMILIES.get(match[1], match[1]), match[2]
    if family != "python":
        if family not in runtimes:
            raise PackageError(
                f"runtime {name} is not installed on this grid; it runs: {served}", 400
            )
        return family, None
    pythons = {
        runtime: _minor(value)
        for runtime, value in runtimes.items()
        if runtime.startswith("python")
    }
    if not pythons:
        raise PackageError(f"runtime {name} is not installed on this grid; it runs: {served}", 400)
    wanted = _minor(version) if version else None
    if wanted is None:  # the bare family: the grid's first Python (its own, for the embedded grid)
        return next(iter(pythons)), None
    nearest = min(pythons, key=lambda runtime: (abs(pythons[runtime] - wanted), -pythons[runtime]))
    if pythons[nearest] == wanted:
        return nearest, None
    return nearest, f"runtime {name} runs on {nearest}, the nearest Python this grid has"


def _minor(version: str) -> int:
    """The minor version of "3.11", "3.11.7" or "python3.11" (-1 if there is none)."""
    found = re.search(r"3\.(\d+)", version)
    return int(found[1]) if found else -1


def owned_function_id(owner: str, content_id: str) -> str:
    """Function ids are per owner: the same code uploaded by two owners is two functions.

    Workers recompute it from the stored package's bytes before loading it, so a package changed in
    the store (by anything but an upload) never runs.
    """
    return "fn-" + hashlib.sha256(f"{owner}\0{content_id}".encode()).hexdigest()[:24]


def check_manifest(manifest: dict[str, Any], runtimes: dict[str, str]) -> dict[str, Any]:
    """Validate names, runtime and Python version; returns the manifest with defaults applied."""
    name = str(manifest.get("name") or manifest.get("function_name") or "")
    if not NAME_PATTERN.match(name):
        raise PackageError(
            f"function name {name!r} must be 1-64 characters of letters, digits, '_', '.', '-'"
        )
    kind = manifest.get("kind")
    if kind not in ("pickle", "handler"):
        raise PackageError(f"kind must be 'pickle' or 'handler', not {kind!r}")
    # default: the grid's first runtime
    runtime = str(manifest.get("runtime") or next(iter(runtimes), ""))
    if runtime not in runtimes:
        known = ", ".join(sorted(runtimes)) or "none"
        raise PackageError(f"unknown runtime {runtime!r}; this grid runs: {known}")
    if runtime in LANGUAGE_SOURCES and kind != "handler":
        raise PackageError(
            f"runtime {runtime} runs handler packages (source code), not pickled Python functions"
        )
    handler = str(manifest.get("handler") or ("function.pkl" if kind == "pickle" else ""))
    if kind == "handler" and not HANDLER_PATTERN.match(handler):
        raise PackageError(f"handler {handler!r} must look like module.function")
    python = str(manifest.get("python") or runtimes[runtime])
    if kind == "pickle" and python != runtimes[runtime]:
        raise PackageError(
            f"this function was pickled by Python {python}, but runtime {runtime} runs Python {runtimes[runtime]}; "
            f"cloudpickle cannot move code between Python versions: run the client under Python {runtimes[runtime]}",
            409,
        )
    limits = {}
    for key, cast in (("memory", int), ("disk", int), ("timeout", float)):
        if manifest.get(key) not in (None, ""):
            try:
                limits[key] = cast(manifest[key])
            except (TypeError, ValueError):
                raise PackageError(f"{key} must be a number, not {manifest[key]!r}") from None
    check_list_lengths(manifest)
    # refused here, before anything is stored or built (Debian names by apt as root)
    if manifest.get("environment"):
        try:
            check_names(manifest["environment"])
        except EnvironmentBuildError as exc:
            raise PackageError(f"environment: {exc.message}") from None
    for key in ("ai",):  # booleans are JSON booleans: "no" must never switch a feature on
        if key in manifest and not isinstance(manifest[key], bool):
            raise PackageError(f"{key} must be true or false, not {manifest[key]!r}")
    clean = {
        **manifest,
        **limits,
        "name": name,
        "kind": kind,
        "runtime": runtime,
        "handler": handler,
        "python": python,
    }
    clean.pop("function_name", None)
    return clean


def check_list_lengths(manifest: dict[str, Any]) -> None:
    """Refuse a manifest listing more packages, system packages, variables or secrets than ``MAX_ITEMS``."""
    environment = manifest.get("environment")
    environment = environment if isinstance(environment, dict) else {}
    lists = {
        "packages": [environment.get("packages")],
        "system packages": [environment.get("system")],
        "environment variables": [manifest.get("env"), environment.get("env")],
        "secrets": [manifest.get("secrets")],
    }
    for what, values in lists.items():
        count = max((len(v) for v in values if isinstance(v, list | dict)), default=0)
        if count > MAX_ITEMS[what]:
            raise PackageError(
                f"the upload lists {count} {what}; at most {MAX_ITEMS[what]} are allowed"
            )


def _read_zip(data: bytes, max_bytes: int) -> dict[str, bytes]:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise PackageError(
            "the upload is neither a .py file nor a valid zip archive", 400
        ) from None
    files, total = {}, 0
    with zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            name = info.filename
            if name.startswith("/") or ".." in name.split("/") or "\\" in name:
                raise PackageError(f"zip entry {name!r} points outside the package", 400)
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise PackageError(
                    f"zip entry {name!r} is a symlink; packages may hold only files", 400
                )
            if info.file_size > 1 << 20 and info.file_size > MAX_RATIO * max(info.compress_size, 1):
                raise PackageError(
                    f"zip entry {name!r} expands {info.file_size // max(info.compress_size, 1)}x; "
                    f"refusing what looks like a zip bomb (limit {MAX_RATIO}x)",
                    413,
                )
            total += info.file_size
            if total > max_bytes * 4:
                raise PackageError(f"the zip expands to more than {max_bytes * 4} bytes", 413)
            try:
                files[name] = zf.read(info)
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise PackageError(f"zip entry {name!r} is damaged: {exc}", 400) from None
    return files
