"""`.map()` at scale: 100,000 no-op calls against 5,000, process sandbox, in one run.

    python -m benchmarks.bench_map_scale [--sizes 5000 100000 5000 100000 5000] [--repeat 3] [--tracemalloc]
        [--consumer-us 500] [--out benchmarks/results/map-scale.json]

Starts `nanogrid up --sandbox process` as its own process with its own data directory, then maps a no-op from
this process. A map of many calls should run as fast per call as a small one, and neither side's memory should
grow with the number of calls. Per map: calls/s (and per tenth of the map), CPU per call of the client, the
grid and its sandboxes (what the machine's other load leaves alone, unlike calls/s), both processes' RSS sampled
every 50 ms (the grid's sandboxes, its children, apart), and how much the registry grew. The sizes take turns,
so drift on a shared machine and the registry's growth reach both; a map under 20,000 calls is timed
``--repeat`` times each turn. The comparison takes each size's median over all its maps. ``--tracemalloc`` maps
each size once more, untimed, for the client's Python heap peak. ``--consumer-us 500`` spends that long on each
result as it is taken: a reader slower than the grid, whose memory must stay bounded too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import psutil  # type: ignore[import-untyped]

import nanogrid
from benchmarks.bench_embedded import start_grid

SAMPLE_S = 0.05
MIB = 1 << 20
REPEAT_BELOW = (
    20_000  # maps of fewer calls are timed --repeat times a turn (a second is at the mercy of load)
)


class RssSampler:
    """Peak RSS of the client, the grid and the grid's children, sampled in a thread while a map runs."""

    def __init__(self, grid_pid: int) -> None:
        self.client = psutil.Process()
        self.grid = psutil.Process(grid_pid)
        self.peaks = {"client": 0, "grid": 0, "sandboxes": 0}
        self.grid_timeline: list[tuple[float, int]] = []  # (s since start, grid RSS), once a second
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        started = last = time.monotonic()
        while not self._stop.is_set():
            grid = self.grid.memory_info().rss
            sandboxes = 0
            for child in self.grid.children(recursive=True):
                try:
                    sandboxes += child.memory_info().rss
                except psutil.Error:
                    pass
            now = time.monotonic()
            for name, value in (
                ("client", self.client.memory_info().rss),
                ("grid", grid),
                ("sandboxes", sandboxes),
            ):
                self.peaks[name] = max(self.peaks[name], value)
            if now - last >= 1.0 or not self.grid_timeline:
                self.grid_timeline.append((round(now - started, 1), grid))
                last = now
            self._stop.wait(SAMPLE_S)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def registry_bytes(data_dir: Path) -> int:
    """The registry's files (SQLite, with its WAL) in the grid's data directory."""
    return sum(
        path.stat().st_size
        for path in data_dir.rglob("*")
        if path.is_file() and (".db" in path.name or ".sqlite" in path.name)
    )


def rss_mib(process: psutil.Process) -> float:
    return round(process.memory_info().rss / MIB, 1)


def cpu_s(process: psutil.Process) -> tuple[float, float]:
    """(CPU seconds of the process, of its children now alive), user and system together."""
    own = process.cpu_times()
    children = 0.0
    for child in process.children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.Error:
            continue
        children += times.user + times.system
    return own.user + own.system, children


def measure(
    noop: nanogrid.RemoteFunction, grid: psutil.Process, data_dir: Path, n: int, consumer_us: float
) -> dict:
    client = psutil.Process()
    before = {"client": rss_mib(client), "grid": rss_mib(grid)}
    registry_before = registry_bytes(data_dir)
    client_cpu_before, (grid_cpu_before, sandbox_cpu_before) = cpu_s(client)[0], cpu_s(grid)
    with RssSampler(grid.pid) as sampler:
        started = time.perf_counter()
        count = 0
        tenth, marks = max(1, n // 10), [started]
        for expected, got in enumerate(noop.map(range(n), progress=False)):
            assert got == expected, (expected, got)
            count += 1
            if consumer_us:
                busy_until = time.perf_counter() + consumer_us / 1e6
                while time.perf_counter() < busy_until:
                    pass
            if count % tenth == 0:
                marks.append(time.perf_counter())
        elapsed = time.perf_counter() - started
    grid_cpu, sandbox_cpu = cpu_s(grid)
    cpu = {  # CPU time per call: what the machine's other load does not change, unlike calls/s
        "client": cpu_s(client)[0] - client_cpu_before,
        "grid": grid_cpu - grid_cpu_before,
        "sandboxes": sandbox_cpu - sandbox_cpu_before,
    }
    assert count == n
    time.sleep(0.5)  # let the grid finish what the map's end left it (its streams' cleanup)
    return {
        "calls": n,
        "seconds": round(elapsed, 2),
        "calls_per_s": round(n / elapsed, 1),
        # the first tenth includes pickling every call and the streams' start; later tenths show any slowdown
        "calls_per_s_each_tenth": [
            round(tenth / (b - a)) for a, b in zip(marks, marks[1:], strict=False)
        ],
        "cpu_us_per_call": {side: round(seconds / n * 1e6, 1) for side, seconds in cpu.items()},
        "rss_mib_before": before,
        "rss_mib_peak": {k: round(v / MIB, 1) for k, v in sampler.peaks.items()},
        "rss_mib_after": {"client": rss_mib(client), "grid": rss_mib(grid)},
        "grid_rss_mib_each_second": [round(v / MIB, 1) for _, v in sampler.grid_timeline],
        "registry_growth_bytes": registry_bytes(data_dir) - registry_before,
        "registry_bytes_per_call": round((registry_bytes(data_dir) - registry_before) / n, 1),
    }


def traced_peak(noop: nanogrid.RemoteFunction, n: int) -> float:
    """The client's Python heap peak (MiB) during a map of n calls, over what it held before."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for _ in noop.map(range(n), progress=False):
            pass
        return round((tracemalloc.get_traced_memory()[1] - base) / MIB, 1)
    finally:
        tracemalloc.stop()


def compare(runs: list[dict]) -> dict:
    """The largest maps against the smallest, each size's median over all its maps (one map's second or two is at
    the mercy of the machine's other load): calls/s, and CPU per call, which that load leaves alone, so the fairer
    comparison on a shared machine."""
    sizes = sorted({run["calls"] for run in runs})
    if len(sizes) < 2:
        return {}

    def median(n: int, value: Callable[[dict], float]) -> float:
        return statistics.median(value(run) for run in runs if run["calls"] == n)

    small, large = sizes[0], sizes[-1]
    return {
        "maps_compared": {str(n): sum(run["calls"] == n for run in runs) for n in (small, large)},
        "largest_vs_smallest_calls_per_s": round(
            median(large, lambda r: r["calls_per_s"]) / median(small, lambda r: r["calls_per_s"]), 3
        ),
        "largest_vs_smallest_cpu_per_call": {
            side: round(
                median(large, lambda r, side=side: r["cpu_us_per_call"][side])
                / median(small, lambda r, side=side: r["cpu_us_per_call"][side]),
                3,
            )
            for side in ("client", "grid")
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[5000, 100_000, 5000, 100_000, 5000]
    )
    parser.add_argument("--port", type=int, default=8798)
    parser.add_argument(
        "--repeat", type=int, default=3, help=f"tries of a map under {REPEAT_BELOW} calls"
    )
    parser.add_argument(
        "--consumer-us",
        type=float,
        default=0,
        help="µs of work per result in the loop that takes them (a consumer slower than the grid)",
    )
    parser.add_argument("--tracemalloc", action="store_true", help="also the client's heap peak")
    parser.add_argument(
        "--label", default="", help="a note kept in the report (what was being compared)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "map-scale.json"
    )
    args = parser.parse_args()
    report: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_before": [round(x, 2) for x in os.getloadavg()],
        },
        "label": args.label,
        "sandbox": "process",
        "consumer_us_per_result": args.consumer_us,
        "runs": [],
    }
    data_dir = Path(tempfile.mkdtemp(prefix="nanogrid-bench-"))
    grid = start_grid(data_dir, args.port, "process")
    try:
        nanogrid.connect(
            f"http://127.0.0.1:{args.port}", api_key=(data_dir / "local-key").read_text().strip()
        )

        @nanogrid.remote
        def noop(x: int) -> int:
            return x

        list(noop.map(range(500), progress=False))  # warm: sandboxes up, the function timed short
        grid_process = psutil.Process(grid.pid)
        for n in args.sizes:
            # a short map is timed more than once a turn; each try is a run of its own
            for _ in range(args.repeat if n < REPEAT_BELOW else 1):
                run = measure(noop, grid_process, data_dir, n, args.consumer_us)
                report["runs"].append(run)
                print(json.dumps({k: v for k, v in run.items() if "each_" not in k}))
        # after the timed maps, which it would slow down
        for n in sorted(set(args.sizes)) if args.tracemalloc else []:
            report.setdefault("client_tracemalloc_peak_mib", {})[str(n)] = traced_peak(noop, n)
    finally:
        grid.terminate()
        grid.wait(15)
        shutil.rmtree(data_dir, ignore_errors=True)
    report.update(compare(report["runs"]))
    report["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
