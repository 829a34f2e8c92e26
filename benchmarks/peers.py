"""Ray and Dask measured the way benchmarks/bench_embedded.py measures NanoGrid (standard library only, so it
also runs in a venv of their own: `python benchmarks/peers.py CALLS MAP` prints one JSON line).

Ray needs newer packages than NanoGrid's lock files pin, so `make bench` installs Ray and Dask into
`.venv-peers`, never into the project's venv.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


def machine(load_before: list[float]) -> dict:
    """The ``machine`` part of a report: its CPUs, Python, and the load average before and after the run."""
    import os
    import platform

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {
        "p50_ms": round(pick(0.50) * 1000, 3),
        "p99_ms": round(pick(0.99) * 1000, 3),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 3),
        "n": len(ordered),
    }


def timed(fn, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return samples


def bench_ray(calls: int, map_n: int) -> dict:
    try:
        import ray
    except ImportError:
        return {"skipped": "ray is not installed (`make bench` installs it into .venv-peers)"}
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:

        @ray.remote
        def noop(x):
            return x

        timed(lambda: ray.get(noop.remote(1)), 100)
        single = percentiles(timed(lambda: ray.get(noop.remote(1)), calls))
        started = time.perf_counter()
        ray.get([noop.remote(i) for i in range(map_n)])
        seconds = time.perf_counter() - started
        return {
            "remote": single,
            "map": {
                "calls": map_n,
                "seconds": round(seconds, 3),
                "calls_per_s": round(map_n / seconds, 1),
            },
        }
    finally:
        ray.shutdown()
        shutil.rmtree(Path.home() / ".ray", ignore_errors=True)


def bench_dask(calls: int, map_n: int) -> dict:
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        return {
            "skipped": "dask.distributed is not installed (`make bench` installs it into .venv-peers)"
        }
    scratch = tempfile.mkdtemp(prefix="dask-")
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            local_directory=scratch,
        ) as cluster,
        Client(cluster) as client,
    ):

        def noop(x):
            return x

        timed(lambda: client.submit(noop, 1, pure=False).result(), 100)
        single = percentiles(timed(lambda: client.submit(noop, 1, pure=False).result(), calls))
        started = time.perf_counter()
        client.gather(client.map(noop, range(map_n), pure=False))
        seconds = time.perf_counter() - started
    shutil.rmtree(scratch, ignore_errors=True)
    rate = round(map_n / seconds, 1)
    return {
        "remote": single,
        "map": {"calls": map_n, "seconds": round(seconds, 3), "calls_per_s": rate},
    }


if __name__ == "__main__":
    calls, map_n = int(sys.argv[1]), int(sys.argv[2])
    print(json.dumps({"ray": bench_ray(calls, map_n), "dask": bench_dask(calls, map_n)}))
