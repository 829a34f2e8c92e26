"""Environments grown by layers: a new environment that only adds packages to a built one installs only what it adds.

A notebook that imports one more package asks for its environment plus that package. Built from
scratch that is pandas, pyarrow and the rest again (20+ s); grown from the built environment it
is the new distributions alone, resolved with the built one's exact versions as constraints.
The built environment never changes: the new one's site is a tree of hard links to its files
plus the new layer's, and its image is the built one's image plus that layer. When the new
packages need another version of something already built, the caller builds from scratch.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Any

from nanogrid_contract.environments import distribution_name

log = logging.getLogger(__name__)

PINS = "pins.txt"  # every distribution of a built environment, name==version, across its layers
LAYER = (
    "layer"  # what a grown environment added on top of its base (hard links to files of its site)
)
MAX_DEPTH = 20  # layers grown on one full build, far below Docker's limit of 127 layers in an image


def installed_pins(site: Path) -> dict[str, str]:
    """name -> version of every distribution installed in ``site`` (from its ``.dist-info`` folders)."""
    pins = {}
    for info in site.glob("*.dist-info"):
        name, _, version = info.name.removesuffix(".dist-info").rpartition("-")
        if name:
            pins[distribution_name(name)] = version
    return pins


def pins_text(pins: dict[str, str]) -> str:
    return "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))


def read_pins(folder: Path) -> dict[str, str] | None:
    """A built environment's pins, or None for one built before pins were kept (it is never grown)."""
    try:
        lines = (folder / PINS).read_text().split()
    except OSError:
        return None
    return dict(line.split("==", 1) for line in lines if "==" in line)


def choose_base(
    spec: dict[str, Any], built: list[dict[str, Any]], root: Path
) -> dict[str, Any] | None:
    """The built environment to grow ``spec`` from: the same Python, platform and Debian packages, and packages
    that ``spec`` all asks for too (the one with the most of them); None when there is none."""
    wanted = set(spec["packages"])
    candidates = [
        info
        for info in built
        if info["spec"]["python"] == spec["python"]
        and info["spec"]["system"] == spec["system"]
        and info["spec"].get("platform") == spec.get("platform")
        and info["spec"]["packages"]
        and set(info["spec"]["packages"]) <= wanted
        and info.get("depth", 0) < MAX_DEPTH
        and (root / info["env_id"] / PINS).is_file()
    ]
    return max(
        candidates,
        key=lambda info: (len(info["spec"]["packages"]), info["last_used"]),
        default=None,
    )


def resolve_on(
    uv: list[str],
    spec: dict[str, Any],
    base: dict[str, Any],
    base_pins: dict[str, str],
    work: Path,
    timeout_s: float,
) -> dict[str, str] | None:
    """What ``spec`` needs beyond ``base_pins`` (name -> version): the packages it adds to ``base``'s, resolved
    with the base's versions as constraints (the base's own packages are met by its pins already, and adding
    packages never changes what they need); None when they cannot be resolved that way (the caller then
    builds from scratch)."""
    adding = [p for p in spec["packages"] if p not in set(base["spec"]["packages"])]
    if not adding:
        return {}
    (work / "requirements.in").write_text("".join(f"{p}\n" for p in adding))
    (work / "constraints.txt").write_text(pins_text(base_pins))
    command = [
        *uv,
        "pip",
        "compile",
        "--quiet",
        "--no-header",
        "--no-annotate",
        "--python-version",
        spec["python"],
        "--python-platform",
        spec["platform"],
        "--only-binary",
        ":all:",
        "--no-progress",
        "--constraint",
        str(work / "constraints.txt"),
        str(work / "requirements.in"),
    ]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL
        )
    except (subprocess.TimeoutExpired, OSError) as exc:
        log.info(
            "could not resolve on the built environment (%s); building from scratch",
            type(exc).__name__,
        )
        return None
    if done.returncode != 0:
        log.info(
            "the new packages do not fit the built environment's versions; building from scratch: %s",
            done.stderr.strip()[-500:],
        )
        return None
    resolved = {}
    for line in done.stdout.splitlines():
        requirement = line.split(";", 1)[0].split("#", 1)[0].strip()
        if "==" in requirement:
            name, version = requirement.split("==", 1)
            resolved[distribution_name(name)] = version.strip()
    if any(name in base_pins and base_pins[name] != version for name, version in resolved.items()):
        return None  # constraints hold versions, but an environment that differs is never used
    return {name: version for name, version in resolved.items() if name not in base_pins}


def link_tree(source: Path, target: Path) -> None:
    """Put every file of ``source`` into ``target`` as a hard link (a file already there is replaced, never written
    through: it may be a link to a built environment's file). Same file system only (both under the cache)."""
    for folder, folders, files in os.walk(source):
        here = os.path.join(target, os.path.relpath(folder, source))
        os.makedirs(here, exist_ok=True)
        for name in [*files, *(d for d in folders if os.path.islink(os.path.join(folder, d)))]:
            origin, copy = os.path.join(folder, name), os.path.join(here, name)
            link = (
                (lambda o, c: os.symlink(os.readlink(o), c)) if os.path.islink(origin) else os.link
            )
            try:
                link(origin, copy)
            except FileExistsError:
                os.unlink(copy)
                link(origin, copy)


def describe(base: dict[str, Any], added: dict[str, str], layer_bytes: int) -> dict[str, Any]:
    """What env.json records of a grown environment: its base, how many layers it sits on, what it added, and its
    size (the base's files, linked, plus the layer's: counted for both, as if copied)."""
    return {
        "base": base["env_id"],
        "depth": base.get("depth", 0) + 1,
        "added": sorted(added),
        "size": base["size"] + layer_bytes,
    }
