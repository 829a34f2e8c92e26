"""The Python bootstrap: its own helpers, run in this process (no sandbox), and the bootstrap itself on the oldest
Python a runtime may be built for."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import time
import zipfile
from pathlib import Path

import cloudpickle
import pytest

from nanogrid.packaging import package_function
from tests.conftest import ROOT, require


@pytest.fixture
def bootstrap(tmp_path, monkeypatch):
    path = ROOT / "nanogrid_runtimes" / "python" / "bootstrap.py"
    spec = importlib.util.spec_from_file_location("nanogrid_bootstrap_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "CODE_DIR", str(tmp_path))
    return module


def test_remote_traceback_shows_source_lines_whatever_name_pickling_gives_the_code(
    bootstrap, tmp_path
):
    """What must never happen: a pickler renaming code objects (cloudpickle 3.1.3 did) hides the user's lines."""

    def restock(item):
        def check():
            raise LookupError(f"no {item} left")

        return check()

    package = package_function(restock)
    with zipfile.ZipFile(io.BytesIO(package.data)) as zf:
        zf.extractall(tmp_path)
        function = cloudpickle.loads(zf.read("function.pkl"))
    # Whatever a future pickler calls the code, the bootstrap must give it back its name.
    function.__code__ = bootstrap.with_source_file(function.__code__, "<renamed-by-some-pickler>")
    bootstrap.remember_source(package.manifest)
    bootstrap.restore_source_file(function, package.manifest)
    with pytest.raises(LookupError) as info:
        function("apples")
    error, _ = bootstrap.describe_error(info.value, cloudpickle)
    assert 'raise LookupError(f"no {item} left")' in error["traceback"]
    assert "return check()" in error["traceback"]
    assert package.manifest["source_file"] in error["traceback"]
    assert "<renamed-by-some-pickler>" not in error["traceback"]


def test_both_sides_speak_one_frame_format(bootstrap):
    """The host's codec (nanogrid_backend/sandbox/protocol.py) and the bootstrap's must never drift apart."""
    import os

    from nanogrid_backend.sandbox.protocol import FrameReader, encode_frame

    header, body = {"op": "call", "job_id": "job-1", "text": "ünïcode"}, bytes(range(256)) * 10
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, encode_frame(header, body))  # host -> bootstrap
        assert bootstrap.read_frame(read_fd) == (header, body)
        bootstrap.write_frame(write_fd, header, body)  # bootstrap -> host
        assert FrameReader(read_fd).read(None, len(body)) == (header, body)
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_the_sandbox_image_ships_every_module_its_modules_import():
    """A nanogrid (or contract) module imported at module level by one the image ships must be shipped too (else
    every Docker call fails at run time); the image build also imports each shipped module once."""
    import ast

    from nanogrid_runtimes.build import CONTRACT_MODULES, NANOGRID_MODULES

    files = {("nanogrid", name) for name in NANOGRID_MODULES} | {
        ("nanogrid_contract", n) for n in CONTRACT_MODULES
    }
    shipped = {
        package if name == "__init__.py" else f"{package}.{name.removesuffix('.py')}"
        for package, name in files
    }
    for package, name in sorted(files):
        tree = ast.parse((ROOT / package / name).read_text())
        for node in tree.body:  # module level only: lazy imports inside functions are the client's
            if isinstance(node, ast.ImportFrom) and node.module:
                # `from a.b import c` needs a.b shipped, or a.b.c where c is a module
                imported = [{node.module, f"{node.module}.{alias.name}"} for alias in node.names]
            elif isinstance(node, ast.Import):
                imported = [{alias.name} for alias in node.names]
            else:
                continue
            for names in imported:
                if any(n.split(".")[0] in ("nanogrid", "nanogrid_contract") for n in names):
                    assert names & shipped, (
                        f"{package}/{name} imports {min(names)}, which the image does not ship"
                    )


SHOUT = """
import sys

def handler(event, context):
    return {"shout": event["word"].upper(), "python": "%d.%d" % sys.version_info[:2], "job": context["job_id"]}
"""


@pytest.mark.integration
def test_a_batch_of_calls_is_served_on_the_oldest_python_a_runtime_may_be_built_for(tmp_path):
    """A runtime may be built for Python 3.9 (nanogrid_contract.environments.PYTHONS): there the bootstrap must serve
    a batch of calls (``calls``) as on the grid's own Python, each call answered, not the sandbox lost."""
    from nanogrid_backend.builds.builder import interpreter_for
    from nanogrid_backend.sandbox.protocol import FrameReader, encode_frame
    from nanogrid_contract.environments import PYTHONS

    oldest = PYTHONS[0]
    python = interpreter_for(oldest)
    require(
        python is not None, f"no Python {oldest} interpreter (pyenv's, or python{oldest} on PATH)"
    )
    site = tmp_path / "site"
    site.mkdir()
    (site / "cloudpickle").symlink_to(
        Path(cloudpickle.__file__).parent
    )  # pure Python: the same code runs there
    package = io.BytesIO()
    with zipfile.ZipFile(package, "w") as zf:
        zf.writestr(
            "manifest.json",
            json.dumps(
                {"kind": "handler", "handler": "shout.handler", "name": "shout", "memory": 128}
            ),
        )
        zf.writestr("shout.py", SHOUT)
    events = [json.dumps({"word": word}).encode() for word in ("apples", "pears")]
    calls = {
        "op": "calls",
        "measure_rss": True,
        "model": None,
        "calls": [
            {"job_id": f"job-{n}", "timeout": 30, "size": len(e)} for n, e in enumerate(events)
        ],
    }
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(site),
        "NANOGRID_WORK_DIR": str(tmp_path / "work"),
    }
    bootstrap = ROOT / "nanogrid_runtimes" / "python" / "bootstrap.py"
    with subprocess.Popen(
        [str(python), "-s", str(bootstrap)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        reader = FrameReader(proc.stdout.fileno())
        deadline = time.monotonic() + 60
        ready, _ = reader.read(deadline, 0)
        assert ready["op"] == "ready" and ready["python"] == oldest
        proc.stdin.write(
            encode_frame({"op": "load", "env": {}}, package.getvalue())
            + encode_frame(calls, b"".join(events))
        )
        proc.stdin.flush()
        assert reader.read(deadline, 0)[0]["ok"] is True  # loaded
        answers = [reader.read(deadline, 1 << 20) for _ in events]
        proc.stdin.close()
        assert proc.wait(30) == 0
    assert [reply["ok"] for reply, _ in answers] == [True, True]
    assert [json.loads(result) for _, result in answers] == [
        {"shout": "APPLES", "python": oldest, "job": "job-0"},
        {"shout": "PEARS", "python": oldest, "job": "job-1"},
    ]


def test_the_output_directory_is_found_again_when_a_function_replaces_it(bootstrap, tmp_path):
    """What must never happen: a call's files counted in a directory the function removed or replaced (its files
    then lost, or left for the next call). A directory that is no mount point is looked up by its path each time;
    one that is (the sandboxes' own disks) is held open, as no function can replace it."""
    out = tmp_path / "output"
    output = bootstrap.OutputDir(str(out))
    assert output.ref == str(out) and output.empty() and output.count_files() == 0
    (out / "a.txt").write_text("a")
    assert output.count_files() == 1
    output.clear()
    assert output.empty() and out.is_dir()
    out.rmdir()
    out.mkdir()  # replaced by the function: a new directory at the same path
    (out / "sub").mkdir()
    (out / "sub" / "b.txt").write_text("b")
    assert output.count_files() == 1
    out.joinpath("sub", "b.txt").unlink()
    out.joinpath("sub").rmdir()
    out.rmdir()  # removed: made again, empty, for the next call
    assert not output.empty()
    output.clear()
    assert out.is_dir() and output.empty()
    out.rmdir()
    out.write_text("not a directory")  # a file in its place
    assert not output.empty()
    with pytest.raises(FileExistsError):
        output.clear()  # as before: a call cannot start there, and says so


def test_a_mount_point_output_directory_is_read_through_a_descriptor(
    bootstrap, monkeypatch, tmp_path
):
    """Per call, no path is looked up (in a container on fuse-overlayfs each lookup from / is a round trip through
    the storage daemon): the directory is listed through the descriptor opened at start."""
    out = tmp_path / "output"
    monkeypatch.setattr(bootstrap.os.path, "ismount", lambda path: path == str(out))
    output = bootstrap.OutputDir(str(out))
    assert isinstance(output.ref, int)
    listed = []
    listdir = os.listdir
    monkeypatch.setattr(bootstrap.os, "listdir", lambda ref: listed.append(ref) or listdir(ref))
    output.clear()
    assert output.count_files() == 0
    assert listed and all(ref == output.ref for ref in listed)
    (out / "a.txt").write_text("a")
    assert output.count_files() == 1
    output.clear()
    assert output.empty() and not any(out.iterdir())
