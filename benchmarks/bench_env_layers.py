"""Environments grown by layers: the first call of a new pandas + pyarrow + scikit-learn + matplotlib environment
(built from scratch), then the first call of that environment plus one package (humanize), which grows from it
by one layer. Docker sandbox, warm uv cache. Writes JSON to benchmarks/results/env_layers.json.

    .venv/bin/python -m benchmarks.bench_env_layers [--sandbox docker|process]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import nanogrid
from nanogrid_backend.builds.builder import Environments, check_spec
from nanogrid_backend.config import GridConfig
from nanogrid_backend.embedded import EmbeddedGrid

RESULTS = Path(__file__).resolve().parent / "results"
RUNTIME = "nanogrid/runtime-python:latest"
BENCH_RUNTIME = "nanogrid/runtime-python:bench-env-layers"
PACKAGES = ["pandas", "pyarrow", "scikit-learn", "matplotlib"]
ADDED = "humanize==4.9.0"


class BuildTimes(logging.Handler):
    """The grid's own figures for each build: the layer (uv) and the image (docker load)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith(("built environment", "built image")) and record.args:
            self.seen.append((record.getMessage(), float(record.args[-1])))  # type: ignore[index, arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sandbox", default="docker", choices=["docker", "process"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    times = BuildTimes()
    logging.getLogger("nanogrid_backend.builds.builder").addHandler(times)
    logging.getLogger("nanogrid_backend.builds.builder").setLevel(logging.INFO)
    pins = [f"{name}=={metadata.version(name)}" for name in PACKAGES]
    load_at_start = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="bench-env-layers-") as tmp:
        python = "%d.%d" % sys.version_info[:2]
        warm_up = Environments(
            Path(tmp) / "warm-up", runtimes={f"python{python}": python}
        )  # fills uv's cache
        warm_up.ensure(
            check_spec(nanogrid.Environment(packages=[*pins, ADDED]).spec(), warm_up.runtimes)
        )
        times.seen = []
        settings: dict[str, object] = {}
        if (
            args.sandbox == "docker"
        ):  # a tag of its own: a runtime rebuilt meanwhile must not rebuild the image here
            subprocess.run(["docker", "tag", RUNTIME, BENCH_RUNTIME], check=True)
            settings["docker_image"] = BENCH_RUNTIME
        # No stem cells: every first call below starts its sandbox, so the figures differ by their builds alone.
        config = GridConfig.load(
            data_dir=Path(tmp) / "grid", port=0, sandbox=args.sandbox, stem_cells=0, **settings
        )
        with EmbeddedGrid(config) as grid:
            nanogrid.connect(grid.url, api_key=grid.api_key)
            env = nanogrid.Environment(
                packages=pins, env={"RUN": tmp}
            )  # a fresh id each run: the first call builds

            @nanogrid.remote(environment=env)
            def versions():
                import importlib.metadata

                return {name: importlib.metadata.version(name) for name in PACKAGES}

            started = time.perf_counter()
            assert versions.remote() == {name: metadata.version(name) for name in PACKAGES}
            first = time.perf_counter() - started
            first_builds, times.seen = times.seen, []
            grown_env = env.with_packages([ADDED])

            @nanogrid.remote(environment=grown_env)
            def with_humanize():
                import importlib.metadata

                import humanize

                return humanize.intcomma(1234), {
                    name: importlib.metadata.version(name) for name in PACKAGES
                }

            started = time.perf_counter()
            said, imported = with_humanize.remote()
            grown = time.perf_counter() - started
            assert said == "1,234" and imported == {
                name: metadata.version(name) for name in PACKAGES
            }

            @nanogrid.remote(environment=grown_env)
            def another():
                import humanize

                return humanize.intcomma(5678)

            started = time.perf_counter()
            assert another.remote() == "5,678"
            no_build = (
                time.perf_counter() - started
            )  # what the first call of any new function costs, built or not
            listed = {e["env_id"]: e for e in grid.grid.environments.list()}
            info = listed[grown_env.id]
            grid.grid.pool.close()
            for env_id in listed:
                grid.grid.environments.remove(env_id)
    if args.sandbox == "docker":
        subprocess.run(["docker", "image", "rm", BENCH_RUNTIME], capture_output=True)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "sandbox": args.sandbox,
        "uv_cache": "warm",
        "load_average_at_start": load_at_start,  # others' work on the machine slows every figure here
        "packages": pins,
        "first_call_new_environment_s": round(first, 2),
        "first_call_new_environment_builds": [
            {"step": text, "s": round(s, 2)} for text, s in first_builds
        ],
        "added": ADDED,
        "first_call_with_one_package_added_s": round(grown, 2),
        "with_one_package_added_builds": [
            {"step": text, "s": round(s, 2)} for text, s in times.seen
        ],
        "first_call_new_function_in_that_built_environment_s": round(no_build, 2),
        "grown_from_the_built_environment": info.get("base") == env.id,
        "distributions_installed_for_the_added_package": info.get("added"),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "env_layers.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
