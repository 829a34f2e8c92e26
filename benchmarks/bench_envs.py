"""Function environments on this machine: first call with a new pandas + numpy + scikit-learn environment
(a build), the second call against a plain warm call, a new function in the built environment (stem cell),
and the layer's size. Writes JSON to benchmarks/results/envs.json.

    .venv/bin/python -m benchmarks.bench_envs [--sandbox docker|process] [--cold-uv-cache]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy
import pandas as pd
import sklearn

import nanogrid
from nanogrid_backend.config import GridConfig
from nanogrid_backend.embedded import EmbeddedGrid

RESULTS = Path(__file__).resolve().parent / "results"
RUNTIME = "nanogrid/runtime-python:latest"
BENCH_RUNTIME = "nanogrid/runtime-python:bench-envs"


def p50(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 2)


def _wait_for_stem(grid: EmbeddedGrid, env_id: str, timeout: float) -> bool:
    """Wait until the grid holds a started stem cell of the environment (what a new function in it takes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if grid.grid.pool.snapshot()["stem_cells_by_environment"].get(env_id):
            return True
        time.sleep(0.1)
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sandbox", default="docker", choices=["docker", "process"])
    parser.add_argument("--cold-uv-cache", action="store_true", help="build with an empty uv cache")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("httpx", "uvicorn.access", "uvicorn.error"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    load_at_start = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="bench-envs-") as tmp:
        if args.cold_uv_cache:
            os.environ["UV_CACHE_DIR"] = str(Path(tmp) / "uv-cache")
        settings: dict[str, object] = {}
        if (
            args.sandbox == "docker"
        ):  # a tag of its own: a runtime rebuilt meanwhile must not rebuild the image here
            subprocess.run(["docker", "tag", RUNTIME, BENCH_RUNTIME], check=True)
            settings["docker_image"] = BENCH_RUNTIME
        config = GridConfig.load(
            data_dir=Path(tmp) / "grid", port=0, sandbox=args.sandbox, **settings
        )
        with EmbeddedGrid(config) as grid:
            nanogrid.connect(grid.url, api_key=grid.api_key)
            # A fresh environment id each run (a variable in it), so the first call always builds.
            env = nanogrid.Environment(
                packages=[
                    f"pandas=={pd.__version__}",
                    f"numpy=={numpy.__version__}",
                    f"scikit-learn=={sklearn.__version__}",
                ],
                env={"RUN": tmp},
            )

            @nanogrid.remote(environment=env)
            def fit(n):
                from sklearn.linear_model import LinearRegression

                return float(
                    LinearRegression().fit([[i] for i in range(n)], list(range(n))).coef_[0]
                )

            started = time.perf_counter()
            fit.remote(10)
            first = time.perf_counter() - started

            @nanogrid.remote
            def plain(x):
                return x

            plain.remote(0)
            warm_env, warm_plain = [], []
            for _ in range(50):
                t = time.perf_counter()
                fit.remote(3)
                warm_env.append(time.perf_counter() - t)
                t = time.perf_counter()
                plain.remote(1)
                warm_plain.append(time.perf_counter() - t)
            stem_ready = _wait_for_stem(
                grid, env.id, timeout=60
            )  # started after the environment's first use

            @nanogrid.remote(environment=env)
            def another(x):
                import pandas

                return len(pandas.DataFrame({"a": [x]}))

            t = time.perf_counter()
            another.remote(1)
            new_function = time.perf_counter() - t
            info = next(e for e in grid.grid.environments.list() if e["env_id"] == env.id)
            grid.grid.pool.close()  # its sandboxes go first, then the environment's layer and image
            grid.grid.environments.remove(env.id)
    if args.sandbox == "docker":
        subprocess.run(["docker", "image", "rm", BENCH_RUNTIME], capture_output=True)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "sandbox": args.sandbox,
        "load_average_at_start": load_at_start,  # others' work on the machine slows every figure here
        "uv_cache": "cold" if args.cold_uv_cache else "warm",
        "packages": list(env.packages),
        "first_call_new_environment_s": round(first, 2),
        "second_call_p50_ms": p50(warm_env),
        "plain_warm_call_p50_ms": p50(warm_plain),
        "new_function_in_built_environment_ms": round(new_function * 1000, 1),
        "stem_cell_was_ready": stem_ready,
        "layer_mib": round(info["size"] / (1 << 20), 1),
    }
    RESULTS.mkdir(exist_ok=True)
    name = f"envs-{args.sandbox}-{result['uv_cache']}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
