"""The grid on its AWS adapters: sync round trip through SQS + Redis, and `.map()` with 1 and 3 workers.

    python -m benchmarks.bench_aws [--map 2000] [--out benchmarks/results/aws.json]

Runs against the moto server and a local redis-server (tests/aws_cluster.py), all on this one
2-core machine next to the controller and workers: the figures show the code path and how it
scales within the machine, not AWS's own latencies (SQS long polls answer in ~10-20 ms there).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import nanogrid
from benchmarks.bench_embedded import percentiles, timed
from tests.aws_cluster import Cluster


def run(workers: int, map_n: int, calls: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix="nanogrid-bench-aws-"))
    cluster = Cluster(root, workers=workers)
    try:
        client = nanogrid.connect(cluster.url, api_key=cluster.key)
        deadline = time.monotonic() + 60
        while len(client.system_status()["workers"]) < workers and time.monotonic() < deadline:
            time.sleep(0.2)

        @nanogrid.remote
        def noop(x):
            return x

        timed(lambda: noop.remote(1), 20)
        result = {
            "workers": workers,
            "slots_per_worker": cluster.slots,
            "remote": percentiles(timed(lambda: noop.remote(1), calls)),
        }
        list(noop.map(range(100), progress=False))
        started = time.perf_counter()
        assert list(noop.map(range(map_n), progress=False)) == list(range(map_n))
        seconds = time.perf_counter() - started
        result["map"] = {
            "calls": map_n,
            "seconds": round(seconds, 2),
            "calls_per_s": round(map_n / seconds, 1),
        }
        return result
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--map", type=int, default=2000)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "aws.json")
    args = parser.parse_args()
    one, three = run(1, args.map, args.calls), run(3, args.map, args.calls)
    report = {
        "one_worker": one,
        "three_workers": three,
        "map_scaling_3_over_1": round(three["map"]["calls_per_s"] / one["map"]["calls_per_s"], 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
