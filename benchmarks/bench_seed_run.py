"""What the seed contract's translation costs: a warm ``/run`` round trip in each seed dialect against ``/v1/run``.

    python benchmarks/bench_seed_run.py [--calls 500] [--sandbox process] [--out benchmarks/results/seed_run.json]

Starts ``nanogrid up --open`` as its own process, uploads one no-op handler through the seed's ``/upload``, then
calls it interleaved (so drift hits every route alike): ``/v1/run`` by its NanoGrid id, ``/v1/run`` by its seed
uuid, the camelCase ``/run`` and seed 004's snake_case ``/run``. Reports each route's percentiles and the median
difference from ``/v1/run``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.peers import percentiles  # noqa: E402

NOOP = b"def handler(event, context):\n    return event\n"


def start_grid(data_dir: Path, port: int, sandbox: str) -> subprocess.Popen:
    """``nanogrid up --open`` (the seed's scripts send no key), ready once /health answers and stem cells started."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nanogrid.cli",
            "up",
            "--open",
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
            "--sandbox",
            sandbox,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                time.sleep(1.0)
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("nanogrid up --open did not answer within 60 s")


def measure(url: str, calls: int) -> dict:
    with httpx.Client(base_url=url, timeout=60) as http:
        uploaded = http.post(
            "/upload",
            files={"file": ("noop.py", NOOP)},
            data={"function_name": "noop", "runtime": "python", "handler": "noop.handler"},
        )
        seed_id = uploaded.raise_for_status().json()["function_id"]
        native_id = http.get(f"/v1/functions/{seed_id}").raise_for_status().json()["function_id"]
        routes = {
            "v1_run": ("/v1/run", {"function_id": native_id, "payload": {"x": 1}}),
            "v1_run_by_seed_id": ("/v1/run", {"function_id": seed_id, "payload": {"x": 1}}),
            "seed_run_camel": ("/run", {"functionId": seed_id, "inputData": {"x": 1}}),
            "seed_run_snake": ("/run", {"function_id": seed_id, "payload": {"x": 1}}),
        }
        samples: dict[str, list[float]] = {name: [] for name in routes}
        for round_ in range(calls + 20):  # the first 20 rounds warm up
            for name, (path, body) in routes.items():
                started = time.perf_counter()
                http.post(path, json=body).raise_for_status()
                if round_ >= 20:
                    samples[name].append(
                        time.perf_counter() - started
                    )  # seconds, as percentiles() takes them
    base = statistics.median(samples["v1_run"])
    return {
        name: {
            **percentiles(values),
            "median_minus_v1_ms": round((statistics.median(values) - base) * 1000, 3),
        }
        for name, values in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--sandbox", default="process", choices=["process", "docker"])
    parser.add_argument("--port", type=int, default=18799)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "seed_run.json"
    )
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="nanogrid-bench-seed-"))
    proc = start_grid(data_dir, args.port, args.sandbox)
    try:
        results = measure(f"http://127.0.0.1:{args.port}", args.calls)
    finally:
        proc.terminate()
        proc.wait(30)
    report = {
        "machine": platform.platform(),
        "python": platform.python_version(),
        "sandbox": args.sandbox,
        "calls_per_route": args.calls,
        "routes": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
