"""Package sync's cost on the client: finding the modules a function's pickle references and mapping them to pinned
distributions, the same for a DataFrame argument, and what argument scanning adds per item of a ``.map()``.
No grid is needed. Writes JSON to benchmarks/results/package_sync.json.

    .venv/bin/python -m benchmarks.bench_package_sync
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle
import numpy
import pandas as pd

import nanogrid
from nanogrid import environment
from nanogrid.transfer import ArgsEncoder

RESULTS = Path(__file__).resolve().parent / "results"
MAP_ITEMS = 10_000


def timed(work: Callable[[], Any], repeat: int = 20) -> float:
    """The median of ``repeat`` runs, in milliseconds."""
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        samples.append(time.perf_counter() - started)
    return round(statistics.median(samples) * 1000, 3)


def summarise(frame: pd.DataFrame) -> float:
    """A typical notebook function: numpy and pandas as module globals."""
    return float(numpy.mean(frame["x"])) + len(pd.unique(frame["name"]))


def function_figures() -> dict[str, Any]:
    pickled = cloudpickle.dumps(summarise)
    modules = environment.modules_in_pickle(pickled)
    return {
        "pickle_bytes": len(pickled),
        "cloudpickle_ms": timed(lambda: cloudpickle.dumps(summarise)),
        "modules_in_pickle_ms": timed(lambda: environment.modules_in_pickle(pickled)),
        "walk_globals_ms": timed(lambda: environment.modules_of_function(summarise)),
        "pinned_distributions_ms": timed(lambda: environment.pinned_distributions(modules)),
        "requirements_for_ms": timed(lambda: environment.requirements_for(summarise, pickled)),
        "packages": list(environment.requirements_for(summarise, pickled).packages),
    }


def dataframe_figures(rows: int) -> dict[str, Any]:
    frame = pd.DataFrame(
        {"name": [f"n{i % 100}" for i in range(rows)], "x": numpy.arange(rows, dtype=float)}
    )
    pickled = cloudpickle.dumps(frame, protocol=5)
    modules = environment.modules_in_pickle(pickled)
    return {
        "rows": rows,
        "pickle_bytes": len(pickled),
        "cloudpickle_ms": timed(lambda: cloudpickle.dumps(frame, protocol=5), repeat=5),
        "modules_in_pickle_ms": timed(lambda: environment.modules_in_pickle(pickled), repeat=5),
        "pinned_distributions_ms": timed(
            lambda: environment.pinned_distributions(modules), repeat=5
        ),
        "modules": sorted(modules),
    }


def object_graph_figures(count: int) -> dict[str, Any]:
    """The scanner's worst case: a value of many small objects (an opcode or more each)."""
    value = [{"a": i, "b": str(i)} for i in range(count)]
    pickled = cloudpickle.dumps(value, protocol=5)
    return {
        "dicts": count,
        "pickle_bytes": len(pickled),
        "cloudpickle_ms": timed(lambda: cloudpickle.dumps(value, protocol=5), repeat=3),
        "modules_in_pickle_ms": timed(lambda: environment.modules_in_pickle(pickled), repeat=3),
    }


def map_figures() -> dict[str, Any]:
    """Per item of a .map() over small items: checking and pickling with an explicit environment (nothing synced)
    and with package sync (what .map() does), and the scan alone, through the per-kind cache and without it."""
    client = nanogrid.Client("http://unused.invalid", api_key="k")  # pickling sends nothing
    items = [(i, f"item-{i}") for i in range(MAP_ITEMS)]

    def check_and_encode(fn: nanogrid.RemoteFunction[Any, Any]) -> None:
        encoder = ArgsEncoder(client)
        for index, item in enumerate(items):
            fn._pickle(
                encoder, (item,), {}, index
            )  # what .map() runs per item before anything is sent

    def encode_only() -> None:  # an explicit environment: nothing is synced, so nothing is scanned
        check_and_encode(
            nanogrid.RemoteFunction(summarise, client=client, environment=nanogrid.Environment())
        )

    def encode_and_scan() -> None:
        check_and_encode(nanogrid.RemoteFunction(summarise, client=client))

    pickled = cloudpickle.dumps(items[0], protocol=5)

    def scan_every_item() -> None:  # what each item would cost without the per-kind cache
        for _ in items:
            environment.modules_in_pickle(pickled)

    def scan_cached() -> None:  # a kind already scanned: its signature and a lookup
        for item in items:
            environment.modules_of_argument(item, pickled)

    per_item = {
        name: round(timed(work, repeat=5) * 1000 / MAP_ITEMS, 2)
        for name, work in [
            ("check_and_encode_us", encode_only),
            ("check_encode_and_sync_us", encode_and_scan),
            ("scan_cached_us", scan_cached),
            ("scan_uncached_us", scan_every_item),
        ]
    }
    return {"items": MAP_ITEMS, "item": "a (int, str) tuple", **per_item}


def main() -> None:
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_at_start": round(
            os.getloadavg()[0], 2
        ),  # others' work on the machine slows every figure
        "function": function_figures(),
        "dataframe_argument": [dataframe_figures(rows) for rows in (100, 1_000_000)],
        "list_of_dicts_argument": object_graph_figures(100_000),
        "map_per_item": map_figures(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "package_sync.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
