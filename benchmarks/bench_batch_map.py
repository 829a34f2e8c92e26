"""`.map()` throughput of short calls through batches, in both sandboxes, in one run.

    python -m benchmarks.bench_batch_map [--map 5000] [--repeat 3] [--out benchmarks/results/batch_map.json]

Each batch's replies leave the sandbox one by one, before the next call of the batch starts (exactly once: a reply
held back in the sandbox would be lost with it). This measures what that costs where it costs most, through the
Docker engine's attach stream, beside the process sandbox's pipe. Needs the runtime image for the Docker figures
(python nanogrid_runtimes/build.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import nanogrid
from benchmarks.bench_embedded import start_grid


def measure(sandbox: str, port: int, map_n: int, repeat: int) -> dict:
    data_dir = Path(tempfile.mkdtemp(prefix="nanogrid-bench-"))
    grid = start_grid(data_dir, port, sandbox)
    try:
        nanogrid.connect(
            f"http://127.0.0.1:{port}", api_key=(data_dir / "local-key").read_text().strip()
        )

        @nanogrid.remote
        def noop(x):
            return x

        list(
            noop.map(range(500), progress=False)
        )  # warm: sandboxes up, the function timed as short
        rates = []
        for _ in range(repeat):
            started = time.perf_counter()
            out = list(noop.map(range(map_n), progress=False))
            rates.append(map_n / (time.perf_counter() - started))
            assert out == list(range(map_n))
        return {
            "calls": map_n,
            "calls_per_s": [round(r, 1) for r in rates],
            "best_calls_per_s": round(max(rates), 1),
        }
    finally:
        grid.terminate()
        grid.wait(15)
        shutil.rmtree(data_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--map", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--port", type=int, default=8797)
    parser.add_argument("--sandbox", action="append", choices=["process", "docker"])
    parser.add_argument(
        "--label", default="", help="a note kept in the report (what was being compared)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "batch_map.json"
    )
    args = parser.parse_args()
    report: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_before": [round(x, 2) for x in os.getloadavg()],
        },
        "label": args.label,
    }
    for sandbox in args.sandbox or ["process", "docker"]:
        report[sandbox] = measure(sandbox, args.port, args.map, args.repeat)
    report["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
