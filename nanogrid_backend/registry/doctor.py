"""``nanogrid doctor``: the state of a data dir's registry, and its repair from the newest good backup.

Looking never changes anything (no migration, no file created); repairing keeps the damaged file aside.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from nanogrid_backend.registry.base import RegistryError
from nanogrid_backend.registry.lock import holder_pid
from nanogrid_backend.registry.sqlite import (
    SCHEMA_VERSION,
    copy_database,
    diagnose,
    earlier_grid_evidence,
    list_backups,
    read_only_uri,
    registry_files,
)

REGISTRY_FILE = "registry.sqlite3"


@dataclass
class FileState:
    path: Path
    size: int = 0
    version: int = 0
    problem: str = ""  # what is wrong, or ''
    jobs: dict[str, int] = field(default_factory=dict)
    functions: int = 0
    keys: int = 0

    @property
    def ok(self) -> bool:
        return not self.problem


@dataclass
class Report:
    registry: FileState
    backups: list[FileState]
    grid_pid: int | None  # the grid running on this data dir, if any

    @property
    def healthy(self) -> bool:
        return self.registry.ok


def examine(path: Path) -> FileState:
    """What a registry (or a backup of one) holds, and what is wrong with it; never writes to it."""
    state = FileState(path)
    if not path.exists():
        state.problem = "missing"
        return state
    state.size = path.stat().st_size
    if state.size == 0:
        state.problem = "empty (0 bytes)"
        return state
    db = sqlite3.connect(read_only_uri(path), uri=True)  # never writes, on a full disk too
    try:
        state.version, state.problem = diagnose(db, path)
        if not state.problem and state.version > SCHEMA_VERSION:
            state.problem = f"schema version {state.version} is newer than this NanoGrid's {SCHEMA_VERSION}: upgrade"
        if not state.problem:
            state.jobs = dict(
                db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
            )
            state.functions = db.execute("SELECT COUNT(*) FROM functions").fetchone()[0]
            tables = {
                row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
            state.keys = (
                db.execute("SELECT COUNT(*) FROM api_keys").fetchone()[0]
                if "api_keys" in tables
                else 0
            )
    except sqlite3.DatabaseError as exc:
        state.problem = str(exc)
    finally:
        db.close()
    return state


def inspect(data_dir: Path) -> Report:
    path = data_dir / REGISTRY_FILE
    registry = examine(path)
    if registry.problem in ("missing", "empty (0 bytes)") and not earlier_grid_evidence(path):
        registry.problem = ""  # a new data dir: the first `nanogrid up` makes the registry
    return Report(
        registry, [examine(backup) for backup in reversed(list_backups(path))], holder_pid(data_dir)
    )


def repair(data_dir: Path) -> list[str]:
    """Put the newest good backup in place of a damaged, truncated, empty or missing registry.

    Returns what was done, one line each. Refuses while a grid runs on the data dir.
    """
    report = inspect(data_dir)
    if report.grid_pid is not None:
        raise RegistryError(
            f"a grid (pid {report.grid_pid}) is running on {data_dir}: stop it before --repair"
        )
    path = report.registry.path
    if report.healthy:
        return [f"{path} is healthy: nothing to repair"]
    if report.registry.version > SCHEMA_VERSION:
        raise RegistryError(
            f"{path} was written by a newer NanoGrid (schema {report.registry.version}): upgrade "
            "NanoGrid instead of restoring an older copy"
        )
    good = next((b for b in report.backups if b.ok), None)
    if good is None:
        tried = (
            f" ({len(report.backups)} backups, all damaged)"
            if report.backups
            else " (there are no backups)"
        )
        raise RegistryError(
            f"no good backup of {path}{tried}: move {data_dir} aside to start a new grid, "
            "or restore a copy of the registry from elsewhere"
        )
    done = []
    if path.exists():
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        aside = path.with_name(f"{path.name}.damaged-{stamp}")
        # the -wal too: replayed onto the restored copy it would damage it again
        for file in registry_files(path):
            if file.exists():
                os.replace(file, aside.with_name(aside.name + file.name.removeprefix(path.name)))
        done.append(f"moved the damaged registry aside to {aside.name}")
    source = sqlite3.connect(f"file:{good.path}?mode=ro", uri=True)
    try:
        copy_database(source, path)
    finally:
        source.close()
    when = datetime.fromtimestamp(good.path.stat().st_mtime).strftime("%Y-%m-%d %H:%M:%S")
    total = sum(good.jobs.values())
    done.append(
        f"restored {good.path.name} (made {when}: {total} jobs, {good.functions} functions, {good.keys} keys); "
        "what was recorded after it is lost"
    )
    return done
