"""Function packages: deterministic hashes, and every malformed upload refused with a clear reason."""

from __future__ import annotations

import io
import json
import zipfile

import pytest

from nanogrid.packaging import build_zip, package_function
from nanogrid_backend.package_checks import PackageError, from_upload

RUNTIMES = {"python3.11": "3.11"}


def upload(filename: str, data: bytes, **form: object):
    return from_upload(filename, data, form, max_bytes=1 << 20, runtimes=RUNTIMES)


def square(x):
    return x * x


def test_same_function_same_settings_same_id():
    a = package_function(square, memory_mib=256)
    b = package_function(square, memory_mib=256)
    c = package_function(square, memory_mib=512)
    assert a.function_id == b.function_id != c.function_id


def test_controller_keeps_the_clients_package_id(monkeypatch):
    package = package_function(square, runtime="python3.11")
    manifest = dict(package.manifest, python="3.11")  # as if pickled by the runtime's Python
    files = {
        "manifest.json": json.dumps(manifest, sort_keys=True).encode(),
        "function.pkl": b"x",
        "source.py": b"",
    }
    data = build_zip(files)
    assert upload("package.zip", data).data == data


def test_py_file_becomes_a_handler_package():
    package = upload(
        "hello.py",
        b"def handler(event, context):\n    return 1\n",
        name="hello",
        handler="hello.handler",
    )
    assert package.manifest["kind"] == "handler"
    assert package.manifest["runtime"] == "python3.11"


def zip_of(entries: dict[str, bytes], symlink: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = 0o120777 << 16
            zf.writestr(info, "/etc/passwd")
    return buffer.getvalue()


HELLO = b"def handler(event, context):\n    return 1\n"


@pytest.mark.parametrize(
    ("filename", "data", "form", "status", "message"),
    [
        (
            "code.zip",
            b"PK\x03\x04 this is not a zip",
            {"name": "f", "handler": "m.h"},
            400,
            "valid zip",
        ),
        (
            "code.zip",
            zip_of({"../evil.py": HELLO}),
            {"name": "f", "handler": "evil.handler"},
            400,
            "outside",
        ),
        (
            "code.zip",
            zip_of({"/abs.py": HELLO}),
            {"name": "f", "handler": "abs.handler"},
            400,
            "outside",
        ),
        (
            "code.zip",
            zip_of({"m.py": HELLO}, symlink="link"),
            {"name": "f", "handler": "m.handler"},
            400,
            "symlink",
        ),
        (
            "hello.py",
            HELLO,
            {"name": "f", "handler": "hello.handler", "runtime": "python2.7"},
            422,
            "unknown runtime",
        ),
        ("hello.py", HELLO, {"name": "f"}, 422, "handler is required"),
        ("hello.py", HELLO, {"name": "f", "handler": "other.handler"}, 422, "not in the package"),
        (
            "hello.py",
            HELLO,
            {"name": "bad name;rm", "handler": "hello.handler"},
            422,
            "function name",
        ),
        (
            "hello.py",
            HELLO,
            {"name": "f", "handler": "hello.handler", "memory": "lots"},
            422,
            "memory must be a number",
        ),
        ("big.py", b"#" * (2 << 20), {"name": "f", "handler": "big.handler"}, 413, "limit"),
    ],
)
def test_bad_uploads_are_refused(filename, data, form, status, message):
    with pytest.raises(PackageError) as info:
        upload(filename, data, **form)
    assert info.value.status == status
    assert message in str(info.value)


def test_pickle_from_another_python_is_refused_with_the_versions():
    manifest = {"name": "f", "kind": "pickle", "runtime": "python3.11", "python": "3.12"}
    data = zip_of({"manifest.json": json.dumps(manifest).encode(), "function.pkl": b"x"})
    with pytest.raises(PackageError) as info:
        upload("package.zip", data)
    assert info.value.status == 409
    assert "Python 3.12" in str(info.value) and "Python 3.11" in str(info.value)
