"""Docker sandbox speed, next to the process sandbox in the same run.

    python benchmarks/bench_docker.py [--calls 1000] [--out benchmarks/results/docker.json]

Needs the Docker engine and the runtime image (python nanogrid_runtimes/build.py). Measures:
warm `.remote()` round trip through each sandbox (two `nanogrid up` processes), the first call
of a new function with a stem cell ready, a sandbox started from nothing, one peak-memory read
from the cgroup against one Docker stats API call, and the worker's RSS growth while a function
writes 1 GB of output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cloudpickle

import nanogrid
from benchmarks.bench_embedded import percentiles, timed
from nanogrid.packaging import package_function
from nanogrid_backend.sandbox.docker import DockerSandboxFactory

IMAGE = "nanogrid/runtime-python:latest"


def start_grid(data_dir: Path, port: int, sandbox: str, **env: str) -> subprocess.Popen:
    environ = {**os.environ, **{f"NANOGRID_{k.upper()}": v for k, v in env.items()}}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nanogrid.cli",
            "up",
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
            "--sandbox",
            sandbox,
        ],
        env=environ,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            nanogrid.Client(f"http://127.0.0.1:{port}").health()
            time.sleep(2.0)  # let the stem cells start
            return proc
        except nanogrid.NotConnected:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"nanogrid up --sandbox {sandbox} did not answer")


def key_of(data_dir: Path) -> str:
    return (data_dir / "local-key").read_text().strip()


def warm_and_cold(url: str, key: str, calls: int, cold_n: int, pause_s: float) -> dict:
    nanogrid.connect(url, api_key=key)

    @nanogrid.remote
    def noop(x):
        return x

    timed(lambda: noop.remote(1), 100)
    result = {"remote": percentiles(timed(lambda: noop.remote(1), calls))}
    worker_side = []
    for i in range(cold_n):
        fn = nanogrid.remote(eval(f"lambda: {i}"), name=f"cold{i}")
        job = fn.spawn()
        job.result()
        view = job.client.status(job.job_id)
        assert view["cold"]
        worker_side.append(view["finished_at"] - view["started_at"])
        time.sleep(pause_s)  # the pool starts a new stem cell in the background
    result["first_call_with_stem_cell_worker"] = percentiles(worker_side)
    return result


def sandbox_level(data_dir: Path) -> dict:
    factory = DockerSandboxFactory(IMAGE, data_dir)
    package = package_function(lambda: 1, name="x")
    starts = []
    for _ in range(5):
        started = time.perf_counter()
        sandbox = factory.start()
        sandbox.load(package.function_id, package.data, factory.stem_memory_mib)
        starts.append(time.perf_counter() - started)
        sandbox.close()
    sandbox = factory.start()
    payload = cloudpickle.dumps(((), {}))
    sandbox.load(package.function_id, package.data, 256)
    warm = percentiles(timed(lambda: sandbox.call("bench", payload, 10), 1000))
    cgroup = sandbox.cgroup
    n = 100_000
    started = time.perf_counter()
    for _ in range(n):
        cgroup.peak()
    pread_us = (time.perf_counter() - started) / n * 1e6
    stats = timed(lambda: sandbox.container.stats(stream=False), 3)
    sandbox.close()
    return {
        "container_start_and_load_no_stem_cell": percentiles(starts),
        "warm_call_sandbox_only": warm,
        "peak_memory_read_cgroup_pread_us": round(pread_us, 3),
        "peak_memory_read_docker_stats_ms": round(sorted(stats)[1] * 1000, 1),
        "stats_over_pread": round(sorted(stats)[1] * 1e6 / pread_us),
    }


def rss_during_output(url: str, key: str, grid_pid: int, megabytes: int) -> dict:
    nanogrid.connect(url, api_key=key)

    @nanogrid.remote(memory=megabytes + 512, disk=megabytes + 256, timeout=300)
    def write_output(mib):
        import nanogrid

        block = b"x" * (1 << 20)
        with open(nanogrid.output_dir() / "big.bin", "wb") as f:
            for _ in range(mib):
                f.write(block)
        return mib

    def rss() -> int:
        for line in Path(f"/proc/{grid_pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    write_output.remote(1)
    before, peak, done = rss(), 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    job = write_output.spawn(megabytes)
    job.result()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    (output,) = job.outputs
    return {
        "output_mib": megabytes,
        "output_size": output.size,
        "seconds": round(seconds, 2),
        "worker_rss_before_mib": round(before / 2**20, 1),
        "worker_rss_peak_mib": round(peak / 2**20, 1),
        "worker_rss_growth_mib": round((peak - before) / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--cold", type=int, default=10)
    parser.add_argument("--output-mib", type=int, default=1024)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "docker.json"
    )
    args = parser.parse_args()

    report: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    dirs = [Path(tempfile.mkdtemp(prefix="nanogrid-bench-")) for _ in range(3)]
    docker_grid = start_grid(dirs[0], 8801, "docker")
    process_grid = start_grid(dirs[1], 8802, "process")
    try:
        report["docker"] = warm_and_cold(
            "http://127.0.0.1:8801", key_of(dirs[0]), args.calls, args.cold, pause_s=1.0
        )
        report["process"] = warm_and_cold(
            "http://127.0.0.1:8802", key_of(dirs[1]), args.calls, args.cold, pause_s=0.3
        )
        report["docker_over_process_p50"] = round(
            report["docker"]["remote"]["p50_ms"] / report["process"]["remote"]["p50_ms"], 2
        )
        report["output_1gb"] = rss_during_output(
            "http://127.0.0.1:8801", key_of(dirs[0]), docker_grid.pid, args.output_mib
        )
        report["docker_sandbox"] = sandbox_level(dirs[2])
    finally:
        for grid in (docker_grid, process_grid):
            grid.terminate()
            grid.wait(30)
        for directory in dirs:
            shutil.rmtree(directory, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
