"""What a grid leaves on the host when it dies without closing its sandboxes, found by the grid's identity.

The identity is a hash of the grid's sandbox directory (``<data dir>/sandboxes``), so two grids on one
machine never take each other's sandboxes for leftovers. Containers carry it as the label
``nanogrid.grid=<identity>``, memory cgroups in their name ``nanogrid/<identity>-<sandbox id>``, and work
directories live in that sandbox directory. A grid sweeps its own at start and at shutdown;
``nanogrid doctor`` lists them and ``--clean`` removes them while no grid runs on the data dir.

Releases before the identity named containers ``nanogrid-ctr-<id>`` without the label and cgroups
``nanogrid/proc-<id>``. Those are taken as this grid's only on evidence from its data dir: their sandbox
directory is there, a container's mount comes from it, or a cgroup's process works in it; a legacy
container or cgroup of another data dir (another grid, live or not) is never touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanogrid_backend.sandbox import cgroup, scratch

SANDBOX_PREFIXES = ("proc-", "ctr-")  # the names of sandbox work and output directories
# before containers carried nanogrid.grid
LEGACY_CONTAINER = re.compile(r"nanogrid-(ctr-[0-9a-f]{12})")
LEGACY_CGROUP = re.compile(r"proc-[0-9a-f]{12}")  # before cgroups carried the grid's identity


def grid_identity(sandbox_dir: Path) -> str:
    """The grid's identity on this host: what its containers are labelled with and its cgroups named after."""
    return hashlib.sha256(str(sandbox_dir.resolve()).encode()).hexdigest()[:16]


def sandbox_dirs(sandbox_dir: Path) -> list[Path]:
    """Sandbox work and output directories (every one is a leftover while no grid runs on the data dir)."""
    try:
        return sorted(
            path for path in sandbox_dir.iterdir() if path.name.startswith(SANDBOX_PREFIXES)
        )
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
    # sandboxes' scratch disks still mounted (scratch.py)
    disks: list[str] = field(default_factory=list)
    docker_problem: str = (
        ""  # why containers could not be listed ('' when they could, or no engine is installed)
    )

    @property
    def count(self) -> int:
        return len(self.directories) + len(self.cgroups) + len(self.containers) + len(self.disks)


def find(sandbox_dir: Path) -> Leftovers:
    """Everything of this grid's sandboxes that exists on the host now, older releases' included."""
    identity = grid_identity(sandbox_dir)
    found = Leftovers(
        identity,
        sandbox_dirs(sandbox_dir),
        cgroup.ours(identity + "-") + legacy_cgroups(sandbox_dir),
        disks=scratch.mounted_under(sandbox_dir),
    )
    client, found.docker_problem = _docker()
    if client is not None:
        try:
            found.containers = sorted(
                c.name
                for c in client.containers.list(
                    all=True, filters={"label": f"nanogrid.grid={identity}"}, ignore_removed=True
                )
            )
            found.containers += legacy_containers(client, sandbox_dir)
        except Exception as exc:  # the engine went away between the ping and the list
            found.docker_problem = f"the Docker engine did not list containers ({exc})"
    return found


def clean(sandbox_dir: Path) -> Leftovers:
    """Remove what ``find`` lists (containers forcibly); returns what was there."""
    found = find(sandbox_dir)
    client, _ = _docker()
    if client is not None:
        for name in found.containers:
            try:
                client.containers.get(name).remove(force=True)
            # gone meanwhile, or the engine refused: `doctor` shows it again next time
            except Exception:
                pass
    for path in found.cgroups:  # before the directories: they are a legacy cgroup's evidence
        cgroup.sweep(path.name)
    cgroup.sweep(found.identity + "-")
    remove_dirs(sandbox_dir)
    return found


def remove_legacy(sandbox_dir: Path, client: Any = None) -> int:
    """Remove older releases' containers and cgroups of this data dir (before its directories, their evidence);
    how many. ``client``: the Docker engine, asked only where a sandbox directory of a container is left."""
    removed = sum(cgroup.sweep(path.name) for path in legacy_cgroups(sandbox_dir))
    if client is None and any(path.name.startswith("ctr-") for path in sandbox_dirs(sandbox_dir)):
        client, _ = _docker()
    if client is not None:
        for name in legacy_containers(client, sandbox_dir):
            with contextlib.suppress(Exception):  # gone meanwhile: nothing left to remove
                client.containers.get(name).remove(force=True)
                removed += 1
    return removed


def legacy_containers(client: Any, sandbox_dir: Path) -> list[str]:
    """Containers an older release started for this data dir: no grid label, and their sandbox directory is here
    or one of their mounts comes from here."""
    root = str(sandbox_dir.resolve()) + "/"
    found = []
    for container in client.containers.list(
        all=True, filters={"name": "nanogrid-ctr-"}, ignore_removed=True
    ):
        named = LEGACY_CONTAINER.fullmatch(container.name or "")
        if named is None or "nanogrid.grid" in (container.labels or {}):
            continue
        sources = [str(mount.get("Source", "")) for mount in container.attrs.get("Mounts") or []]
        if (sandbox_dir / named[1]).exists() or any(source.startswith(root) for source in sources):
            found.append(container.name)
    return sorted(found)


def legacy_cgroups(sandbox_dir: Path) -> list[Path]:
    """Memory cgroups an older release made for this data dir's sandboxes: its directory of that sandbox is
    here, or a process in the cgroup works in this sandbox directory."""
    marker = f"NANOGRID_WORK_DIR={sandbox_dir.resolve()}/".encode()
    found = []
    for path in cgroup.ours("proc-"):
        if not LEGACY_CGROUP.fullmatch(path.name):
            continue
        if (sandbox_dir / path.name).exists() or any(
            marker in _environ(pid) for pid in _pids(path)
        ):
            found.append(path)
    return found


def _pids(path: Path) -> list[str]:
    try:
        return (path / "cgroup.procs").read_text().split()
    except OSError:
        return []


def _environ(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


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
