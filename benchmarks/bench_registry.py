"""How long a grid's start spends on its registry: opening, checking, backing up and migrating 100,000 jobs.

    python -m benchmarks.bench_registry [--jobs 100000] [--out benchmarks/results/registry.json]

Writes an unversioned registry (the schema every release before versioning wrote, rows as a finished
job leaves them: payload dropped, a small result, a line of stdout), then times:
- the first open under the current code: quick_check, a backup, the migration to the current version;
- a later open (a normal restart): quick_check and a backup;
- counting every job by status (what /system/status does) against reading 1,000 rows (what it did).
"""

from __future__ import annotations

import argparse
import json
import platform
import sqlite3
import tempfile
import time
from pathlib import Path

from nanogrid_backend.models import COMPLETED, FAILED, JobRecord
from nanogrid_backend.registry.sqlite import BACKUPS_KEPT, SCHEMA_VERSION, SQLiteRegistry

# The tables as the last release before versioning made them (columns from the dataclass fields, untyped).
UNVERSIONED = {
    "functions": "function_id, function_name, runtime, handler, kind, memory_mib, timeout_s, package_size, python, "
    "source, created_at, owner",
    "jobs": "job_id, function_id, status, payload_format, payload, result_format, result, error, stdout, stderr, "
    "output_files, execution_time_ms, peak_memory_bytes, cold, memory_limit_mib, baseline_memory_bytes, "
    "ai_usage, worker_id, sandbox_id, created_at, started_at, finished_at, owner",
    "api_keys": "key_id, name, key_hash, created_at, revoked_at, rate_limit, rate_burst",
}
KEYS = {"functions": "function_id", "jobs": "job_id", "api_keys": "key_id"}


def write_unversioned(path: Path, jobs: int) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    for table, columns in UNVERSIONED.items():
        db.execute(f"CREATE TABLE {table} ({columns}, PRIMARY KEY ({KEYS[table]}))")
    db.execute("CREATE INDEX jobs_by_time ON jobs (created_at)")
    db.execute("CREATE INDEX jobs_by_status ON jobs (status)")
    width = len(UNVERSIONED["jobs"].split(", "))
    now = time.time()
    db.execute("BEGIN")
    db.executemany(
        f"INSERT INTO jobs VALUES ({', '.join('?' * width)})",
        (
            (
                f"job-{i:032x}",
                "fn-0123456789abcdef01234567",
                FAILED if i % 50 == 0 else COMPLETED,
                "pickle",
                b"",
                "pickle",
                b"\x80\x05\x95" + i.to_bytes(8, "little"),
                None,
                f"working on {i}\n",
                "",
                "[]",
                1.2,
                31 << 20,
                0,
                256,
                12 << 20,
                None,
                "worker-1",
                f"sbx-{i % 8}",
                now - jobs + i,
                now - jobs + i + 0.001,
                now - jobs + i + 0.002,
                "local",
            )
            for i in range(jobs)
        ),
    )
    db.execute("COMMIT")
    db.close()


def timed(action) -> tuple[float, object]:
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/registry.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "registry.sqlite3"
        write_seconds, _ = timed(lambda: write_unversioned(path, args.jobs))
        size = path.stat().st_size

        first_open, registry = timed(lambda: SQLiteRegistry(path, keep_backups=BACKUPS_KEPT))
        assert registry.schema_version == SCHEMA_VERSION
        count_seconds, counts = timed(registry.count_jobs)
        page_seconds, _ = timed(lambda: registry.list_jobs(limit=1000))
        probe = JobRecord("job-probe", "fn-0123456789abcdef01234567", owner="local")
        write_one, _ = timed(lambda: registry.create_jobs([probe]))
        registry.close()

        restart_open, registry = timed(lambda: SQLiteRegistry(path, keep_backups=BACKUPS_KEPT))
        registry.close()
        bare_open, registry = timed(lambda: SQLiteRegistry(path))
        registry.close()

    figures = {
        "jobs": args.jobs,
        "registry_mib": round(size / (1 << 20), 1),
        "write_unversioned_s": round(write_seconds, 2),
        "first_open_check_backup_migrate_s": round(first_open, 3),
        "restart_open_check_backup_s": round(restart_open, 3),
        "open_check_only_s": round(bare_open, 3),
        "count_jobs_all_ms": round(count_seconds * 1000, 2),
        "list_jobs_1000_rows_ms": round(page_seconds * 1000, 2),
        "create_one_job_ms": round(write_one * 1000, 3),
        "counts": counts,
        "schema_version": SCHEMA_VERSION,
        "sqlite": sqlite3.sqlite_version,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {platform.node()}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
