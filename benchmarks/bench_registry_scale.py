"""A warm call against a registry of millions of jobs, next to one against an empty registry, in the same run.

    python benchmarks/bench_registry_scale.py [--jobs 10000000] [--calls 1000]
                                              [--registry-cache /tmp/nanogrid-registry-scale]
                                              [--out benchmarks/results/registry-scale.json]

The big registry is made once and kept in ``--registry-cache`` (reruns reuse it): ``SQLiteRegistry`` creates it, so
the schema is the one the migrations make, then finished jobs are bulk-inserted with the registry's own column
list (a few functions and owners, 30 days of history, 95 % completed and 5 % failed, small results, the payload
cleared as ``finish_job`` clears it). The jobs table's indexes are dropped during the insert and made again from
their own ``CREATE INDEX`` text afterwards: the same indexes, built by a sort instead of 10 million B-tree inserts.
``job_stats`` is left as the grid's own calls write it: its rows grow with functions and time slots, not jobs.
The grid keeps 30 days of history, so a start prunes what aged past that since the registry was built (an hour's
worth an hour, as on a grid that has run for a month; ``age_h`` in the JSON).

Each registry is then served by ``nanogrid up --sandbox process`` as its own process, on a copy of the data dir.
Measured: the grid's start (to its first answered ``/health``), what the start-up check (``PRAGMA quick_check``)
and backup take on their own, the warm ``.remote()`` round trip (rounds alternate empty, big, empty, big, so
drift shows), the grid process's RSS, one pass of the hourly history sweep (it holds the write lock), and a warm
call's three registry writes made in this process (no HTTP, no sandbox: what the registry itself adds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nanogrid  # noqa: E402
from benchmarks.bench_embedded import start_grid  # noqa: E402
from benchmarks.peers import percentiles, timed  # noqa: E402
from nanogrid_backend.models import COMPLETED, FAILED, FunctionRecord, JobRecord  # noqa: E402
from nanogrid_backend.registry.sqlite import (  # noqa: E402
    _JOBS,
    SQLiteRegistry,
    _insert,
    backup,
    diagnose,
)

REGISTRY = "registry.sqlite3"
DAYS = 30
BATCH = 500_000  # rows per transaction while building
OWNERS = (
    "local",
    "local",
    "local",
    "analytics",
    "etl",
)  # the embedded grid's own key runs most calls
FUNCTIONS = 8
START_TIMEOUT_S = 900.0


def build_registry(directory: Path, jobs: int, seed: int = 7) -> dict[str, Any]:
    """``jobs`` finished jobs in ``directory``/registry.sqlite3; what it took."""
    started = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / REGISTRY
    path.unlink(missing_ok=True)
    now = time.time()
    rng = random.Random(seed)
    registry = SQLiteRegistry(path)
    functions = []
    for i in range(FUNCTIONS):
        owner = OWNERS[i % len(OWNERS)]
        record = FunctionRecord(
            function_id=f"fn-{rng.getrandbits(64):016x}",
            function_name=f"task{i}",
            runtime="python3.12",
            handler="main.handler",
            kind="pickle",
            memory_mib=512,
            timeout_s=300.0,
            package_size=2048,
            python="3.12",
            created_at=now - DAYS * 86400 - 3600,
            owner=owner,
        )
        registry.put_function(record)
        functions.append((record.function_id, owner))
    registry.close()

    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=DELETE")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("PRAGMA cache_size=-1048576")  # 1 GiB while the indexes are sorted
    indexes = db.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'jobs' AND sql IS NOT NULL"
    ).fetchall()
    for name, _ in indexes:
        db.execute(f"DROP INDEX {name}")
    names = _JOBS.names
    template = _JOBS.row(
        JobRecord(
            job_id="",
            function_id="",
            status=COMPLETED,
            payload=b"",
            result_format="json",
            result=b'{"ok": true, "rows": 12}',
            worker_id="worker-1",
            memory_limit_mib=512,
        )
    )
    at = {name: i for i, name in enumerate(names)}
    failed_error = json.dumps({"type": "ValueError", "message": "bad input row 7", "traceback": ""})
    first = now - DAYS * 86400
    step = DAYS * 86400 / max(jobs, 1)

    def rows(start: int, stop: int) -> Iterator[list[Any]]:
        for n in range(start, stop):
            row = list(template)
            function_id, owner = functions[rng.randrange(FUNCTIONS)]
            created = first + n * step + rng.random() * step
            ms = rng.uniform(1.0, 400.0)
            row[at["job_id"]] = f"job-{rng.getrandbits(128):032x}"
            row[at["function_id"]] = function_id
            row[at["owner"]] = owner
            row[at["created_at"]] = created
            row[at["started_at"]] = created + 0.002
            row[at["finished_at"]] = created + 0.002 + ms / 1000
            row[at["execution_time_ms"]] = ms
            row[at["peak_memory_bytes"]] = rng.randrange(20, 200) << 20
            row[at["cold"]] = int(rng.random() < 0.02)
            row[at["sandbox_id"]] = f"sb-{n % 64}"
            if rng.random() < 0.05:
                row[at["status"]] = FAILED
                row[at["error"]] = failed_error
                row[at["result"]] = None
                row[at["result_format"]] = None
            yield row

    sql = _insert("jobs")
    for start in range(0, jobs, BATCH):
        db.execute("BEGIN")
        db.executemany(sql, rows(start, min(jobs, start + BATCH)))
        db.execute("COMMIT")
    inserted = time.perf_counter() - started
    for _, create in indexes:
        db.execute(create)
    db.execute("PRAGMA journal_mode=WAL")
    db.close()
    SQLiteRegistry(path).close()  # opens as a grid would: checked, at the current schema version
    return {
        "jobs": jobs,
        "build_s": round(time.perf_counter() - started, 1),
        "insert_s": round(inserted, 1),
        "indexes_rebuilt": [name for name, _ in indexes],
        "file_bytes": path.stat().st_size,
    }


def cached_registry(cache: Path, jobs: int) -> dict[str, Any]:
    """The registry of ``jobs`` jobs under ``cache``, built if it is not there yet."""
    directory = cache / f"jobs-{jobs}"
    info = directory / "build.json"
    if info.exists() and (directory / REGISTRY).exists():
        age_h = (time.time() - info.stat().st_mtime) / 3600
        return {
            **json.loads(info.read_text()),
            "reused": True,
            "age_h": round(age_h, 1),
            "dir": str(directory),
        }
    shutil.rmtree(directory, ignore_errors=True)
    found = build_registry(directory, jobs)
    info.write_text(json.dumps(found))
    return {**found, "reused": False, "dir": str(directory)}


def start_steps(path: Path) -> dict[str, float]:
    """The start-up check and backup on their own, as the grid makes them (the backup is kept: the grid keeps 3)."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        started = time.perf_counter()
        version, problem = diagnose(db, path)
        checked = time.perf_counter() - started
        assert not problem, problem
        started = time.perf_counter()
        backup(db, path)
        copied = time.perf_counter() - started
    finally:
        db.close()
    return {"quick_check_s": round(checked, 2), "backup_s": round(copied, 2)}


def registry_writes(paths: dict[str, Path], calls: int, rounds: int) -> dict[str, dict[str, Any]]:
    """A warm call's three registry writes (recorded, running, finished with its counters) made in this process,
    without HTTP or a sandbox around them; rounds alternate between the registries."""
    registries = {label: SQLiteRegistry(path) for label, path in paths.items()}
    samples: dict[str, list[float]] = {label: [] for label in paths}

    def one(registry: SQLiteRegistry) -> None:
        job = JobRecord(job_id=f"job-{uuid.uuid4().hex}", function_id="fn-writes", owner="local")
        registry.create_jobs([job])
        registry.mark_running(job.job_id, "worker-1", time.time())
        job.status, job.result_format, job.result = COMPLETED, "json", b"1"
        job.started_at = job.finished_at = time.time()
        job.execution_time_ms, job.peak_memory_bytes = 0.3, 1 << 20
        registry.finish_job(job)

    try:
        for _ in range(rounds):
            for label, registry in registries.items():
                samples[label] += timed(lambda registry=registry: one(registry), calls // rounds)
    finally:
        for registry in registries.values():
            registry.close()
    return {label: percentiles(found) for label, found in samples.items()}


def history_sweep(path: Path) -> dict[str, float]:
    """One pass of the grid's hourly history sweep (30 days kept), timed: it holds the write lock while it runs."""
    registry = SQLiteRegistry(path)
    try:
        started = time.perf_counter()
        deleted = registry.prune_history(time.time() - 30 * 86400)
        return {"deleted": deleted, "seconds": round(time.perf_counter() - started, 4)}
    finally:
        registry.close()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


class Grid:
    """One running grid and a warm no-op on it."""

    def __init__(self, label: str, data_dir: Path, port: int) -> None:
        self.label, self.data_dir, self.url = label, data_dir, f"http://127.0.0.1:{port}"
        self.proc = start_grid(data_dir, port, timeout_s=START_TIMEOUT_S)
        self.start_s: float = self.proc.ready_s  # type: ignore[attr-defined]
        self.key = (data_dir / "local-key").read_text().strip()
        self.samples: list[float] = []
        self.rounds: list[dict[str, float]] = []
        self.use()

        @nanogrid.remote(name="noop")
        def noop(x: int) -> int:
            return x

        self.noop = noop
        timed(lambda: self.noop.remote(1), 100)  # uploaded, warm

    def use(self) -> None:
        nanogrid.connect(self.url, api_key=self.key)

    def measure(self, calls: int) -> None:
        self.use()
        found = timed(lambda: self.noop.remote(1), calls)
        self.samples += found
        self.rounds.append(percentiles(found))

    def report(self) -> dict[str, Any]:
        return {
            "start_to_health_s": round(self.start_s, 2),
            "remote": percentiles(self.samples),
            "rounds": self.rounds,
            "grid_rss_mib": rss_mib(self.proc.pid),
        }

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=10_000_000)
    parser.add_argument("--calls", type=int, default=1000, help="warm calls per registry")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds per registry")
    parser.add_argument(
        "--registry-cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "nanogrid-registry-scale",
    )
    parser.add_argument("--port", type=int, default=8811)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "registry-scale.json"
    )
    args = parser.parse_args()

    load_before = [round(x, 2) for x in os.getloadavg()]
    built = cached_registry(args.registry_cache, args.jobs)
    work = Path(tempfile.mkdtemp(prefix="nanogrid-scale-", dir=args.registry_cache))
    empty_dir, big_dir = work / "empty", work / "big"
    empty_dir.mkdir()
    big_dir.mkdir()
    grids: list[Grid] = []
    try:
        started = time.perf_counter()
        shutil.copyfile(Path(built["dir"]) / REGISTRY, big_dir / REGISTRY)
        copy_s = time.perf_counter() - started
        os.chmod(big_dir / REGISTRY, 0o600)
        steps = start_steps(big_dir / REGISTRY)
        grids = [Grid("empty", empty_dir, args.port), Grid("big", big_dir, args.port + 1)]
        for _ in range(args.rounds):
            for grid in grids:
                grid.measure(args.calls // args.rounds)
        empty, big = (grid.report() for grid in grids)
        for grid in grids:
            grid.stop()
        grids = []
        sweep = history_sweep(big_dir / REGISTRY)
        writes = registry_writes(
            {"empty": empty_dir / REGISTRY, "big": big_dir / REGISTRY}, 3 * args.calls, args.rounds
        )
        report = {
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "sqlite": sqlite3.sqlite_version,
                "platform": platform.platform(),
                "load_average_before": load_before,
                "load_average_after": [round(x, 2) for x in os.getloadavg()],
            },
            "registry": {**built, "copy_for_this_run_s": round(copy_s, 1), **steps},
            "empty": empty,
            "big": big,
            "registry_writes_in_process": writes,
            "big_history_sweep": sweep,
            "big_over_empty": {
                "p50": round(big["remote"]["p50_ms"] / empty["remote"]["p50_ms"], 3),
                "p99": round(big["remote"]["p99_ms"] / empty["remote"]["p99_ms"], 3),
                "registry_writes_p50": round(
                    writes["big"]["p50_ms"] / writes["empty"]["p50_ms"], 3
                ),
                "start": round(big["start_to_health_s"] / empty["start_to_health_s"], 2),
            },
        }
    finally:
        for grid in grids:
            grid.stop()
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
