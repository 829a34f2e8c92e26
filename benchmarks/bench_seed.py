"""The seed contract's sync /run against NanoGrid's own /v1/run: the same no-op function, the same grid, one run.

    python benchmarks/bench_seed.py [--calls 1000] [--sandbox process|docker] [--out benchmarks/results/seed.json]

Starts `nanogrid up` as its own process, deploys one handler through the seed's /upload (its id is a stable
seed id; /v1/run takes the version's NanoGrid id), warms it, then alternates blocks of seed and native calls
over one keep-alive connection each, so drift on this shared machine hits both alike. The difference is what
the seed routes add: function lookup by stable id, the seed's rate-limit headers and the result's translation.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import socket
import sys
import tempfile
import zipfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_embedded import percentiles, start_grid, timed  # noqa: E402

NOOP = "def handler(event, context):\n    return event\n"
BLOCK = 50


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--sandbox", default="process", choices=["process", "docker"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/seed.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nanogrid-bench-seed-") as tmp:
        port = free_port()
        proc = start_grid(Path(tmp), port, args.sandbox)
        try:
            key = (Path(tmp) / "local-key").read_text().strip()
            url = f"http://127.0.0.1:{port}"
            seed_http = httpx.Client(base_url=url, headers={"x-api-key": key}, timeout=60)
            native_http = httpx.Client(base_url=url + "/v1", headers={"x-api-key": key}, timeout=60)
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w") as zf:
                zf.writestr("main.py", NOOP)
            seed_id = seed_http.post(
                "/upload",
                files={"file": ("f.zip", buffer.getvalue())},
                headers={"x-function-name": "noop"},
            ).json()["functionId"]
            native_id = next(
                f["function_id"]
                for f in native_http.get("/functions").json()
                if f["stable_id"] == seed_id
            )
            seed_body = {"functionId": seed_id, "inputData": {"x": 1}}
            native_body = {"function_id": native_id, "payload": {"x": 1}}

            def seed_call() -> None:
                assert seed_http.post("/run", json=seed_body).json()["status"] == "SUCCESS"

            def native_call() -> None:
                assert native_http.post("/run", json=native_body).json()["status"] == "completed"

            timed(seed_call, 100)
            timed(native_call, 100)
            seed, native = [], []
            for _ in range(max(1, args.calls // BLOCK)):
                seed += timed(seed_call, BLOCK)
                native += timed(native_call, BLOCK)
            results = {"seed_run": percentiles(seed), "native_run": percentiles(native)}
            results["seed_minus_native_p50_ms"] = round(
                results["seed_run"]["p50_ms"] - results["native_run"]["p50_ms"], 3
            )
            results["machine"] = {
                "python": platform.python_version(),
                "cpus": __import__("os").cpu_count(),
                "sandbox": args.sandbox,
            }
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
