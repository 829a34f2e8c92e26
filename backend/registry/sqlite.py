from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import astuple, fields
from pathlib import Path

from backend.models import FINAL_STATES, PENDING, RUNNING, ApiKey, FunctionRecord, JobRecord
from backend.registry.base import Registry

_FUNCTION_COLUMNS = [f.name for f in fields(FunctionRecord)]
_JOB_COLUMNS = [f.name for f in fields(JobRecord)]
_KEY_COLUMNS = [f.name for f in fields(ApiKey)]
_JSON_COLUMNS = {"error", "output_files", "ai_usage"}

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS functions ({", ".join(_FUNCTION_COLUMNS)}, PRIMARY KEY (function_id));
CREATE TABLE IF NOT EXISTS jobs ({", ".join(_JOB_COLUMNS)}, PRIMARY KEY (job_id));
CREATE INDEX IF NOT EXISTS jobs_by_time ON jobs (created_at);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status);
CREATE TABLE IF NOT EXISTS api_keys ({", ".join(_KEY_COLUMNS)}, PRIMARY KEY (key_id));
"""


class SQLiteRegistry(Registry):
    """One SQLite file in WAL mode; one connection guarded by a lock (writes serialise anyway)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # durable across a process crash, not power loss
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # functions
    def put_function(self, function: FunctionRecord) -> None:
        marks = ", ".join("?" * len(_FUNCTION_COLUMNS))
        with self._lock:
            self._db.execute(f"INSERT OR REPLACE INTO functions VALUES ({marks})", astuple(function))

    def get_function(self, function_id: str) -> FunctionRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM functions WHERE function_id = ?", (function_id,)).fetchone()
        return FunctionRecord(*row) if row else None

    def list_functions(self, owner: str | None = None) -> list[FunctionRecord]:
        query, args = "SELECT * FROM functions", []
        if owner is not None:
            query, args = query + " WHERE owner = ?", [owner]
        with self._lock:
            rows = self._db.execute(query + " ORDER BY created_at DESC", args).fetchall()
        return [FunctionRecord(*row) for row in rows]

    def delete_function(self, function_id: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM functions WHERE function_id = ?", (function_id,)).rowcount > 0

    # jobs
    def create_jobs(self, jobs: list[JobRecord]) -> None:
        marks = ", ".join("?" * len(_JOB_COLUMNS))
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(f"INSERT INTO jobs VALUES ({marks})", [_job_row(job) for job in jobs])
            self._db.execute("COMMIT")

    def mark_running(self, job_id: str, worker_id: str, started_at: float, retry: bool = False) -> bool:
        allowed = (PENDING, RUNNING) if retry else (PENDING, PENDING)
        with self._lock:
            cursor = self._db.execute(
                "UPDATE jobs SET status = ?, worker_id = ?, started_at = ? WHERE job_id = ? AND status IN (?, ?)",
                (RUNNING, worker_id, started_at, job_id, *allowed),
            )
        return cursor.rowcount > 0

    def finish_job(self, job: JobRecord) -> bool:
        columns = [c for c in _JOB_COLUMNS if c not in ("job_id", "function_id", "payload", "created_at", "owner")]
        row = dict(zip(_JOB_COLUMNS, _job_row(job), strict=True))
        finals = ", ".join("?" * len(FINAL_STATES))
        with self._lock:
            cursor = self._db.execute(
                f"UPDATE jobs SET {', '.join(c + ' = ?' for c in columns)}, payload = x'' "
                f"WHERE job_id = ? AND status NOT IN ({finals})",
                [row[c] for c in columns] + [job.job_id, *FINAL_STATES],
            )
        return cursor.rowcount > 0

    def note_attempt(self, job_id: str, error: dict) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET error = ? WHERE job_id = ?", (json.dumps(error), job_id))

    def get_job(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return _job_from_row(row) if row else None

    def list_jobs(self, limit: int = 50, status: str | None = None, owner: str | None = None) -> list[JobRecord]:
        conditions, args = [], []
        if status:
            conditions, args = ["status = ?"], [status]
        if owner is not None:
            conditions, args = [*conditions, "owner = ?"], [*args, owner]
        where = " WHERE " + " AND ".join(conditions) if conditions else ""
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM jobs{where} ORDER BY created_at DESC LIMIT ?", [*args, limit]).fetchall()
        return [_job_from_row(row) for row in rows]

    # API keys
    def put_key(self, key: ApiKey) -> None:
        marks = ", ".join("?" * len(_KEY_COLUMNS))
        with self._lock:
            self._db.execute(f"INSERT OR REPLACE INTO api_keys VALUES ({marks})", astuple(key))

    def get_key(self, key_id: str) -> ApiKey | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
        return ApiKey(*row) if row else None

    def list_keys(self) -> list[ApiKey]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM api_keys ORDER BY created_at").fetchall()
        return [ApiKey(*row) for row in rows]


def _job_row(job: JobRecord) -> tuple:
    values = []
    for name in _JOB_COLUMNS:
        value = getattr(job, name)
        values.append(json.dumps(value) if name in _JSON_COLUMNS and value is not None else value)
    return tuple(values)


def _job_from_row(row: tuple) -> JobRecord:
    values = dict(zip(_JOB_COLUMNS, row, strict=True))
    for name in _JSON_COLUMNS:
        if values[name] is not None:
            values[name] = json.loads(values[name])
    values["cold"] = None if values["cold"] is None else bool(values["cold"])
    return JobRecord(**values)
