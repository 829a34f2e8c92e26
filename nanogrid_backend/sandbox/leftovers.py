"""What a grid leaves on the host when it dies without closing its sandboxes, found by the grid's identity.

The identity is a hash of the grid's sandbox directory (``<data dir>/sandboxes``), so two grids on one
machine never take each other's sandboxes for leftovers. Containers carry it as the label
``nanogrid.grid=<identity>``, memory cgroups in their name ``nanogrid/<identity>-<sandbox id>``, and work
directories live in that sandbox directory. A grid sweeps its own at start and at shutdown;
``nanogrid doctor`` lists them and ``--clean`` removes them while no grid runs on the data dir.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanogrid_backend.sandbox import cgroup, scratch

SANDBOX_PREFIXES = ("proc-", "ctr-")  # the names of sandbox work and output directories


def grid_identity(sandbox_dir: Path) -> str:
    """The grid's identity on this host: what its containers are labelled with and its cgroups named after."""
    return hashlib.sha256(str(sandbox_dir.resolve()).encode()).hexdigest()[:16]


def sandbox_dirs(sandbox_dir: Path) -> list[Path]:
    """Sandbox work and output directories (every one is a leftover while no grid runs on the data dir)."""
    try:
        return sorted(path for path in sandbox_dir.iterdir() if path.name.startswith(SANDBOX_PREFIXES))
    except FileNotFoundError:
        return []


def remove_dirs(sandbox_dir: Path) -> int:
    """Remove the sandbox directories ``sandbox_dirs`` names; how many there were. Their scratch disks are
    unmounted and detached first, so removal never walks into a filesystem a function filled."""
    scratch.sweep(sandbox_dir)
    found = sandbox_dirs(sandbox_dir)
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return len(found)


@dataclass
class Leftovers:
    identity: str
    directories: list[Path] = field(default_factory=list)
    cgroups: list[Path] = field(default_factory=list)
    containers: list[str] = field(default_factory=list)  # names, e.g. nanogrid-ctr-0123456789ab
    disks: list[str] = field(default_factory=list)  # sandboxes' scratch disks still mounted (scratch.py)
    docker_problem: str = ""  # why containers could not be listed ('' when they could, or no engine is installed)

    @property
    def count(self) -> int:
        return len(self.directories) + len(self.cgroups) + len(self.containers) + len(self.disks)


def find(sandbox_dir: Path) -> Leftovers:
    """Everything of this grid's sandboxes that exists on the host now."""
    identity = grid_identity(sandbox_dir)
    found = Leftovers(identity, sandbox_dirs(sandbox_dir), cgroup.ours(identity + "-"),
                      disks=scratch.mounted_under(sandbox_dir))
    client, found.docker_problem = _docker()
    if client is not None:
        try:
            found.containers = sorted(c.name for c in client.containers.list(
                all=True, filters={"label": f"nanogrid.grid={identity}"}, ignore_removed=True))
        except Exception as exc:  # the engine went away between the ping and the list
            found.docker_problem = f"the Docker engine did not list containers ({exc})"
    return found


def clean(sandbox_dir: Path) -> Leftovers:
    """Remove what ``find`` lists (containers forcibly); returns what was there."""
    found = find(sandbox_dir)
    remove_dirs(sandbox_dir)
    cgroup.sweep(found.identity + "-")
    client, _ = _docker()
    if client is not None:
        for name in found.containers:
            try:
                client.containers.get(name).remove(force=True)
            except Exception:  # gone meanwhile, or the engine refused: `doctor` shows it again next time
                pass
    return found


def _docker() -> tuple[Any, str]:
    """A Docker client, or None and why not ('' when no engine is installed: nothing to look at)."""
    try:
        import docker
        import docker.errors
    except ImportError:
        return None, ""
    try:
        client = docker.from_env(timeout=10)
        client.ping()
        return client, ""
    except docker.errors.DockerException as exc:
        if not Path("/var/run/docker.sock").exists():
            return None, ""
        return None, f"the Docker engine does not answer ({exc})"
