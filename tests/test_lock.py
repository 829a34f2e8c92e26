"""The lock files are what gets installed: `make setup` and `.ci/run` install exact, hashed pins, never ranges.

Never: a dependency of pyproject.toml without a pin in requirements.txt (the next upstream release would
change the build), an install command that takes versions from anywhere but the lock files, or a venv
(this one, made by `make setup-test` from the lock files) whose versions differ from them.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


def pins(lock: str) -> dict[str, tuple[str, str]]:
    """name -> (version, marker) of a lock file; every requirement line must be an exact pin with hashes."""
    found, text = {}, (ROOT / lock).read_text()
    for line in text.splitlines():
        if not line or line[0] in "# " or line.startswith("--"):
            continue
        match = PIN.match(line)
        assert match, f"{lock}: not an exact pin: {line!r}"
        name = canonicalize_name(match.group(1).split("[")[0])
        found[name] = (match.group(2), match.group(3) or "")
    assert text.count("--hash=sha256:") >= len(found), f"{lock}: a pin without its hashes"
    return found


def test_every_dependency_is_pinned_with_hashes():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime, test = pins("requirements.txt"), pins("requirements-test.txt")
    for spec in project["dependencies"]:
        assert canonicalize_name(Requirement(spec).name) in runtime, (
            f"{spec} has no pin in requirements.txt"
        )
    for spec in project["optional-dependencies"]["test"]:
        assert canonicalize_name(Requirement(spec).name) in test, (
            f"{spec} has no pin in requirements-test.txt"
        )
    for name, (
        version,
        _,
    ) in runtime.items():  # one set of versions: the test lock extends the runtime one
        assert test.get(name, (version,))[0] == version, (
            f"{name}: {version} in one lock, {test[name][0]} in the other"
        )


def test_installs_come_only_from_the_lock_files():
    makefile = (ROOT / "Makefile").read_text()
    assert "--require-hashes -r requirements.txt" in makefile
    assert "--require-hashes -r requirements-test.txt" in makefile
    assert (
        "--no-deps --no-build-isolation -e ." in makefile
    )  # NanoGrid itself adds nothing unpinned
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make setup-test" in ci and "pip install" not in ci


def test_this_venv_has_exactly_the_locked_versions():
    environment = default_environment()
    wrong = []
    for name, (version, marker) in pins("requirements-test.txt").items():
        if marker and not _applies(marker, environment):
            continue
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            wrong.append(f"{name} {version} not installed")
            continue
        if installed != version:
            wrong.append(f"{name} {installed} installed, {version} locked")
    assert not wrong, "; ".join(wrong)


def _applies(marker: str, environment: dict[str, str]) -> bool:
    from packaging.markers import Marker

    return Marker(marker).evaluate(environment)
