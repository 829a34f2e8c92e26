"""The public API as a type checker sees it: mypy on a user's script, the way their editor and CI run it.

What must never happen: `@nanogrid.remote` turning a function into `Any` or `object` (so a wrong
argument type passes silently until it fails on the grid), `.remote()` losing the return type, or
a documented name that a type checker cannot find.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

USER_SCRIPT = textwrap.dedent("""
    import nanogrid

    @nanogrid.remote
    def square(x: int) -> int:
        return x * x

    @nanogrid.remote(memory=256, timeout=30)
    def greet(name: str, punctuation: str = "!") -> str:
        return name + punctuation

    nanogrid.connect("http://127.0.0.1:8765")
    value: int = square.remote(7)
    job: nanogrid.Job[str] = greet.spawn("Ada", punctuation="?")
    text: str = job.result(timeout=10)
    squares: list[int] = list(square.map(range(3), progress=False))
    here: int = square(3)
    again: str = greet.with_options(model="tiny").remote("Bob")
    function: nanogrid.RemoteFunction[[int], int] = square
    try:
        square.remote(1)
    except (nanogrid.InvalidArguments, nanogrid.APIError, nanogrid.NanoGridError) as exc:
        print(exc)
""")

MISTAKES = {  # a line a user might write -> what mypy must say about it
    'square.remote("seven")': 'Argument 1 to "remote" of "RemoteFunction" has incompatible type "str"; expected "int"',
    'greet.spawn("Ada", punctuation=1)': 'Argument "punctuation" to "spawn" of "RemoteFunction" has incompatible type',
    "square.remote(1, 2)": 'Too many arguments for "remote" of "RemoteFunction"',
    'wrong: int = greet.remote("Ada")': 'Incompatible types in assignment (expression has type "str", variable has',
    "greet.spawn().result()": 'Missing positional argument "name" in call to "spawn" of "RemoteFunction"',
    'square("seven")': 'Argument 1 to "__call__" of "RemoteFunction" has incompatible type "str"; expected "int"',
}


def test_mypy_checks_remote_calls_against_the_functions_own_signature(tmp_path):
    script = tmp_path / "user_script.py"
    lines = USER_SCRIPT.splitlines()
    first_mistake = len(lines) + 1
    script.write_text("\n".join([*lines, *MISTAKES]) + "\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--no-incremental",
            "--cache-dir",
            os.devnull,
            "--python-version",
            "3.11",
            "--strict-optional",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            str(script),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "MYPYPATH": str(ROOT)},
        timeout=600,
    )
    errors: dict[int, str] = {}
    for line in result.stdout.splitlines():
        found = re.match(rf"{re.escape(script.name)}:(\d+): error: (.*)", line)
        if found:
            errors[int(found.group(1))] = errors.get(int(found.group(1)), "") + found.group(2)
    assert {n: e for n, e in errors.items() if n < first_mistake} == {}, (
        result.stdout
    )  # the correct script is clean
    for offset, (code, message) in enumerate(MISTAKES.items()):
        assert message in errors.get(first_mistake + offset, ""), (
            f"{code!r} not reported: {result.stdout}"
        )


def test_the_wheel_ships_the_typed_marker_and_only_unambiguous_packages(tmp_path):
    """Without nanogrid/py.typed in the installed package, mypy treats all of nanogrid as untyped (Any)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = tmp_path.glob("nanogrid-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        assert "nanogrid/py.typed" in zf.namelist()
        # Installed import names a user's own code cannot collide with (a `backend` package is common).
        top_level = {
            name.split("/")[0]
            for name in zf.namelist()
            if not name.split("/")[0].endswith(".dist-info")
        }
        assert top_level == {
            "nanogrid",
            "nanogrid_contract",
            "nanogrid_backend",
            "nanogrid_runtimes",
        }, top_level
