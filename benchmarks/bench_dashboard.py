"""The dashboard's pages with 100,000 calls recorded: how long each takes to serve.

    python -m benchmarks.bench_dashboard [--calls 100000] [--out benchmarks/results/dashboard.json]

Fills a SQLite registry as bench_history.py does (20 functions, half the calls of one busy function, 2 % failed,
over the last 30 days, with the metrics counters), adds three more versions of the busy function (folded under it
on the functions page), opens an embedded grid on it, signs in, and times each page (median and worst of 20
requests, after one warm-up). Target: every page ≤ 100 ms.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.bench_history import FUNCTIONS, OWNER, fill, timed_ms
from nanogrid_backend.config import GridConfig
from nanogrid_backend.embedded import EmbeddedGrid
from nanogrid_backend.keys import create_key
from nanogrid_backend.registry.sqlite import SQLiteRegistry

TARGET_MS = 100.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/dashboard.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        registry = SQLiteRegistry(data / "registry.sqlite3")
        fill(registry, args.calls)
        busy = registry.get_function(FUNCTIONS[0])
        for n in range(3):  # updates of the busy function: one row on the functions page
            registry.put_function(
                dataclasses.replace(
                    busy,
                    function_id=f"fn-benchv{n:015d}",
                    memory_mib=256 << n,
                    created_at=time.time() - 3600 * (3 - n),
                )
            )
        registry.close()
        grid = EmbeddedGrid(
            GridConfig.load(data_dir=data, port=0, sandbox="process", workers=1, stem_cells=0)
        ).start()
        try:
            key, _ = create_key(grid.grid.registry, OWNER)
            pages = {}
            with httpx.Client(base_url=grid.url, timeout=60) as http:
                assert http.post("/ui/login", data={"api_key": key}).status_code == 303
                for name, path in (
                    ("functions", "/ui"),
                    ("function", f"/ui/functions/{FUNCTIONS[0]}"),
                    ("jobs", "/ui/jobs"),
                    ("failed jobs", "/ui/jobs?status=failed"),
                    ("job", f"/ui/jobs/job-{args.calls - 1:032x}"),
                    ("deploy", "/ui/deploy"),
                    ("environments", "/ui/environments"),
                    ("workers", "/ui/workers"),
                    ("loadtests", "/ui/loadtests"),
                ):
                    assert http.get(path).status_code == 200, path
                    pages[name] = timed_ms(lambda p=path: http.get(p), repeat=20)
        finally:
            grid.stop()
    result = {
        "calls": args.calls,
        "functions": len(FUNCTIONS) + 3,
        "target_ms": TARGET_MS,
        "pages": pages,
        "slowest_p50_ms": max(p["p50_ms"] for p in pages.values()),
        "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
