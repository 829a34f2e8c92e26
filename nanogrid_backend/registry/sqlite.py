"""The registry in one SQLite file (WAL mode), versioned with ``PRAGMA user_version`` and migrated forward at open.

Opening checks the file before anything else touches it: a damaged, truncated or newer registry is refused
with one line that names the way out, and an empty one is never taken for a new grid when the data dir
shows an earlier grid was there. Every write runs in one transaction that commits or rolls back; a write
lock held by another process (an operator's ``sqlite3`` shell, a backup) only delays writes.
"""

from __future__ import annotations

import json
import logging
import operator
import os
import re
import shutil
import sqlite3
import threading
import time
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import MISSING, Field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from nanogrid_backend.models import (
    FAILED,
    FINAL_STATES,
    PENDING,
    RUNNING,
    ApiKey,
    FiringRecord,
    FunctionRecord,
    JobRecord,
    ScheduleRecord,
    SecretRecord,
)
from nanogrid_backend.registry import windows
from nanogrid_backend.registry.base import (
    FunctionStats,
    HistoryEntry,
    Registry,
    RegistryBusy,
    RegistryError,
    VolumeRegistry,
)

T = TypeVar("T")
log = logging.getLogger(__name__)

# While another process holds the registry's lock, a read waits for it inside SQLite (the busy timeout); a write
# never does: its transaction is tried again, after pauses growing to RETRY_PAUSE_S, until LOCK_WAIT_S has passed,
# then RegistryBusy. Writes go through one connection whose busy timeout stays 0, so the event loop's write
# (create_jobs_now) can try once and step aside without switching the timeout off and on around it.
BUSY_TIMEOUT_S = 5.0
LOCK_WAIT_S = 30.0
RETRY_PAUSE_S = 0.05
RETRY_PAUSES_S = (
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
)  # the first pauses: a lock held for a short write frees soon
BACKUPS_KEPT = 3  # copies made at each grid start: registry.sqlite3.bak-<UTC time>
FILE_MODE, DIR_MODE = 0o600, 0o700
SQLITE_HEADER = b"SQLite format 3\x00"
# Below this much free space on the data disk SQLite cannot make the shared-memory index of a WAL registry (-shm):
# the registry then opens in exclusive locking mode, which keeps that index in memory, and the start-up backup waits.
ROOM_TO_OPEN = 1 << 20
FIRINGS_KEPT = (
    1000  # per schedule, the newest; older due times are long past, so none can be claimed again
)

# Version 1 as the code before versioning wrote it (from the dataclass fields, untyped), now with types.
_FUNCTIONS_V1 = (
    "function_id TEXT PRIMARY KEY, function_name TEXT, runtime TEXT, handler TEXT, kind TEXT, "
    "memory_mib INTEGER, timeout_s REAL, package_size INTEGER, python TEXT, source TEXT, "
    "created_at REAL, owner TEXT NOT NULL DEFAULT ''"
)
_JOBS_V1 = (
    "job_id TEXT PRIMARY KEY, function_id TEXT, status TEXT, payload_format TEXT, payload BLOB, "
    "result_format TEXT, result BLOB, error TEXT, stdout TEXT, stderr TEXT, output_files TEXT, "
    "execution_time_ms REAL, peak_memory_bytes INTEGER, cold INTEGER, memory_limit_mib INTEGER, "
    "baseline_memory_bytes INTEGER, ai_usage TEXT, worker_id TEXT, sandbox_id TEXT, created_at REAL, "
    "started_at REAL, finished_at REAL, owner TEXT NOT NULL DEFAULT ''"
)
_KEYS_V1 = (
    "key_id TEXT PRIMARY KEY, name TEXT, key_hash TEXT, created_at REAL, revoked_at REAL, rate_limit REAL, "
    "rate_burst INTEGER"
)
_TABLES_V1 = {"functions": _FUNCTIONS_V1, "jobs": _JOBS_V1, "api_keys": _KEYS_V1}
_JOB_STATS = (
    "function_id TEXT NOT NULL, resolution INTEGER NOT NULL, slot INTEGER NOT NULL, metric TEXT NOT NULL, "
    "bucket INTEGER NOT NULL, n INTEGER NOT NULL, failed INTEGER NOT NULL, cold INTEGER NOT NULL, "
    "total REAL NOT NULL, max_value REAL, PRIMARY KEY (function_id, resolution, slot, metric, bucket)"
)
_WEBHOOKS = (
    "hook_id TEXT PRIMARY KEY, owner TEXT NOT NULL, url TEXT NOT NULL, secret TEXT NOT NULL, "
    "events TEXT NOT NULL, function_id TEXT, threshold TEXT, created_at REAL NOT NULL"
)
_SCHEDULES = (
    "schedule_id TEXT PRIMARY KEY, owner TEXT NOT NULL, name TEXT NOT NULL, function_id TEXT NOT NULL, "
    "cron TEXT NOT NULL DEFAULT '', period_s REAL NOT NULL DEFAULT 0, timezone TEXT NOT NULL DEFAULT 'UTC', "
    "overlap TEXT NOT NULL DEFAULT 'skip', payload_format TEXT NOT NULL, payload BLOB NOT NULL, "
    "paused INTEGER NOT NULL DEFAULT 0, anchor REAL NOT NULL, next_due REAL NOT NULL, last_job_id TEXT, "
    "waiting_due REAL, created_at REAL, updated_at REAL"
)
# The primary key is the claim: a second scheduler's insert of the same (schedule, due time) fails.
_FIRINGS_TABLE = (
    "schedule_id TEXT NOT NULL, due_time REAL NOT NULL, fired_at REAL NOT NULL, outcome TEXT NOT NULL, "
    "job_id TEXT, missed INTEGER NOT NULL DEFAULT 1, catch_up INTEGER NOT NULL DEFAULT 0, "
    "detail TEXT NOT NULL DEFAULT '', PRIMARY KEY (schedule_id, due_time)"
)

# The schema's history. Entry N takes a registry from version N to N+1; a registry opens at version 0
# (new, or written before versioning) and every pending entry runs in one transaction with the new version.
#
# TO ADD A FIELD to FunctionRecord, JobRecord or ApiKey: give it a default in nanogrid_backend/models.py and append
# ONE line here, e.g.  "ALTER TABLE jobs ADD COLUMN queue_name TEXT NOT NULL DEFAULT ''",
# with the same default as the dataclass (JSON for dict/list fields is TEXT, bool is INTEGER). Nothing else:
# reads and writes go by column name, values are converted by the field's type, and opening refuses a
# dataclass field that has no column. Never edit, reorder or remove a line once released.
MIGRATIONS: list[str] = [
    f"CREATE TABLE IF NOT EXISTS functions ({_FUNCTIONS_V1})",  # -> 1
    f"CREATE TABLE IF NOT EXISTS jobs ({_JOBS_V1})",  # -> 2
    "CREATE INDEX IF NOT EXISTS jobs_by_time ON jobs (created_at)",  # -> 3
    "CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status)",  # -> 4
    f"CREATE TABLE IF NOT EXISTS api_keys ({_KEYS_V1})",  # -> 5
    "CREATE INDEX IF NOT EXISTS jobs_by_owner_status ON jobs (owner, status)",  # -> 6: count_jobs(owner)
    "ALTER TABLE api_keys ADD COLUMN admin INTEGER NOT NULL DEFAULT 0",  # -> 7
    "ALTER TABLE api_keys ADD COLUMN max_timeout_s REAL",  # -> 8
    "ALTER TABLE api_keys ADD COLUMN max_concurrency INTEGER",  # -> 9
    "ALTER TABLE api_keys ADD COLUMN disk_quota_bytes INTEGER",  # -> 10
    # invocation history: pages of one function's or one owner's calls, newest first, filtered by status
    "CREATE INDEX IF NOT EXISTS jobs_by_function_time ON jobs (function_id, created_at, job_id)",  # -> 11
    # -> 12
    "CREATE INDEX IF NOT EXISTS jobs_by_function_status_time ON jobs (function_id, status, created_at, job_id)",
    "CREATE INDEX IF NOT EXISTS jobs_by_owner_time ON jobs (owner, created_at, job_id)",  # -> 13
    "CREATE INDEX IF NOT EXISTS jobs_by_owner_status_time ON jobs (owner, status, created_at, job_id)",  # -> 14
    f"CREATE TABLE IF NOT EXISTS job_stats ({_JOB_STATS}) WITHOUT ROWID",  # -> 15: metrics windows (windows.py)
    "ALTER TABLE jobs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1",  # -> 16
    "ALTER TABLE jobs ADD COLUMN retry_of TEXT",  # -> 17
    f"CREATE TABLE IF NOT EXISTS webhooks ({_WEBHOOKS})",  # -> 18: per-owner notifications (nanogrid_backend/notify.py)
    "ALTER TABLE functions ADD COLUMN description TEXT NOT NULL DEFAULT ''",  # -> 19
    "ALTER TABLE functions ADD COLUMN stable_id TEXT NOT NULL DEFAULT ''",  # -> 20
    "CREATE TABLE IF NOT EXISTS secrets (owner TEXT NOT NULL, name TEXT NOT NULL, ciphertext BLOB NOT NULL, "
    "variables TEXT NOT NULL DEFAULT '[]', created_at REAL, updated_at REAL, PRIMARY KEY (owner, name))",  # -> 21
    "CREATE INDEX IF NOT EXISTS jobs_by_function ON jobs (function_id, status)",  # -> 22: function_stats
    "ALTER TABLE jobs ADD COLUMN trigger TEXT NOT NULL DEFAULT 'call'",  # -> 23: "schedule" for a schedule's runs
    f"CREATE TABLE IF NOT EXISTS schedules ({_SCHEDULES})",  # -> 24 (nanogrid_backend/schedules.py)
    f"CREATE TABLE IF NOT EXISTS schedule_firings ({_FIRINGS_TABLE}) WITHOUT ROWID",  # -> 25: one row per due time
    "CREATE TABLE IF NOT EXISTS volumes (owner TEXT NOT NULL, name TEXT NOT NULL, size_mib INTEGER NOT NULL, "
    "created_at REAL NOT NULL, PRIMARY KEY (owner, name)) WITHOUT ROWID",  # -> 26 (nanogrid_backend/volumes.py)
    # Indexes that are the start of another (jobs_by_function_status_time, jobs_by_owner_status_time) serve no
    # query the longer one does not, and each costs every state change of a job a B-tree update: a warm call's
    # three writes took 178 µs with them, 150 without (benchmarks/bench_registry_scale.py).
    "DROP INDEX IF EXISTS jobs_by_function",  # -> 27
    "DROP INDEX IF EXISTS jobs_by_owner_status",  # -> 28
]
SCHEMA_VERSION = len(MIGRATIONS)

_RECORDS: dict[str, type] = {
    "functions": FunctionRecord,
    "jobs": JobRecord,
    "api_keys": ApiKey,
    "secrets": SecretRecord,
    "schedules": ScheduleRecord,
    "schedule_firings": FiringRecord,
}
_JOB_FIXED = (
    "job_id",
    "function_id",
    "payload",
    "created_at",
    "owner",
    "trigger",
)  # set at submission, never by finish_job


_EMPTY_JSON: dict[type, str] = {list: "[]", dict: "{}"}


class _Codec:
    """A dataclass's rows by column name: dict/list fields as JSON text, bools as 0/1, NULL in a
    non-optional column (a column added to old rows) read as the field's default."""

    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.fields: list[Field] = list(fields(cls))
        self.names = [f.name for f in self.fields]
        hints = typing.get_type_hints(cls)
        self.json, self.bool, self.optional = set(), set(), set()
        for name in self.names:
            hint = hints[name]
            members = (
                typing.get_args(hint)
                if typing.get_origin(hint) in (typing.Union, types.UnionType)
                else (hint,)
            )
            kinds = {typing.get_origin(m) or m for m in members}
            if kinds & {dict, list}:
                self.json.add(name)
            if bool in kinds:
                self.bool.add(name)
            if type(None) in kinds:
                self.optional.add(name)
        self._all = self._getter(tuple(self.names))
        self._some: dict[tuple[str, ...], tuple[Callable[[Any], tuple[Any, ...]], list[int]]] = {}

    def row(self, record: Any, names: list[str] | None = None) -> list[Any]:
        """The record's column values (``names``: those columns only). Every job written goes through here
        (thousands per second in a ``.map()``): one attrgetter call, then JSON for the few dict/list columns."""
        if names is None:
            getter, json_at = self._all
        else:
            key = tuple(names)
            if key not in self._some:
                self._some[key] = self._getter(key)
            getter, json_at = self._some[key]
        values = list(getter(record))
        for i in json_at:
            value = values[i]
            if value is not None:
                # most are empty (a call's output files, its AI usage): their text without the encoder
                empty = None if value else _EMPTY_JSON.get(type(value))
                values[i] = empty if empty is not None else json.dumps(value)
        return values

    def _getter(self, names: tuple[str, ...]) -> tuple[Callable[[Any], tuple[Any, ...]], list[int]]:
        get = operator.attrgetter(*names)
        one = len(names) == 1
        return ((lambda record: (get(record),)) if one else get), [
            i for i, n in enumerate(names) if n in self.json
        ]

    def record(self, row: sqlite3.Row) -> Any:
        columns = set(row.keys())
        values: dict[str, Any] = {}
        for f in self.fields:
            value = row[f.name] if f.name in columns else None
            if (
                value is None
                and f.name not in self.optional
                and (f.default is not MISSING or f.default_factory is not MISSING)
            ):
                continue  # the dataclass default
            if value is not None and f.name in self.json:
                value = json.loads(value)
            elif value is not None and f.name in self.bool:
                value = bool(value)
            values[f.name] = value
        return self.cls(**values)


_CODECS = {table: _Codec(cls) for table, cls in _RECORDS.items()}
_FUNCTIONS, _JOBS, _KEYS, _SECRETS = (
    _CODECS["functions"],
    _CODECS["jobs"],
    _CODECS["api_keys"],
    _CODECS["secrets"],
)
_SCHEDULE_ROWS, _FIRING_ROWS = _CODECS["schedules"], _CODECS["schedule_firings"]


class _NotClaimed(Exception):
    """Rolls a firing's transaction back: another scheduler moved the schedule on first."""


class SQLiteRegistry(Registry, VolumeRegistry):
    """One SQLite file: writes through one connection, one transaction each, serialised by a lock; reads
    through a second connection, so a write waiting on another process's lock never holds up a status poll."""

    def __init__(
        self,
        path: Path,
        *,
        keep_backups: int = 0,
        busy_timeout_s: float = BUSY_TIMEOUT_S,
        lock_wait_s: float = LOCK_WAIT_S,
    ) -> None:
        """``keep_backups``: copy the registry aside first (after its check) and keep that many copies, when the
        data disk has room for the copy; ``start_notes`` says what was skipped for want of room."""
        self.path = path
        self.lock_wait_s = lock_wait_s
        self.start_notes: list[str] = []
        self._write_lock = threading.RLock()
        self._read_lock = threading.RLock()
        prepare_file(path)
        had_data = path.stat().st_size > 0
        free = free_bytes(path.parent)
        # A full data disk must not stop a grid whose registry is intact: with no room for the -shm file, one
        # connection holds the registry exclusively (other processes wait on it) until the grid stops.
        self.exclusive = free < ROOM_TO_OPEN
        self._db = _connect(path, busy_timeout_s)
        try:
            if self.exclusive:
                self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
                self.start_notes.append(
                    f"the data disk has {free >> 10} KiB free: the registry is open to this grid alone (`nanogrid "
                    "doctor` cannot read it while the grid runs) and calls fail until space is freed"
                )
            version = check_file(self._db, path)
            # always a copy from before a migration
            if had_data and (keep_backups or version < SCHEMA_VERSION):
                self._backup(keep_backups or BACKUPS_KEPT, required=version < SCHEMA_VERSION)
            self._db.execute("PRAGMA journal_mode=WAL")
            # durable across a process crash, not power loss
            self._db.execute("PRAGMA synchronous=NORMAL")
            if version < SCHEMA_VERSION:
                self._write(lambda db: _migrate(db, version))
            _check_columns(self._db)
            secure_files(path)
            if self.exclusive:  # one connection for reads and writes, taken in turn
                self._reader, self._read_lock = self._db, self._write_lock
            else:
                self._reader = _connect(path, busy_timeout_s)
                self._db.execute("PRAGMA busy_timeout = 0")  # writes wait in _while_locked
        except sqlite3.OperationalError as exc:
            self._db.close()
            if not _is_full(exc):
                raise
            raise RegistryError(
                f"the data disk of {path} is full ({free_bytes(path.parent) >> 10} KiB free): the "
                f"registry could not be opened ({exc}); free some space there and start again"
            ) from None
        except BaseException:
            self._db.close()
            raise
        for note in self.start_notes:
            log.warning("%s", note)

    def _backup(self, keep: int, required: bool) -> None:
        """The start-up copy, made only when the data disk has room for it beside what the grid needs to run; a
        migration is never run without one."""
        size = sum(file.stat().st_size for file in registry_files(self.path) if file.exists())
        free = free_bytes(self.path.parent)
        why = ""
        if size + ROOM_TO_OPEN > free:
            why = f"the data disk has {free >> 20} MiB free, too little for a {size >> 20} MiB copy"
        else:
            try:
                backup(self._db, self.path, keep=keep)
                return
            except (sqlite3.OperationalError, OSError) as exc:
                if isinstance(exc, sqlite3.OperationalError) and not _is_full(exc):
                    raise
                why = f"the data disk filled while copying ({exc})"
        if required:
            raise RegistryError(
                f"the registry {self.path} needs an upgrade to schema version {SCHEMA_VERSION}, "
                f"which is never made without a backup, and {why}: free some space and start again"
            )
        self.start_notes.append(f"no backup of the registry was made at this start: {why}")

    def disk_full(self) -> bool:
        """True while the data disk has no room for the registry to grow: no call can be recorded."""
        return free_bytes(self.path.parent) < ROOM_TO_OPEN

    def close(self) -> None:
        with self._write_lock, self._read_lock:
            self._reader.close()
            self._db.close()

    @property
    def schema_version(self) -> int:
        return self._query("PRAGMA user_version")[0][0]

    # functions
    def put_function(self, function: FunctionRecord) -> None:
        self._write(
            lambda db: db.execute(_insert("functions", replace=True), _FUNCTIONS.row(function))
        )

    def get_function(self, function_id: str) -> FunctionRecord | None:
        rows = self._query("SELECT * FROM functions WHERE function_id = ?", (function_id,))
        return _FUNCTIONS.record(rows[0]) if rows else None

    def list_functions(self, owner: str | None = None) -> list[FunctionRecord]:
        query, args = "SELECT * FROM functions", []
        if owner is not None:
            query, args = query + " WHERE owner = ?", [owner]
        return [
            _FUNCTIONS.record(row) for row in self._query(query + " ORDER BY created_at DESC", args)
        ]

    def delete_function(self, function_id: str) -> bool:
        return self._write(
            lambda db: (
                db.execute("DELETE FROM functions WHERE function_id = ?", (function_id,)).rowcount
                > 0
            )
        )

    # jobs
    def create_jobs(self, jobs: list[JobRecord]) -> None:
        self._write(lambda db: db.executemany(_insert("jobs"), (_JOBS.row(job) for job in jobs)))

    def create_jobs_now(self, jobs: list[JobRecord]) -> bool:
        """A local write of tens of microseconds, made at once if this grid's write lock is free and no other
        process holds SQLite's (the writing connection never waits for it); else False, nothing written."""
        if not self._write_lock.acquire(blocking=False):
            return False
        try:
            try:
                _transaction(
                    self._db,
                    lambda db: db.executemany(_insert("jobs"), (_JOBS.row(job) for job in jobs)),
                )
            except sqlite3.OperationalError as exc:
                if _is_locked(exc):
                    return False
                raise
            return True
        finally:
            self._write_lock.release()

    def mark_running(
        self, job_id: str, worker_id: str, started_at: float, retry: bool = False
    ) -> bool:
        allowed = (PENDING, RUNNING) if retry else (PENDING, PENDING)
        return self._write(
            lambda db: (
                db.execute(
                    "UPDATE jobs SET status = ?, worker_id = ?, started_at = ? WHERE job_id = ? AND status IN (?, ?)",
                    (RUNNING, worker_id, started_at, job_id, *allowed),
                ).rowcount
                > 0
            )
        )

    def finish_job(self, job: JobRecord) -> bool:
        columns = [c for c in _JOBS.names if c not in _JOB_FIXED]
        finals = ", ".join("?" * len(FINAL_STATES))
        sql = (
            f"UPDATE jobs SET {', '.join(c + ' = ?' for c in columns)}, payload = x'' "
            f"WHERE job_id = ? AND status NOT IN ({finals})"
        )
        args = [*_JOBS.row(job, columns), job.job_id, *FINAL_STATES]

        def finish(db: sqlite3.Connection) -> bool:
            if db.execute(sql, args).rowcount == 0:
                return False
            _count(db, job)  # the metrics windows, in the same transaction: a call is counted once
            return True

        return self._write(finish)

    def mark_running_many(self, job_ids: list[str], worker_id: str, started_at: float) -> set[str]:
        """Pending -> running for a worker's batch of calls, in one transaction; the ids that were pending."""
        sql = "UPDATE jobs SET status = ?, worker_id = ?, started_at = ? WHERE job_id = ? AND status = ?"

        def mark(db: sqlite3.Connection) -> set[str]:
            return {
                job_id
                for job_id in job_ids
                if db.execute(sql, (RUNNING, worker_id, started_at, job_id, PENDING)).rowcount > 0
            }

        return self._write(mark)

    def finish_jobs(self, jobs: list[JobRecord]) -> list[bool]:
        """``finish_job`` for a batch in one transaction (group commit): each outcome and its metrics counters
        are written together or not at all; per job, whether it was recorded (False: it already had a final state)."""
        columns = [c for c in _JOBS.names if c not in _JOB_FIXED]
        finals = ", ".join("?" * len(FINAL_STATES))
        sql = (
            f"UPDATE jobs SET {', '.join(c + ' = ?' for c in columns)}, payload = x'' "
            f"WHERE job_id = ? AND status NOT IN ({finals})"
        )
        rows = [[*_JOBS.row(job, columns), job.job_id, *FINAL_STATES] for job in jobs]

        def finish(db: sqlite3.Connection) -> list[bool]:
            done = [db.execute(sql, args).rowcount > 0 for args in rows]
            _count_many(db, [job for job, ok in zip(jobs, done, strict=True) if ok])
            return done

        return self._write(finish)

    def record_attempt(self, attempt: JobRecord) -> None:
        def record(db: sqlite3.Connection) -> None:
            db.execute(_insert("jobs"), _JOBS.row(attempt))
            _count(db, attempt)

        self._write(record)

    def list_history(
        self,
        owner: str,
        function_id: str | None = None,
        status: str | None = None,
        limit: int = 50,
        before: tuple[float, str] | None = None,
        text_cap: int = 2048,
    ) -> list[HistoryEntry]:
        where, args = _job_filter(status, owner)
        if function_id is not None:
            where, args = where + " AND function_id = ?", [*args, function_id]
        if before is not None:
            where, args = where + " AND (created_at, job_id) < (?, ?)", [*args, *before]
        columns = ", ".join(
            f"substr({c}, 1, {int(text_cap)}) AS {c}" if c in ("stdout", "stderr") else c
            for c in _JOBS.names
            if c not in ("payload", "result")
        )
        rows = self._query(
            f"SELECT {columns}, length(stdout) AS stdout_size, length(stderr) AS stderr_size "
            f"FROM jobs{where} ORDER BY created_at DESC, job_id DESC LIMIT ?",
            [*args, limit],
        )
        return [
            HistoryEntry(_JOBS.record(row), row["stdout_size"] or 0, row["stderr_size"] or 0)
            for row in rows
        ]

    def function_windows(
        self, function_id: str, now: float | None = None, names: tuple[str, ...] | None = None
    ) -> dict[str, dict[str, Any]]:
        now = time.time() if now is None else now
        found = {}
        for name in names or tuple(windows.WINDOWS):
            resolution, first = windows.first_slot(name, now)
            rows = self._query(
                "SELECT metric, bucket, SUM(n), SUM(failed), SUM(cold), SUM(total), MAX(max_value) "
                "FROM job_stats WHERE function_id = ? AND resolution = ? AND slot >= ? "
                "GROUP BY metric, bucket",
                (function_id, resolution, first),
            )
            found[name] = windows.summarise([tuple(row) for row in rows], first * resolution)
        return found

    def function_timeline(
        self, function_id: str, window: str, now: float | None = None
    ) -> list[tuple[int, int, int]]:
        resolution, first = windows.first_slot(window, time.time() if now is None else now)
        rows = self._query(
            "SELECT slot, SUM(n), SUM(failed) FROM job_stats WHERE function_id = ? AND resolution = ? "
            "AND slot >= ? AND metric = ? GROUP BY slot ORDER BY slot",
            (function_id, resolution, first, windows.DURATION),
        )
        return [(int(slot) * resolution, int(n), int(failed)) for slot, n, failed in rows]

    def prune_history(self, before: float, batch: int = 5000) -> int:
        """Delete finished jobs created before ``before`` (a batch per transaction: writers never wait long)
        and the counters no window reads any more; how many jobs went."""
        finals = ", ".join("?" * len(FINAL_STATES))
        deleted = 0
        while True:
            # "+status": the old rows are found through jobs_by_time. Left to itself SQLite walks jobs_by_status
            # instead, every finished job in it, holding the write lock: 2-4 s a pass with 10 million jobs, 9 ms
            # this way (benchmarks/bench_registry_scale.py).
            count = self._write(
                lambda db: (
                    db.execute(
                        f"DELETE FROM jobs WHERE rowid IN (SELECT rowid FROM jobs WHERE created_at < ? "
                        f"AND +status IN ({finals}) LIMIT ?)",
                        (before, *FINAL_STATES, batch),
                    ).rowcount
                )
            )
            deleted += count
            if count < batch:
                break
        minute_first = int((time.time() - windows.MINUTE_SLOTS_KEPT_S) // windows.MINUTE)
        self._write(
            lambda db: db.execute(
                "DELETE FROM job_stats WHERE (resolution = ? AND slot < ?) OR (resolution = ? AND slot < ?)",
                (windows.MINUTE, minute_first, windows.HOUR, int(before // windows.HOUR)),
            )
        )
        return deleted

    # webhooks (nanogrid_backend/notify.py)
    def put_webhook(self, hook: dict[str, Any]) -> None:
        row = {
            **hook,
            "events": json.dumps(hook["events"]),
            "threshold": json.dumps(hook.get("threshold")),
        }
        names = _WEBHOOK_COLUMNS
        self._write(
            lambda db: db.execute(
                f"INSERT OR REPLACE INTO webhooks ({', '.join(names)}) "
                f"VALUES ({', '.join('?' * len(names))})",
                [row.get(n) for n in names],
            )
        )

    def list_webhooks(self, owner: str | None = None) -> list[dict[str, Any]]:
        query, args = "SELECT * FROM webhooks", []
        if owner is not None:
            query, args = query + " WHERE owner = ?", [owner]
        return [
            {
                **dict(row),
                "events": json.loads(row["events"]),
                "threshold": json.loads(row["threshold"] or "null"),
            }
            for row in self._query(query + " ORDER BY created_at", args)
        ]

    def delete_webhook(self, owner: str, hook_id: str) -> bool:
        return self._write(
            lambda db: (
                db.execute(
                    "DELETE FROM webhooks WHERE hook_id = ? AND owner = ?", (hook_id, owner)
                ).rowcount
                > 0
            )
        )

    def note_attempt(self, job_id: str, error: dict) -> None:
        self._write(
            lambda db: db.execute(
                "UPDATE jobs SET error = ? WHERE job_id = ?", (json.dumps(error), job_id)
            )
        )

    def get_job(self, job_id: str) -> JobRecord | None:
        rows = self._query("SELECT * FROM jobs WHERE job_id = ?", (job_id,))
        return _JOBS.record(rows[0]) if rows else None

    def list_jobs(
        self, limit: int = 50, status: str | None = None, owner: str | None = None
    ) -> list[JobRecord]:
        where, args = _job_filter(status, owner)
        rows = self._query(
            f"SELECT * FROM jobs{where} ORDER BY created_at DESC LIMIT ?", [*args, limit]
        )
        return [_JOBS.record(row) for row in rows]

    def pending_jobs(self, batch: int = 1000) -> Iterator[JobRecord]:
        """A page of ``batch`` rows at a time, without the payload column: a large backlog never sits in memory."""
        columns = ", ".join(name for name in _JOBS.names if name != "payload")
        after: tuple[float, str] = (float("-inf"), "")
        while True:
            rows = self._query(
                f"SELECT {columns} FROM jobs WHERE status = ? AND (created_at, job_id) > (?, ?) "
                "ORDER BY created_at, job_id LIMIT ?",
                (PENDING, *after, batch),
            )
            yield from (_JOBS.record(row) for row in rows)
            if len(rows) < batch:
                return
            after = (rows[-1]["created_at"], rows[-1]["job_id"])

    def count_jobs(self, owner: str | None = None) -> dict[str, int]:
        """Jobs by status. A failed try's own record (``retry_of``, kept for the history) is not a job: it is taken
        out of the failed count, reading only failed rows (the counts come from an index)."""
        where, args = _job_filter(None, owner)
        counts = {
            status: n
            for status, n in self._query(
                f"SELECT status, COUNT(*) FROM jobs{where} GROUP BY status", args
            )
        }
        where, args = _job_filter(FAILED, owner)
        tries = self._query(f"SELECT COUNT(*) FROM jobs{where} AND retry_of IS NOT NULL", args)[0][
            0
        ]
        if tries:
            counts[FAILED] -= tries
            if not counts[FAILED]:
                del counts[FAILED]
        return counts

    def function_stats(
        self, owner: str | None = None, buckets_ms: tuple[float, ...] = ()
    ) -> list[FunctionStats]:
        """Finished jobs per (function, status), counted in one indexed query: never a row sent back per job."""
        total = "(finished_at - started_at) * 1000.0"
        columns = [
            "function_id",
            "status",
            "COUNT(*)",
            f"SUM({total})",
            "SUM(execution_time_ms)",
            "COUNT(execution_time_ms)",
        ]
        columns += [f"SUM({total} <= {float(b)!r})" for b in buckets_ms]
        columns += [f"SUM(execution_time_ms <= {float(b)!r})" for b in buckets_ms]
        where, args = _job_filter(None, owner)
        finals = ", ".join("?" * len(FINAL_STATES))
        where = (
            where + " AND" if where else " WHERE"
        ) + f" status IN ({finals}) AND started_at IS NOT NULL"
        rows = self._query(
            f"SELECT {', '.join(columns)} FROM jobs{where} GROUP BY function_id, status",
            [*args, *FINAL_STATES],
        )
        n = len(buckets_ms)
        return [
            FunctionStats(
                row[0],
                row[1],
                row[2],
                row[3] or 0.0,
                row[4] or 0.0,
                row[5],
                [int(v or 0) for v in row[6 : 6 + n]],
                [int(v or 0) for v in row[6 + n : 6 + 2 * n]],
            )
            for row in rows
        ]

    # secrets
    def put_secret(self, secret: SecretRecord) -> None:
        self._write(lambda db: db.execute(_insert("secrets", replace=True), _SECRETS.row(secret)))

    def get_secret(self, owner: str, name: str) -> SecretRecord | None:
        rows = self._query("SELECT * FROM secrets WHERE owner = ? AND name = ?", (owner, name))
        return _SECRETS.record(rows[0]) if rows else None

    def list_secrets(self, owner: str) -> list[SecretRecord]:
        return [
            _SECRETS.record(row)
            for row in self._query("SELECT * FROM secrets WHERE owner = ? ORDER BY name", (owner,))
        ]

    def delete_secret(self, owner: str, name: str) -> bool:
        return self._write(
            lambda db: (
                db.execute(
                    "DELETE FROM secrets WHERE owner = ? AND name = ?", (owner, name)
                ).rowcount
                > 0
            )
        )

    # API keys
    def put_key(self, key: ApiKey) -> None:
        self._write(lambda db: db.execute(_insert("api_keys", replace=True), _KEYS.row(key)))

    def get_key(self, key_id: str) -> ApiKey | None:
        rows = self._query("SELECT * FROM api_keys WHERE key_id = ?", (key_id,))
        return _KEYS.record(rows[0]) if rows else None

    def list_keys(self) -> list[ApiKey]:
        return [
            _KEYS.record(row) for row in self._query("SELECT * FROM api_keys ORDER BY created_at")
        ]

    # schedules (nanogrid_backend/schedules.py)
    def put_schedule(self, schedule: ScheduleRecord) -> None:
        self._write(
            lambda db: db.execute(_insert("schedules", replace=True), _SCHEDULE_ROWS.row(schedule))
        )

    def get_schedule(self, schedule_id: str) -> ScheduleRecord | None:
        rows = self._query("SELECT * FROM schedules WHERE schedule_id = ?", (schedule_id,))
        return _SCHEDULE_ROWS.record(rows[0]) if rows else None

    def list_schedules(self, owner: str | None = None) -> list[ScheduleRecord]:
        query, args = "SELECT * FROM schedules", []
        if owner is not None:
            query, args = query + " WHERE owner = ?", [owner]
        return [_SCHEDULE_ROWS.record(row) for row in self._query(query + " ORDER BY name", args)]

    def delete_schedule(self, schedule_id: str) -> bool:
        def delete(db: sqlite3.Connection) -> bool:
            db.execute("DELETE FROM schedule_firings WHERE schedule_id = ?", (schedule_id,))
            return (
                db.execute("DELETE FROM schedules WHERE schedule_id = ?", (schedule_id,)).rowcount
                > 0
            )

        return self._write(delete)

    def set_schedule_paused(self, schedule_id: str, paused: bool, next_due: float) -> bool:
        return self._write(
            lambda db: (
                db.execute(
                    "UPDATE schedules SET paused = ?, next_due = ?, updated_at = ? WHERE schedule_id = ?",
                    (int(paused), next_due, time.time(), schedule_id),
                ).rowcount
                > 0
            )
        )

    def claim_firing(self, firing: FiringRecord, next_due: float, job: JobRecord | None) -> bool:
        waiting = firing.due_time if firing.outcome == "queued" else None

        def claim(db: sqlite3.Connection) -> bool:
            try:
                db.execute(_insert("schedule_firings"), _FIRING_ROWS.row(firing))
            # claimed before: never again, and the schedule moves past it
            except sqlite3.IntegrityError:
                db.execute(
                    "UPDATE schedules SET next_due = ? WHERE schedule_id = ? AND next_due = ?",
                    (next_due, firing.schedule_id, firing.due_time),
                )
                return False
            moved = db.execute(
                "UPDATE schedules SET next_due = ?, last_job_id = coalesce(?, last_job_id), "
                "waiting_due = coalesce(?, waiting_due) WHERE schedule_id = ? AND next_due = ? AND paused = 0",
                (
                    next_due,
                    job.job_id if job else None,
                    waiting,
                    firing.schedule_id,
                    firing.due_time,
                ),
            ).rowcount
            if not moved:  # paused, removed or changed since it was read
                raise _NotClaimed
            if job is not None:
                db.execute(_insert("jobs"), _JOBS.row(job))
            db.execute(
                "DELETE FROM schedule_firings WHERE schedule_id = ? AND due_time < (SELECT due_time FROM "
                "schedule_firings WHERE schedule_id = ? ORDER BY due_time DESC LIMIT 1 OFFSET ?)",
                (firing.schedule_id, firing.schedule_id, FIRINGS_KEPT - 1),
            )
            return True

        try:
            return self._write(claim)
        except _NotClaimed:
            return False

    def start_waiting_firing(self, schedule_id: str, due_time: float, job: JobRecord) -> bool:
        def start(db: sqlite3.Connection) -> bool:
            if not db.execute(
                "UPDATE schedule_firings SET outcome = 'started', job_id = ? WHERE schedule_id = ? "
                "AND due_time = ? AND outcome = 'queued'",
                (job.job_id, schedule_id, due_time),
            ).rowcount:
                return False
            db.execute(
                "UPDATE schedules SET last_job_id = ?, waiting_due = NULL WHERE schedule_id = ?",
                (job.job_id, schedule_id),
            )
            db.execute(_insert("jobs"), _JOBS.row(job))
            return True

        return self._write(start)

    def list_firings(self, schedule_id: str, limit: int = 20) -> list[FiringRecord]:
        rows = self._query(
            "SELECT * FROM schedule_firings WHERE schedule_id = ? ORDER BY due_time DESC LIMIT ?",
            (schedule_id, limit),
        )
        return [_FIRING_ROWS.record(row) for row in rows]

    # volumes (nanogrid_backend/volumes.py): records as dicts, names per owner
    def put_volume(self, volume: dict[str, Any]) -> None:
        self._write(
            lambda db: db.execute(
                "INSERT INTO volumes (owner, name, size_mib, created_at) VALUES (?, ?, ?, ?)",
                (volume["owner"], volume["name"], volume["size_mib"], volume["created_at"]),
            )
        )

    def get_volume(self, owner: str, name: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM volumes WHERE owner = ? AND name = ?", (owner, name))
        return dict(rows[0]) if rows else None

    def list_volumes(self, owner: str) -> list[dict[str, Any]]:
        return [
            dict(row)
            for row in self._query("SELECT * FROM volumes WHERE owner = ? ORDER BY name", (owner,))
        ]

    def delete_volume(self, owner: str, name: str) -> bool:
        return self._write(
            lambda db: (
                db.execute(
                    "DELETE FROM volumes WHERE owner = ? AND name = ?", (owner, name)
                ).rowcount
                > 0
            )
        )

    # transactions
    def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """``work`` in one write transaction: committed, or rolled back on any error (an interrupt included),
        so the connection never stays inside a transaction. While another process holds the write lock, the
        transaction is tried again after a pause (``_while_locked``), for ``lock_wait_s`` in all."""
        if not self._write_lock.acquire(timeout=self.lock_wait_s):
            raise self._busy()
        try:
            return self._while_locked(lambda: _transaction(self._db, work))
        finally:
            self._write_lock.release()

    def _query(self, sql: str, args: Any = ()) -> list[sqlite3.Row]:
        """Rows of one statement (its own read transaction, ended when the rows are read)."""

        def read() -> list[sqlite3.Row]:
            try:
                return self._reader.execute(sql, args).fetchall()
            finally:
                if self._reader.in_transaction:
                    self._reader.execute("ROLLBACK")

        with self._read_lock:
            return self._while_locked(read)

    def _while_locked(self, attempt: Callable[[], T]) -> T:
        """``attempt()``, tried again while another process holds the lock, for ``lock_wait_s`` in all."""
        deadline = time.monotonic() + self.lock_wait_s
        tries = 0
        while True:
            try:
                return attempt()
            except sqlite3.OperationalError as exc:
                if not _is_locked(exc):
                    raise
                if time.monotonic() >= deadline:
                    raise self._busy() from None
                time.sleep(RETRY_PAUSES_S[tries] if tries < len(RETRY_PAUSES_S) else RETRY_PAUSE_S)
                tries += 1

    def _busy(self) -> RegistryBusy:
        return RegistryBusy(
            f"the registry {self.path} stayed locked by another process for {self.lock_wait_s:g} s "
            "(an open sqlite3 shell or a backup?); nothing was written: try again once it is released"
        )


def _transaction(db: sqlite3.Connection, work: Callable[[sqlite3.Connection], T]) -> T:
    # take the write lock now: no deadlock between two readers upgrading
    db.execute("BEGIN IMMEDIATE")
    try:
        result = work(db)
        db.execute("COMMIT")
        return result
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


_WEBHOOK_COLUMNS = (
    "hook_id",
    "owner",
    "url",
    "secret",
    "events",
    "function_id",
    "threshold",
    "created_at",
)
_COUNT = (
    "INSERT INTO job_stats (function_id, resolution, slot, metric, bucket, n, failed, cold, total, max_value) "
    "VALUES (?, ?, ?, ?, ?, 1, ?, ?, ?, ?) ON CONFLICT (function_id, resolution, slot, metric, bucket) DO UPDATE "
    "SET n = n + 1, failed = failed + excluded.failed, cold = cold + excluded.cold, total = total + excluded.total, "
    "max_value = max(coalesce(max_value, excluded.max_value), coalesce(excluded.max_value, max_value))"
)


def _count(db: sqlite3.Connection, job: JobRecord) -> None:
    db.executemany(
        _COUNT,
        [
            (
                job.function_id,
                c.resolution,
                c.slot,
                c.metric,
                c.bucket,
                c.failed,
                c.cold,
                c.value or 0.0,
                c.value,
            )
            for c in windows.counters_for(job)
        ],
    )


_COUNT_MANY = _COUNT.replace("VALUES (?, ?, ?, ?, ?, 1,", "VALUES (?, ?, ?, ?, ?, ?,").replace(
    "SET n = n + 1,", "SET n = n + excluded.n,"
)


def _count_many(db: sqlite3.Connection, jobs: list[JobRecord]) -> None:
    """``_count`` for many jobs: their counters summed per row first, so a batch of a function's calls in the same
    minute is a few upserts, not four per call."""
    summed: dict[tuple[str, int, int, str, int], list[Any]] = {}
    for job in jobs:
        for c in windows.counters_for(job):
            key = (job.function_id, c.resolution, c.slot, c.metric, c.bucket)
            row = summed.get(key)
            if row is None:
                summed[key] = [1, c.failed, c.cold, c.value or 0.0, c.value]
            else:
                row[0] += 1
                row[1] += c.failed
                row[2] += c.cold
                row[3] += c.value or 0.0
                if c.value is not None:
                    row[4] = c.value if row[4] is None else max(row[4], c.value)
    db.executemany(_COUNT_MANY, [(*key, *row) for key, row in summed.items()])


def _is_full(exc: sqlite3.OperationalError) -> bool:
    """SQLite's words for a data disk with no room left (a full disk fails even reads of a WAL registry)."""
    return any(words in str(exc) for words in ("disk is full", "disk I/O error"))


def free_bytes(directory: Path) -> int:
    return shutil.disk_usage(directory).free


def read_only_uri(path: Path) -> str:
    """How to open a registry only to read it. On a full disk SQLite has no room for the -shm file a WAL registry is
    read with; read as a file that does not change, it needs none (a grid running there holds it and answers)."""
    return f"file:{path}?mode=ro" + (
        "&immutable=1" if free_bytes(path.parent) < ROOM_TO_OPEN else ""
    )


def _is_locked(exc: sqlite3.OperationalError) -> bool:
    return getattr(exc, "sqlite_errorcode", None) in (
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
    ) or "locked" in str(exc)


def _insert(table: str, replace: bool = False) -> str:
    names = _CODECS[table].names
    verb = "INSERT OR REPLACE" if replace else "INSERT"
    return f"{verb} INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"


def _job_filter(status: str | None, owner: str | None) -> tuple[str, list[Any]]:
    conditions, args = [], []
    if status:
        conditions.append("status = ?")
        args.append(status)
    if owner is not None:
        conditions.append("owner = ?")
        args.append(owner)
    return (" WHERE " + " AND ".join(conditions) if conditions else ""), args


def _connect(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    db = sqlite3.connect(
        path, timeout=busy_timeout_s, check_same_thread=False, isolation_level=None
    )
    db.row_factory = sqlite3.Row
    return db


# opening: files, checks, migrations


def registry_files(path: Path) -> list[Path]:
    return [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]


def prepare_file(path: Path) -> None:
    """Create the file 0600 in a 0700 directory (SQLite gives -wal and -shm the file's mode), unless the
    data dir shows an earlier grid whose registry is gone: that is refused, never made into an empty grid."""
    if not path.parent.exists():
        path.parent.mkdir(mode=DIR_MODE, parents=True)
    empty = not path.exists() or path.stat().st_size == 0
    if empty and (evidence := earlier_grid_evidence(path)):
        state = "is empty (0 bytes)" if path.exists() else "is missing"
        raise RegistryError(
            f"the registry {path} {state}, but {evidence}: restore it with `nanogrid doctor "
            f"--data-dir {path.parent} --repair`, or move the data dir aside to start a new grid"
        )
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE))
    secure_files(path)


def earlier_grid_evidence(path: Path) -> str:
    """Why the data dir holding ``path`` is not new (stored packages, registry backups), or ''."""
    packages = path.parent / "store" / "packages"
    if packages.is_dir() and any(packages.iterdir()):
        return f"{packages} holds stored functions"
    if list_backups(path):
        return f"backups of it exist ({list_backups(path)[-1].name})"
    return ""


def secure_files(path: Path) -> None:
    for file in registry_files(path):
        if file.exists() and file.stat().st_mode & 0o777 != FILE_MODE:
            os.chmod(file, FILE_MODE)


def check_file(db: sqlite3.Connection, path: Path) -> int:
    """The registry's schema version, once its header and pages pass SQLite's quick check."""
    version, problem = diagnose(db, path)
    if problem:
        raise _damaged(path, problem)
    if version > SCHEMA_VERSION:
        raise RegistryError(
            f"the registry {path} has schema version {version}, newer than this NanoGrid's "
            f"{SCHEMA_VERSION}: a newer release wrote it; upgrade NanoGrid to open it"
        )
    return version


def diagnose(db: sqlite3.Connection, path: Path) -> tuple[int, str]:
    """(schema version, what is wrong with the file or '')."""
    with open(path, "rb") as f:
        header = f.read(len(SQLITE_HEADER))
    if header and header != SQLITE_HEADER:
        return 0, "its header is not SQLite's: truncated or overwritten"
    try:
        problems = [row[0] for row in db.execute("PRAGMA quick_check").fetchall()]
        version = db.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        return 0, str(exc)
    if problems != ["ok"]:
        # One row may hold several problems under a "*** in database main ***" heading: one line per problem here.
        lines = [
            line.strip()
            for row in problems
            for line in str(row).splitlines()
            if line.strip() and not line.startswith("***")
        ] or ["damaged"]
        return 0, f"quick_check: {lines[0]}" + (
            f" (+{len(lines) - 1} more)" if len(lines) > 1 else ""
        )
    return version, ""


def _damaged(path: Path, why: str) -> RegistryError:
    return RegistryError(
        f"the registry {path} is damaged ({why}): restore the newest good backup with "
        f"`nanogrid doctor --data-dir {path.parent} --repair` (the damaged file is kept aside)"
    )


def _migrate(db: sqlite3.Connection, version: int) -> None:
    if version == 0:
        _adopt_unversioned(db)
    for statement in MIGRATIONS[version:]:
        added = _ADD_COLUMN.match(statement)
        if added and added["column"] in _columns(db, added["table"]):
            continue  # an unversioned table made from the dataclass fields already has it
        db.execute(statement)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


_ADD_COLUMN = re.compile(r"ALTER TABLE (?P<table>\w+) ADD COLUMN (?P<column>\w+)", re.IGNORECASE)


def _adopt_unversioned(db: sqlite3.Connection) -> None:
    """Tables written before versioning had the dataclass fields of their day: add the columns they lack.
    Rows from before API keys existed belong to the embedded grid's own key's owner, ``local``."""
    for table, columns in _TABLES_V1.items():
        present = _columns(db, table)
        if not present:
            continue  # not there yet: the migration creates it
        for column in columns.split(", "):
            name = column.split()[0]
            if name not in present:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
                if name == "owner":
                    db.execute(f"UPDATE {table} SET owner = 'local'")


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})").fetchall()}


def _check_columns(db: sqlite3.Connection) -> None:
    """A dataclass field with no column is a migration someone forgot: say which line to add."""
    for table, codec in _CODECS.items():
        missing = [name for name in codec.names if name not in _columns(db, table)]
        if missing:
            raise RegistryError(
                f"{codec.cls.__name__}.{missing[0]} has no column in the registry's {table} table: "
                f'append "ALTER TABLE {table} ADD COLUMN {missing[0]} ..." to MIGRATIONS in '
                "nanogrid_backend/registry/sqlite.py"
            )


# backups


def list_backups(path: Path) -> list[Path]:
    """The registry's backups, oldest first (their names sort by time)."""
    return sorted(path.parent.glob(path.name + ".bak-*Z"))


def backup(db: sqlite3.Connection, path: Path, keep: int = BACKUPS_KEPT) -> Path:
    """A consistent copy made with SQLite's online backup API (0600), keeping the newest ``keep``."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    target = path.with_name(f"{path.name}.bak-{stamp}")
    copy_database(db, target)
    for old in list_backups(path)[:-keep]:
        old.unlink(missing_ok=True)
    return target


def copy_database(source: sqlite3.Connection, target: Path) -> None:
    """Write ``source`` to ``target`` (0600) through a temporary file, so ``target`` is whole or absent."""
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    os.close(os.open(partial, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE))
    try:
        copy = sqlite3.connect(partial)
        try:
            source.backup(copy)
            # a single file: opening a copy leaves no -wal/-shm beside it
            copy.execute("PRAGMA journal_mode=DELETE")
        finally:
            copy.close()
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
