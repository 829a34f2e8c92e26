"""Warm calls of Node.js, Go and C++ functions against a warm Python call: the same echo handler, the same grid.

    python benchmarks/bench_runtimes.py [--calls 1000] [--out benchmarks/results/runtimes.json]

Starts `nanogrid up --sandbox docker` as its own process (the language runtimes need Docker; build their images
first with `python nanogrid_runtimes/build.py --runtime node|go|cpp`), deploys one echo handler per runtime through
/v1/upload, warms each (Go and C++ compile on their first call), then alternates blocks of calls of each runtime
over one keep-alive connection, so drift on this shared machine hits them alike. Reported per runtime: the
round trip through /v1/run, and its p50's difference from Python's (the target: within 2 ms).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import zipfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_embedded import percentiles, start_grid, timed  # noqa: E402
from benchmarks.bench_seed import free_port  # noqa: E402

ECHO = {
    "python3.11": ("main.py", "main.handler", "def handler(event, context):\n    return event\n"),
    "nodejs": ("index.js", "index.handler", "exports.handler = async (event, context) => event;\n"),
    "go": (
        "main.go",
        "main.Handler",
        "package main\n\nfunc Handler(event map[string]interface{}) "
        "(map[string]interface{}, error) {\n    return event, nil\n}\n",
    ),
    "cpp": (
        "main.cpp",
        "main.handler",
        'extern "C" const char* handler(const char* event) { return event; }\n',
    ),
}
BLOCK = 50


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=1000, help="calls per runtime")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/runtimes.json"))
    args = parser.parse_args()
    python = "python%d.%d" % sys.version_info[:2]
    echo = {python if name.startswith("python") else name: spec for name, spec in ECHO.items()}
    with tempfile.TemporaryDirectory(prefix="nanogrid-bench-runtimes-") as tmp:
        port = free_port()
        proc = start_grid(Path(tmp), port, "docker")
        try:
            key = (Path(tmp) / "local-key").read_text().strip()
            http = httpx.Client(
                base_url=f"http://127.0.0.1:{port}/v1", headers={"x-api-key": key}, timeout=120
            )
            served = http.get("/health").json()["runtimes"]
            missing = [name for name in echo if name not in served]
            if missing:
                sys.exit(
                    f"this grid does not serve {', '.join(missing)}: build the images with "
                    "`python nanogrid_runtimes/build.py --runtime node|go|cpp`"
                )
            calls = {}
            for runtime, (file, handler, source) in echo.items():
                buffer = io.BytesIO()
                with zipfile.ZipFile(buffer, "w") as zf:
                    zf.writestr(file, source)
                function_id = http.post(
                    "/upload",
                    files={"file": ("p.zip", buffer.getvalue())},
                    data={
                        "function_name": f"echo-{runtime}",
                        "runtime": runtime,
                        "handler": handler,
                        "memory": "256",
                    },
                ).json()["function_id"]
                body = {"function_id": function_id, "payload": {"x": 1}}

                def call(body: dict = body) -> None:
                    done = http.post("/run", json=body).json()
                    assert done["status"] == "completed" and done["result"] == {"x": 1}, done

                calls[runtime] = call
                timed(call, 100)  # the cold start (and compile), then a warm sandbox
            samples: dict[str, list[float]] = {runtime: [] for runtime in calls}
            for _ in range(max(1, args.calls // BLOCK)):
                for runtime, call in calls.items():
                    samples[runtime] += timed(call, BLOCK)
            results: dict = {runtime: percentiles(times) for runtime, times in samples.items()}
            for runtime in calls:
                if runtime != python:
                    results[f"{runtime}_minus_python_p50_ms"] = round(
                        results[runtime]["p50_ms"] - results[python]["p50_ms"], 3
                    )
            results["machine"] = {
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "sandbox": "docker",
                "runtimes": {name: served[name] for name in calls},
            }
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
