"""Volumes in AWS mode: what a worker's sync costs around a call (S3 here is the moto server, on loopback).

    python benchmarks/bench_volume_sync.py [--files 1000] [--mib 256] [--runs 20]
                                           [--out benchmarks/results/volume-sync.json]

A volume holding ``--files`` small files and one ``--mib`` MiB file is put in S3 through the controller's side
(``S3Volumes``); a worker's copy (``SyncedVolumes``, a real ext4 loop volume) then:

- ``first_sync``: syncs from nothing (every file downloaded) -- MB/s is moto's more than S3's;
- ``warm_attach``: attaches again with nothing changed (one listing, no download): what every call pays;
- ``after_call_one_changed``: after a call that changed one file, uploads it (walks every file to find it);
- ``after_call_nothing_changed``: after a read-only-in-effect call: the walk alone.

Medians of ``--runs``. Needs root (loop devices) and moto_server (the test venv).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanogrid_backend.registry.sqlite import SQLiteRegistry  # noqa: E402
from nanogrid_backend.volume_sync import S3Volumes, SyncedVolumes  # noqa: E402
from tests.aws_cluster import VENV_BIN, free_port, wait_for_port  # noqa: E402

MiB = 1 << 20


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/volume-sync.json")
    args = parser.parse_args()

    port = free_port()
    moto = subprocess.Popen(
        [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with tempfile.TemporaryDirectory(prefix="nanogrid-bench-sync-") as scratch_dir:
        root = Path(scratch_dir)
        worker = registry = None
        try:
            wait_for_port(port)
            import boto3

            s3 = boto3.client(
                "s3",
                endpoint_url=f"http://127.0.0.1:{port}",
                aws_access_key_id="bench",
                aws_secret_access_key="bench",
                region_name="us-east-1",
            )
            s3.create_bucket(Bucket="bench")
            registry = SQLiteRegistry(root / "registry.sqlite3")
            home = S3Volumes(s3, "bench", registry)
            worker = SyncedVolumes(root / "worker", registry, home, uid=os.getuid())
            home.create("bench", "data", args.mib + 256)
            small = root / "small.txt"
            small.write_bytes(b"x" * 1024)
            started = time.perf_counter()
            for n in range(args.files):
                home.put("bench", "data", f"small/{n:05d}.txt", small)
            put_small_s = time.perf_counter() - started
            big = root / "big.bin"
            with open(big, "wb") as f:
                f.write(os.urandom(MiB) * args.mib)
            home.put("bench", "data", "big.bin", big)
            wanted = [{"name": "data", "path": "/data"}]

            started = time.perf_counter()
            volumes = worker.attach("bench", wanted)
            volumes.before_call()  # as the worker does before each call
            first_sync_s = time.perf_counter() - started
            copy = Path(volumes.mounts[0].source)

            warm = []
            for _ in range(args.runs):
                started = time.perf_counter()
                worker.attach("bench", wanted).before_call()
                warm.append(time.perf_counter() - started)
            changed, unchanged = [], []
            for n in range(args.runs):
                (copy / "small" / f"{n:05d}.txt").write_bytes(b"changed %d" % n)
                started = time.perf_counter()
                volumes.after_call()
                changed.append(time.perf_counter() - started)
                started = time.perf_counter()
                volumes.after_call()
                unchanged.append(time.perf_counter() - started)
            result = {
                "machine": {"cpus": os.cpu_count(), "load": os.getloadavg()},
                "files": args.files,
                "big_mib": args.mib,
                "put_small_files_per_s": round(args.files / put_small_s, 1),
                "first_sync_s": round(first_sync_s, 2),
                "first_sync_mb_per_s": round(
                    (args.mib * MiB + args.files * 1024) / first_sync_s / 1e6, 1
                ),
                "warm_attach_ms_p50": median_ms(warm),
                "after_call_one_changed_ms_p50": median_ms(changed),
                "after_call_nothing_changed_ms_p50": median_ms(unchanged),
                "downloads": worker.downloads,
                "uploads": worker.uploads,
            }
        finally:
            if worker is not None:
                worker.close()
            if registry is not None:
                registry.close()
            moto.terminate()
            moto.wait(10)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
