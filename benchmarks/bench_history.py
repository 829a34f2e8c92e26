"""Invocation history and metrics windows with 1 million calls recorded, and what recording a call costs.

    python -m benchmarks.bench_history [--calls 1000000] [--out benchmarks/results/history.json]

Fills a SQLite registry with ``--calls`` finished calls of 20 functions over the last 30 days (half of them of
one busy function, 2 % failed, 5 % cold), with the metrics counters a worker's finish_job would have left
(added up in Python and written once, which gives the same rows as a million upserts, faster). Then times:
- a page of 50 of the busy function's calls, newest first; a deep page (``before`` a call 100,000 back);
  only its failed calls; the owner's calls across functions;
- the busy function's windows (1h/24h/7d/30d: count, error rate, percentiles, memory, cold share);
- recording a call: finish_job with the counters against the same update without them (the overhead per call);
- the dashboard's pages, served by an embedded grid opened on that registry.
Targets (issue 19): history and windows ≤ 50 ms, recording ≤ 0.1 ms more per call, pages ≤ 300 ms.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import httpx

from nanogrid_backend.config import GridConfig
from nanogrid_backend.embedded import EmbeddedGrid
from nanogrid_backend.keys import create_key
from nanogrid_backend.models import COMPLETED, FAILED, FunctionRecord, JobRecord
from nanogrid_backend.registry import windows
from nanogrid_backend.registry.sqlite import _JOBS, SQLiteRegistry, _insert

MiB = 1 << 20
OWNER = "bench"
FUNCTIONS = [f"fn-bench{i:016d}" for i in range(20)]


def fill(registry: SQLiteRegistry, calls: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    now = time.time()
    for fid in FUNCTIONS:
        registry.put_function(
            FunctionRecord(
                fid,
                fid[-4:],
                "python3.11",
                "function.pkl",
                "pickle",
                1024,
                60.0,
                1000,
                "3.11",
                owner=OWNER,
            )
        )
    counters: dict[tuple, list] = defaultdict(lambda: [0, 0, 0, 0.0, None])
    batch: list[list] = []

    def flush() -> None:
        registry._write(lambda db: db.executemany(_insert("jobs"), batch))
        batch.clear()

    for i in range(calls):
        fid = FUNCTIONS[0] if i % 2 == 0 else FUNCTIONS[1 + i % 19]
        created = now - 30 * 86400 * (1 - i / calls)  # in time order, the newest last
        failed = rng.random() < 0.02
        job = JobRecord(
            f"job-{i:032x}",
            fid,
            status=FAILED if failed else COMPLETED,
            owner=OWNER,
            created_at=created,
            started_at=created + 0.001,
            finished_at=created + 0.02,
            cold=rng.random() < 0.05,
            execution_time_ms=rng.lognormvariate(3, 0.6),
            peak_memory_bytes=int(rng.uniform(20, 90) * MiB),
            memory_limit_mib=1024,
            worker_id="worker-1",
            sandbox_id=f"sbx-{i % 8}",
            stdout=f"working on {i}\n",
            error={"kind": "exception", "type": "ValueError", "message": "bad"} if failed else None,
        )
        batch.append(_JOBS.row(job))
        for c in windows.counters_for(job):
            row = counters[(fid, c.resolution, c.slot, c.metric, c.bucket)]
            row[0] += 1
            row[1] += c.failed
            row[2] += c.cold
            row[3] += c.value or 0.0
            row[4] = c.value if row[4] is None else max(row[4], c.value or row[4])
        if len(batch) >= 50_000:
            flush()
    flush()
    registry._write(
        lambda db: db.executemany(
            "INSERT INTO job_stats (function_id, resolution, slot, metric, bucket, n, failed, cold, total, max_value) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(*key, *value) for key, value in counters.items()],
        )
    )


def timed_ms(action, repeat: int = 30) -> dict:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append((time.perf_counter() - started) * 1000)
    return {"p50_ms": round(statistics.median(times), 3), "max_ms": round(max(times), 3)}


def recording_overhead(registry: SQLiteRegistry, count: int = 2000) -> dict:
    """finish_job (update + counters, one transaction) against the same update alone, on the full registry."""

    def fresh(n: int, tag: str) -> list[JobRecord]:
        jobs = [JobRecord(f"job-{tag}-{i}", FUNCTIONS[0], owner=OWNER) for i in range(n)]
        registry.create_jobs(jobs)
        for job in jobs:
            job.status, job.execution_time_ms, job.finished_at = COMPLETED, 12.0, time.time()
            job.peak_memory_bytes = 40 * MiB
        return jobs

    columns = [
        c
        for c in _JOBS.names
        if c not in ("job_id", "function_id", "payload", "created_at", "owner")
    ]
    plain_sql = (
        f"UPDATE jobs SET {', '.join(c + ' = ?' for c in columns)}, payload = x'' WHERE job_id = ?"
    )
    with_counters, plain = fresh(count, "w"), fresh(count, "p")
    results = {}
    for name, jobs, record in (
        ("finish_job", with_counters, registry.finish_job),
        (
            "update_only",
            plain,
            lambda j: registry._write(
                lambda db: db.execute(plain_sql, [*_JOBS.row(j, columns), j.job_id])
            ),
        ),
    ):
        started = time.perf_counter()
        for job in jobs:
            record(job)
        results[name + "_us"] = round((time.perf_counter() - started) / count * 1e6, 1)
    results["counters_overhead_us"] = round(results["finish_job_us"] - results["update_only_us"], 1)
    return results


def pages(data_dir: Path, calls: int) -> dict:
    grid = EmbeddedGrid(
        GridConfig.load(data_dir=data_dir, port=0, sandbox="process", workers=1, stem_cells=0)
    ).start()
    try:
        key, _ = create_key(grid.grid.registry, OWNER)
        found = {}
        with httpx.Client(base_url=grid.url, timeout=60) as http:
            http.post("/ui/login", data={"api_key": key})
            job_id = f"job-{calls - 1:032x}"
            for name, path in (
                ("functions", "/ui"),
                ("function", f"/ui/functions/{FUNCTIONS[0]}"),
                ("jobs", "/ui/jobs"),
                ("job", f"/ui/jobs/{job_id}"),
                ("workers", "/ui/workers"),
                ("loadtests", "/ui/loadtests"),
            ):
                assert http.get(path).status_code == 200, path
                found[name] = timed_ms(lambda p=path: http.get(p), repeat=10)
        return found
    finally:
        grid.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/history.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        path = data / "registry.sqlite3"
        registry = SQLiteRegistry(path)
        started = time.perf_counter()
        fill(registry, args.calls)
        fill_s = time.perf_counter() - started
        deep = registry.get_job(f"job-{max(0, args.calls - 200_000):032x}")
        busy = FUNCTIONS[0]
        result = {
            "calls": args.calls,
            "functions": len(FUNCTIONS),
            "fill_s": round(fill_s, 1),
            "registry_mib": round(path.stat().st_size / MiB, 1),
            "history_page": timed_ms(lambda: registry.list_history(OWNER, busy, limit=50)),
            "history_deep_page": timed_ms(
                lambda: registry.list_history(
                    OWNER, busy, limit=50, before=(deep.created_at, deep.job_id)
                )
            ),
            "history_failed_only": timed_ms(
                lambda: registry.list_history(OWNER, busy, FAILED, limit=50)
            ),
            "history_owner": timed_ms(lambda: registry.list_history(OWNER, limit=50)),
            "windows": timed_ms(lambda: registry.function_windows(busy)),
            "windows_busy_30d_count": registry.function_windows(busy)["30d"]["count"],
            "recording": recording_overhead(registry),
        }
        registry.close()
        result["pages"] = pages(data, args.calls)
    result["machine"] = {"python": platform.python_version(), "cpus": __import__("os").cpu_count()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
