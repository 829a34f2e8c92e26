"""``pip install nanogrid`` is the client alone: a fresh environment with only its dependencies calls a grid.

What must never happen: a server dependency comes with the client (a web framework, the Docker SDK, AWS or Redis
libraries, the build and scheduling tools of the grid), or the client needs one to connect, call and map.
"""

from __future__ import annotations

import email
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from nanogrid.cli import GRID_COMMANDS
from tests.conftest import ROOT

SERVER_MODULES = (
    "fastapi",
    "uvicorn",
    "starlette",
    "docker",
    "boto3",
    "botocore",
    "redis",
    "jinja2",
    "uv",
    "cronsim",
    "ollama",
    "prometheus_client",
)

CLIENT_SCRIPT = """
import sys

import nanogrid

nanogrid.connect(sys.argv[1], api_key=sys.argv[2])


@nanogrid.remote(timeout=30)
def square(x: int) -> int:
    return x * x


print("remote", square.remote(7))
print("map", list(square.map(range(6), progress=False)))
"""


def test_the_grid_registers_exactly_the_commands_the_client_names_without_it():
    """Without the grid, `nanogrid --help` lists its commands by the client's names: they are the grid's own."""
    import argparse

    from nanogrid_backend.cli import add_commands

    sub = argparse.ArgumentParser().add_subparsers()
    add_commands(
        sub,
        client_options=lambda parser: None,
        connect=lambda args: None,
        tour=lambda url, key: None,
    )
    assert tuple(sub.choices) == GRID_COMMANDS


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def client_closure(wheel: Path) -> list[metadata.Distribution]:
    """The distributions installed here that the wheel's requirements without extras reach, each once."""
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        requires = email.message_from_bytes(archive.read(meta)).get_all("Requires-Dist") or []
    pending: list[tuple[str, frozenset[str]]] = [(line, frozenset({""})) for line in requires]
    found: dict[str, metadata.Distribution] = {}
    wanted_extras: dict[str, set[str]] = {}
    while pending:
        line, extras = pending.pop()
        requirement = Requirement(line)
        if requirement.marker and not any(
            requirement.marker.evaluate({"extra": extra}) for extra in extras
        ):
            continue
        name = _normalized(requirement.name)
        new_extras = set(requirement.extras) | {""}
        if name in found and new_extras <= wanted_extras[name]:
            continue
        dist = metadata.distribution(
            requirement.name
        )  # missing here: the test environment lacks a client dependency
        found[name] = dist
        wanted_extras.setdefault(name, set()).update(new_extras)
        pending += [(child, frozenset(wanted_extras[name])) for child in dist.requires or []]
    return list(found.values())


def install_files(dist: metadata.Distribution, site_packages: Path) -> None:
    """Copy a distribution's installed files (its RECORD) under ``site_packages``, as pip laid them out here."""
    root = Path(str(dist.locate_file(""))).resolve()
    for file in dist.files or []:
        source = Path(str(dist.locate_file(file))).resolve()
        if not source.is_relative_to(root) or not source.is_file():
            continue  # console scripts outside site-packages, and the .pyc files this interpreter never wrote
        target = site_packages / source.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment holding the nanogrid wheel and its client dependencies, built offline."""
    where = tmp_path_factory.mktemp("client-install")
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(where / "wheels"),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (where / "wheels").glob("nanogrid-*.whl")
    venv = where / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    (site_packages,) = (venv / "lib").glob("python3*/site-packages")
    for dist in client_closure(wheel):
        install_files(dist, site_packages)
    installed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--no-deps",
            "--no-index",
            "--no-compile",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr
    return venv


def run_in(venv: Path, *args: str) -> subprocess.CompletedProcess:
    """Run a command of ``venv`` as its user would: its bin first on PATH, nothing of this checkout importable."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PYTHON", "VIRTUAL_ENV"))
    }
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env=env, cwd=venv)


@pytest.mark.integration
def test_the_client_alone_has_no_server_dependency(client_venv: Path):
    probe = "import importlib.util as u; print(*[n for n in %r if u.find_spec(n)])" % (
        SERVER_MODULES,
    )
    found = run_in(client_venv, str(client_venv / "bin" / "python"), "-c", probe)
    assert found.returncode == 0, found.stderr
    assert found.stdout.split() == [], (
        f"server dependencies installed with the client: {found.stdout}"
    )


@pytest.mark.integration
def test_the_client_alone_calls_and_maps_on_a_grid(client_venv: Path, grid, tmp_path: Path):
    script = tmp_path / "calls.py"
    script.write_text(CLIENT_SCRIPT)
    done = run_in(
        client_venv, str(client_venv / "bin" / "python"), str(script), grid.url, grid.api_key
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["remote 49", "map [0, 1, 4, 9, 16, 25]"]


@pytest.mark.integration
@pytest.mark.parametrize("command", [["up"], ["up", "--port", "9000"], ["demo"], ["keys", "list"]])
def test_grid_commands_without_the_grid_say_how_to_install_it(
    client_venv: Path, command: list[str]
):
    done = run_in(client_venv, str(client_venv / "bin" / "nanogrid"), *command)
    assert done.returncode == 1
    assert (
        done.stderr
        == "nanogrid: the embedded grid is not installed: pip install 'nanogrid[grid]'\n"
    )
    listed = run_in(client_venv, str(client_venv / "bin" / "nanogrid"), "--help")
    assert (
        listed.returncode == 0
        and "pip install 'nanogrid[grid]'" in listed.stdout
        and "deploy" in listed.stdout
    )


GRID_WITHOUT_AWS = """
import sys, tempfile
from pathlib import Path
for name in ("boto3", "botocore", "redis"):
    sys.modules[name] = None  # not installed: `pip install "nanogrid[grid]"` brings neither
import nanogrid
from nanogrid_backend.config import GridConfig
from nanogrid_backend.embedded import EmbeddedGrid

config = GridConfig.load(data_dir=Path(sys.argv[1]), port=0, sandbox="process", stem_cells=1)
with EmbeddedGrid(config) as grid:
    nanogrid.connect(grid.url, api_key=grid.api_key)

    @nanogrid.remote
    def double(x):
        return 2 * x

    print(double.remote(21), list(double.map([1, 2])))
print(sorted(m for m in sys.modules if m.split(".")[0] in ("boto3", "botocore", "redis") and sys.modules[m]))
"""


def test_the_embedded_grid_runs_without_the_aws_libraries(tmp_path: Path):
    """`nanogrid[grid]` is the embedded grid without boto3 and redis: they are `[aws]`'s, imported only by a grid
    configured for SQS, S3, DynamoDB or Redis."""
    done = subprocess.run(
        [sys.executable, "-c", GRID_WITHOUT_AWS, str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[:2] == ["42 [2, 4]", "[]"], done.stdout
