"""Volumes: how fast a warm call reads a big file from a mounted volume, and what mounting adds to a cold start.

    python benchmarks/bench_volumes.py [--mib 1024] [--cold 5] [--out benchmarks/results/volumes.json]

Runs ``nanogrid up --sandbox docker`` as its own process. A function with the volume mounted at /data writes a
``--mib`` MiB file there once; then warm calls of a reading function time their own reads of it (8 MiB ``readinto``,
no Python copies), and the client times each call. The file was just written, so its pages are in the host's page
cache (the volume is one filesystem, shared by every sandbox that mounts it): this is the warm-read case.

Cold starts, interleaved, each of a new function version: ``stem`` (no volume: a stem cell is specialised),
``volume`` (the volume at /data: a stem cell is specialised and the host binds the volume under its shared /data)
and, for reference, ``own`` (``disk=`` of another size: a container of its own is started, as a function with a
volume mounted outside /data, or in a process sandbox, gets). What mounting adds is ``volume - stem``.
Targets: warm read >= 500 MB/s; mounting adds <= 20 ms to a cold start.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nanogrid  # noqa: E402
from benchmarks.bench_bigdata import free_port, start_grid  # noqa: E402

MiB = 1 << 20


def version(token: str) -> Callable[[], str]:
    """A function whose package is new for every token (a new function id: a cold start)."""

    def probe() -> str:
        return token

    return probe


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--reads", type=int, default=5)
    parser.add_argument("--cold", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/volumes.json"))
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="nanogrid-volumes-"))
    port = free_port()
    proc = start_grid(data_dir, port, "docker")
    report: dict = {
        "file_mib": args.mib,
        "load_average_start": os.getloadavg()[0],
        "cpus": os.cpu_count(),
    }
    try:
        key = (data_dir / "local-key").read_text().strip()
        nanogrid.connect(f"http://127.0.0.1:{port}", api_key=key)
        vol = nanogrid.Volume("bench", size_mib=args.mib + 256)

        @nanogrid.remote(volumes={"/data": vol}, memory=256, timeout=600)
        def write(mib: int) -> float:
            import time

            block = os.urandom(MiB)
            started = time.perf_counter()
            with open("/data/big.bin", "wb") as f:
                for _ in range(mib):
                    f.write(block)
                f.flush()
                os.fsync(f.fileno())
            return time.perf_counter() - started

        @nanogrid.remote(volumes={"/data": vol}, memory=256, timeout=600)
        def read() -> tuple[int, float]:
            import time

            buffer = memoryview(bytearray(8 * MiB))
            total = 0
            started = time.perf_counter()
            with open("/data/big.bin", "rb", buffering=0) as f:
                while count := f.readinto(buffer):
                    total += count
            return total, time.perf_counter() - started

        seconds = write.remote(args.mib)
        report["write_mb_s"] = round(args.mib * MiB / seconds / 1e6, 1)
        read.remote()  # its cold start
        reads = []
        for _ in range(args.reads):
            started = time.perf_counter()
            size, inside = read.remote()
            call = time.perf_counter() - started
            reads.append(
                {
                    "bytes": size,
                    "read_s": round(inside, 4),
                    "read_mb_s": round(size / inside / 1e6, 1),
                    "call_s": round(call, 4),
                    "call_mb_s": round(size / call / 1e6, 1),
                }
            )
        report["warm_reads"] = reads
        report["warm_read_mb_s_median"] = statistics.median(r["read_mb_s"] for r in reads)
        report["warm_call_mb_s_median"] = statistics.median(r["call_mb_s"] for r in reads)

        cold: dict[str, list[float]] = {"stem": [], "own": [], "volume": []}
        options: dict[str, dict] = {
            "stem": {},
            "own": {"disk": 2048},
            "volume": {"volumes": {"/data": vol}},
        }
        for _ in range(args.cold):
            for kind in cold:
                fn = nanogrid.remote(**options[kind])(version(uuid.uuid4().hex))
                fn.package()  # packaged (and the volume looked up) before the clock starts: only the call is timed
                time.sleep(1.5)  # stem cells refilled after the last cold start
                started = time.perf_counter()
                job = fn.spawn()
                job.result(timeout=120)
                cold[kind].append(round((time.perf_counter() - started) * 1000, 1))
                assert job.cold, f"a {kind} call expected cold was warm"
        report["cold_start_ms"] = cold
        medians = {kind: statistics.median(values) for kind, values in cold.items()}
        report["cold_start_ms_median"] = medians
        report["mount_adds_ms"] = round(medians["volume"] - medians["stem"], 1)
        report["own_container_adds_ms"] = round(medians["own"] - medians["stem"], 1)
        report["load_average_end"] = os.getloadavg()[0]
    finally:
        proc.terminate()
        proc.wait(60)
        shutil.rmtree(data_dir, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
