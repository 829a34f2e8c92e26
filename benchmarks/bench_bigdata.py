"""Big data through the Docker sandbox: time and memory for large arguments and results.

    python benchmarks/bench_bigdata.py [--mib 300] [--shared-mib 50] [--calls 20] [--sandbox docker]
                                       [--repeat 3] [--legs] [--out benchmarks/results/bigdata.json]

Runs ``nanogrid up`` as its own process, so the grid's and the client's memory are measured apart:
each figure is the peak resident size (VmHWM, reset before each step through /proc/PID/clear_refs)
above the resident size as the step began, in multiples of the payload. Targets (issue 16): a
300 MiB argument and a 300 MiB result each within 5 s end to end; grid growth at most 1x, client
at most 2x; a 50 MiB argument shared by 20 calls within 4x the time of one call.

The machine is often shared, so each large step runs ``--repeat`` times (a new random value each time) and the
median counts; the load average is recorded with the figures. A result is split into its legs: the grid's part
(``grid_s``: the call, pickling in the sandbox, the frames over the sandbox channel, spooling, hashing and
storing) and the client's (``download_s`` with its hash check, ``unpickle_s``). ``--legs`` also measures the
Docker attach stream's own throughput (a container writing frames to its stdout, read raw by this process;
this process writing to a container's stdin), the ceiling for anything that crosses it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nanogrid  # noqa: E402

MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class Peak:
    """Peak RSS growth of a process over a block, in bytes (VmHWM reset to the current RSS at the start)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.growth = 0

    def __enter__(self) -> Peak:
        with open(f"/proc/{self.pid}/clear_refs", "w") as f:
            f.write("5")
        self.start = status_kib(self.pid, "VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.growth = (status_kib(self.pid, "VmHWM") - self.start) * 1024


def start_grid(data_dir: Path, port: int, sandbox: str) -> subprocess.Popen:
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
            "--workers",
            "2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                time.sleep(2.0)  # let the stem cells start
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("nanogrid up did not answer within 90 s")


def step(name: str, grid_pid: int, size: int, fn: Callable[[], object]) -> dict:
    with Peak(grid_pid) as grid, Peak(os.getpid()) as client:
        started = time.perf_counter()
        fn()
        seconds = time.perf_counter() - started
    figures = {
        "seconds": round(seconds, 3),
        "grid_growth_x": round(grid.growth / size, 2),
        "client_growth_x": round(client.growth / size, 2),
    }
    print(name, figures, flush=True)
    return figures


def attach_throughput(mib: int, image: str = "nanogrid/runtime-python:3.11") -> dict:
    """MB/s through ``docker attach`` with nothing else in the way: out of a container (its stdout, in 4 MiB
    frames, as results travel) and into one (its stdin, as arguments travel); out also with the engine's default
    json-file log driver, which sandboxes do without (it copies all of stdout into a log file)."""
    import docker
    import docker.types

    client = docker.from_env()
    size = mib * MiB
    writer = (
        "import os, sys\nbody = bytes(4 << 20)\nsys.stdin.read(1)\n"
        f"for _ in range({size} // len(body)):\n    view = memoryview(body)\n"
        "    while view:\n        view = view[os.write(1, view):]\n"
    )
    reader = (
        f"import os\nleft = {size}\nwhile left:\n    left -= len(os.read(0, 1 << 20))\n"
        "os.write(1, b'done')\n"
    )
    figures = {}
    for name, code, logs in (
        ("out_mb_s", writer, "none"),
        ("in_mb_s", reader, "none"),
        ("out_json_file_log_mb_s", writer, "json-file"),
    ):
        container = client.containers.create(
            image,
            ["python3", "-c", code],
            entrypoint=[],
            stdin_open=True,
            user="65534:65534",
            network_mode="none",
            log_config=docker.types.LogConfig(type=logs),
        )
        try:
            sock = client.api.attach_socket(
                container.id, params={"stdin": 1, "stdout": 1, "stream": 1}
            )
            raw = getattr(sock, "_sock", sock)
            container.start()
            time.sleep(0.5)
            started = time.perf_counter()
            if name.startswith("out"):
                raw.sendall(b"x")
                while raw.recv(4 << 20):
                    pass
            else:
                piece = bytes(1 << 20)
                for _ in range(size // len(piece)):
                    raw.sendall(piece)
                raw.recv(64)  # "done": the container read it all
            figures[name] = round(size / (time.perf_counter() - started) / 1e6)
        finally:
            container.remove(force=True)
    print("attach", figures, flush=True)
    return figures


def median_of(runs: list[dict]) -> dict:
    """The median run's figures (by seconds), with the worst memory growth of all runs and every run's seconds."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    figures = dict(ordered[len(ordered) // 2])
    figures["grid_growth_x"] = max(r["grid_growth_x"] for r in runs)
    figures["client_growth_x"] = max(r["client_growth_x"] for r in runs)
    figures["runs_s"] = [r["seconds"] for r in runs]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=300)
    parser.add_argument("--shared-mib", type=int, default=50)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--sandbox", default="docker")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--legs", action="store_true", help="also measure the Docker attach stream itself"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bigdata.json"))
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="nanogrid-bigdata-"))
    port = free_port()
    proc = start_grid(data_dir, port, args.sandbox)
    report: dict = {
        "sandbox": args.sandbox,
        "payload_mib": args.mib,
        "load_average_before": os.getloadavg(),
    }
    try:
        key = (data_dir / "local-key").read_text().strip()
        nanogrid.connect(f"http://127.0.0.1:{port}", api_key=key)
        memory = max(1024, args.mib * 4)

        @nanogrid.remote(timeout=300, memory=memory)
        def size_of(data):
            return len(data)

        @nanogrid.remote(timeout=300, memory=memory)
        def make(n):
            return os.urandom(1) * n  # one allocation of n bytes in the sandbox

        size_of.remote(b"warm")
        make.remote(1)
        size = args.mib * MiB
        client = nanogrid.get_client()
        uploads: list[
            float
        ] = []  # the client's upload of the argument's blob (hash, HEAD, PUT) within each run
        upload = client.upload_blob

        def timed_upload(data: bytes) -> nanogrid.Ref:
            started = time.perf_counter()
            try:
                return upload(data)
            finally:
                uploads.append(round(time.perf_counter() - started, 3))

        client.upload_blob = timed_upload  # type: ignore[method-assign]
        runs = []
        for _ in range(args.repeat):
            payload = os.urandom(
                size
            )  # random: nothing compresses or dedups it, and never sent before
            runs.append(
                step("argument", proc.pid, size, functools.partial(size_of.remote, payload))
            )
            payload = b""
        client.upload_blob = upload  # type: ignore[method-assign]
        report["argument"] = {**median_of(runs), "legs": {"upload_s": uploads}}
        legs: dict[str, list[float]] = {"grid_s": [], "download_s": [], "unpickle_s": []}
        downloaded = [0.0]  # when the last download ended: the unpickling starts there
        download = client.download_blob

        def timed_download(sha256: str, n: int) -> bytearray:
            started = time.perf_counter()
            try:
                return download(sha256, n)
            finally:
                downloaded[0] = time.perf_counter()
                legs["download_s"].append(round(downloaded[0] - started, 3))

        def result_legs() -> None:
            started = time.perf_counter()
            job = make.spawn(size).wait()
            legs["grid_s"].append(round(time.perf_counter() - started, 3))
            job.result()
            legs["unpickle_s"].append(round(time.perf_counter() - downloaded[0], 3))

        client.download_blob = timed_download  # type: ignore[method-assign, assignment]
        runs = [step("result", proc.pid, size, result_legs) for _ in range(args.repeat)]
        client.download_blob = download  # type: ignore[method-assign]
        report["result"] = {**median_of(runs), "legs": legs}

        shared = os.urandom(args.shared_mib * MiB)
        one = step("shared_one_call", proc.pid, len(shared), lambda: size_of.remote(shared))
        shared = os.urandom(
            args.shared_mib * MiB
        )  # a new value: uploaded afresh, as in the first call
        many = step(
            "shared_many_calls",
            proc.pid,
            len(shared),
            lambda: list(size_of.map([shared] * args.calls)),
        )
        report["shared"] = {
            "calls": args.calls,
            "mib": args.shared_mib,
            "one_call": one,
            "all_calls": many,
            "ratio": round(many["seconds"] / one["seconds"], 2),
        }
        if args.legs and args.sandbox == "docker":
            report["attach"] = attach_throughput(args.mib)
        report["load_average_after"] = os.getloadavg()
        report["targets"] = {
            "argument_s<=5": report["argument"]["seconds"] <= 5,
            "result_s<=5": report["result"]["seconds"] <= 5,
            "grid_growth<=1x": max(
                report["argument"]["grid_growth_x"], report["result"]["grid_growth_x"]
            )
            <= 1,
            "client_growth<=2x": max(
                report["argument"]["client_growth_x"], report["result"]["client_growth_x"]
            )
            <= 2,
            "shared_ratio<=4": report["shared"]["ratio"] <= 4,
        }
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(data_dir, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
