"""Where a warm `.remote()` call's time goes: client, grid process (controller and worker) and sandbox.

    python benchmarks/bench_profile.py [--calls 1000] [--runs 3] [--peers-python .venv-peers/bin/python]
                                       [--sandbox docker] [--map 5000] [--out benchmarks/results/profile.json]

Two phases, each against its own `nanogrid up` process with the process sandbox (``--sandbox docker``: the Docker
sandbox, with the CPU of the Docker engine and of the containers counted too):

1. Plain: the warm round trip (p50, best of ``--runs``), and the CPU each side spends per call, read from the
   kernel's accounting (this process; the grid process; the grid's child processes, i.e. the sandboxes): no
   profiler slows anything down here.
2. Profiled: the grid runs under cProfile in every thread (each thread gets its own profiler as it starts), the
   client's calls under cProfile too. The profiles are snapshots taken just before and just after the measured
   calls, so start-up never shows. Their split by module (own time, cProfile's "tottime") is scaled to the plain
   phase's CPU per call, which gives microseconds per call per part of the code.

``--map N`` measures one `.map()` of N calls (its calls/s, best of ``--runs``) instead of calls one after another,
and splits its CPU per call the same way.

Ray's warm call is measured in the same run when ``--peers-python`` names an interpreter that has Ray.
Only the standard library, psutil and NanoGrid itself are needed.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import docker
import httpx
import psutil  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nanogrid  # noqa: E402
from benchmarks.peers import percentiles, timed  # noqa: E402
from nanogrid_backend.sandbox.leftovers import grid_identity  # noqa: E402

PARTS = (  # (label, path fragment): the first that matches a profiled function's file names its part
    ("nanogrid client", "/nanogrid/"),
    ("registry (sqlite, our code)", "nanogrid_backend/registry/"),
    ("queue", "nanogrid_backend/queue/"),
    ("retries", "nanogrid_backend/worker/retries.py"),
    ("worker slot", "nanogrid_backend/worker/"),
    ("sandbox exchange", "nanogrid_backend/sandbox/"),
    ("controller routes", "nanogrid_backend/controller/"),
    ("grid (other)", "nanogrid_backend/"),
    ("httpx/httpcore (client HTTP)", "/httpx/"),
    ("httpx/httpcore (client HTTP)", "/httpcore/"),
    ("h11 (HTTP parsing)", "/h11/"),
    ("uvicorn", "/uvicorn/"),
    ("starlette", "/starlette/"),
    ("fastapi", "/fastapi/"),
    ("pydantic", "/pydantic"),
    ("asyncio", "/asyncio/"),
    ("json", "/json/"),
    ("threading/queue (stdlib)", "/threading.py"),
    ("prometheus_client", "/prometheus_client/"),
    ("anyio", "/anyio/"),
)


WAITS = (
    "SimpleQueue' objects>",
    "select.select",
    "recv' of",
    "poll",
    "acquire",
    "sleep",
    "getstats",
)


def part_of(filename: str, name: str) -> str:
    if filename == "~" and any(wait in name for wait in WAITS):
        return "waiting"
    if "bench_profile.py" in filename:
        return "waiting"  # the snapshots themselves
    if filename == "~":  # a built-in: sqlite3's execute, socket calls, json's C encoder...
        if "sqlite3" in name:
            return "sqlite3 (C)"
        if "socket" in name or "select" in name or "poll" in name or "epoll" in name:
            return "sockets/selectors (C)"
        if "acquire" in name or "wait" in name:
            return "locks (C)"
        return "other built-ins (C)"
    for label, fragment in PARTS:
        if fragment in filename:
            return label
    return "other Python"


# ---- the profiled grid (run as `bench_profile.py --serve ...`) ------------------------------------------------


def serve(argv: list[str], snapshot_dir: Path) -> None:
    """`nanogrid up` with a cProfile per thread; SIGUSR1 writes a snapshot of all of them (start, then end)."""
    profilers: list[cProfile.Profile] = []
    lock = threading.Lock()

    def start_in_thread(*_: Any) -> None:
        profiler = cProfile.Profile()
        with lock:
            profilers.append(profiler)
        profiler.enable()  # replaces this hook for this thread

    threading.setprofile(start_in_thread)
    main = cProfile.Profile()
    profilers.append(main)
    snapshots = [0]

    def snapshot(*_: Any) -> None:
        rows: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        edges: dict[str, int] = defaultdict(int)
        with lock:
            for profiler in profilers:
                for entry in profiler.getstats():
                    code = entry.code
                    key = (
                        f"{code.co_filename}:{code.co_firstlineno}:{code.co_name}"
                        if not isinstance(code, str)
                        else f"~:0:{code}"
                    )
                    row = rows[key]
                    row[0] += entry.callcount
                    row[1] += entry.inlinetime
                    for sub in (
                        entry.calls or ()
                    ):  # who calls what: the callers of a costly built-in
                        callee = sub.code if isinstance(sub.code, str) else sub.code.co_name
                        edges[f"{key} -> {callee}"] += sub.callcount
        snapshots[0] += 1
        (snapshot_dir / f"snapshot{snapshots[0]}.json").write_text(json.dumps(rows))
        (snapshot_dir / f"edges{snapshots[0]}.json").write_text(json.dumps(edges))

    signal.signal(signal.SIGUSR1, snapshot)
    main.enable()
    from nanogrid.cli import main as cli_main

    cli_main(argv)


def profile_breakdown(
    before: dict[str, list[float]], after: dict[str, list[float]], calls: int
) -> dict[str, Any]:
    """Own time per call by part and the functions that cost most, from two snapshots."""
    parts: dict[str, float] = defaultdict(float)
    functions = []
    for key, (count, own) in after.items():
        count0, own0 = before.get(key, (0, 0.0))
        own -= own0
        if own <= 0:
            continue
        filename, _, name = key.split(":", 2)
        part = part_of(filename, name)
        if part == "waiting":
            continue  # a thread blocked on a socket, a lock or a queue is not working
        parts[part] += own
        functions.append((own, count - count0, key))
    total = sum(parts.values())
    functions.sort(reverse=True)
    return {
        "profiled_own_s": round(total, 4),
        "share_by_part": {
            k: round(v / total, 3) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])
        },
        "top_functions": [
            {
                "function": key.replace(str(Path.home()), "~"),
                "own_us_per_call": round(own / calls * 1e6, 1),
                "calls_per_call": round(n / calls, 2),
            }
            for own, n, key in functions[:TOP]
        ],
    }


# ---- the measuring side -------------------------------------------------------------------------------------


SANDBOX = "process"  # --sandbox
MAP = 0  # --map: measure .map() of this many calls instead of one call after another
TOP = 25  # --top: the functions listed per side


def measured(noop: Any, calls: int) -> dict[str, Any]:
    """The measured work: ``calls`` warm calls one after another (their percentiles), or with ``--map`` one
    ``.map()`` of ``calls`` (its rate)."""
    if not MAP:
        return {"remote": percentiles(timed(lambda: noop.remote(1), calls))}
    started = time.perf_counter()
    out = list(noop.map(range(calls), progress=False))
    assert out == list(range(calls))
    return {
        "map": {"calls": calls, "calls_per_s": round(calls / (time.perf_counter() - started), 1)}
    }


def better(run: dict[str, Any], best: dict[str, Any] | None) -> bool:
    if best is None:
        return True
    if MAP:
        return bool(run["map"]["calls_per_s"] > best["map"]["calls_per_s"])
    return bool(run["remote"]["p50_ms"] < best["remote"]["p50_ms"])


def start_grid(data_dir: Path, port: int, profiled: bool) -> subprocess.Popen:
    up = ["up", "--port", str(port), "--data-dir", str(data_dir), "--sandbox", SANDBOX]
    command = (
        [sys.executable, __file__, "--serve", str(data_dir), *up]
        if profiled
        else [sys.executable, "-m", "nanogrid.cli", *up]
    )
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                time.sleep(1.5)  # let the stem cells start
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("nanogrid up did not answer within 90 s")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(the process's own CPU, its descendants' CPU, living or reaped) in seconds."""
    process = psutil.Process(pid)
    own = process.cpu_times()
    children = own.children_user + own.children_system
    for child in process.children(recursive=True):
        try:
            times = child.cpu_times()
            children += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return own.user + own.system, children


ENGINE = ("dockerd", "containerd", "containerd-shim", "containerd-shim-runc-v2")
CONTAINERS_CPU = Path(
    "/sys/fs/cgroup/cpuacct/docker"
)  # cgroup v1: <container id>/cpuacct.usage, in ns


def docker_cpu_seconds(data_dir: Path) -> tuple[float, float, float]:
    """(the Docker engine's CPU: dockerd, containerd and the shims that copy each container's stdio; the storage
    driver's, where it is a process of its own per container, as fuse-overlayfs is: each path a container looks
    up from its root is a request to it; the CPU of this grid's containers, found by its label) in seconds; zeros
    for the process sandbox and where they cannot be read. A container removed between two readings takes its
    CPU with it: the pool's warm containers stay for a measurement."""
    if SANDBOX != "docker":
        return 0.0, 0.0, 0.0
    label = f"nanogrid.grid={grid_identity(data_dir / 'sandboxes')}"
    try:
        ours = docker.from_env().containers.list(filters={"label": label}, ignore_removed=True)
    except docker.errors.DockerException:
        ours = []
    containers, merged = 0.0, set()
    for container in ours:
        merged.add(container.attrs.get("GraphDriver", {}).get("Data", {}).get("MergedDir"))
        try:
            containers += int((CONTAINERS_CPU / container.id / "cpuacct.usage").read_text()) / 1e9
        except (OSError, ValueError):
            pass
    engine = storage = 0.0
    for process in psutil.process_iter(["name", "cmdline", "cpu_times"]):
        name, cmdline, times = (process.info[k] for k in ("name", "cmdline", "cpu_times"))
        if times is None:
            continue
        if name in ENGINE:
            engine += times.user + times.system
        elif name == "fuse-overlayfs" and cmdline and cmdline[-1] in merged:
            storage += times.user + times.system
    return engine, storage, containers


def noop_function(url: str, key: str) -> Any:
    nanogrid.connect(url, api_key=key)

    @nanogrid.remote
    def noop(x):
        return x

    timed(lambda: noop.remote(1), 200)  # warm: the function's sandbox is up, connections are open
    if MAP:  # and timed as short, so its calls go in batches
        list(noop.map(range(500), progress=False))
    return noop


def plain_phase(port: int, calls: int, runs: int) -> dict[str, Any]:
    data_dir = Path(tempfile.mkdtemp(prefix="nanogrid-profile-"))
    grid = start_grid(data_dir, port, profiled=False)
    try:
        noop = noop_function(
            f"http://127.0.0.1:{port}", (data_dir / "local-key").read_text().strip()
        )
        best: dict[str, Any] | None = None
        for _ in range(runs):
            grid_before, sandbox_before = cpu_seconds(grid.pid)
            engine_before, storage_before, containers_before = docker_cpu_seconds(data_dir)
            client_before, wall_before = time.process_time(), time.perf_counter()
            result = measured(noop, calls)
            client_cpu, wall = (
                time.process_time() - client_before,
                time.perf_counter() - wall_before,
            )
            grid_after, sandbox_after = cpu_seconds(grid.pid)
            engine_after, storage_after, containers_after = docker_cpu_seconds(data_dir)
            if SANDBOX == "docker":  # the sandboxes are the engine's children, not the grid's
                sandbox_before, sandbox_after = containers_before, containers_after
            run: dict[str, Any] = {
                **result,
                "cpu_us_per_call": {
                    "client": round(client_cpu / calls * 1e6, 1),
                    "grid process (controller + worker)": round(
                        (grid_after - grid_before) / calls * 1e6, 1
                    ),
                    "sandbox processes": round((sandbox_after - sandbox_before) / calls * 1e6, 1),
                    **(
                        {
                            "docker engine (dockerd, containerd, shims)": round(
                                (engine_after - engine_before) / calls * 1e6, 1
                            ),
                            "storage driver (fuse-overlayfs, where it is one)": round(
                                (storage_after - storage_before) / calls * 1e6, 1
                            ),
                        }
                        if SANDBOX == "docker"
                        else {}
                    ),
                },
                "wall_us_per_call": round(wall / calls * 1e6, 1),
            }
            if better(run, best):
                best = run
        assert best is not None
        return best
    finally:
        grid.terminate()
        grid.wait(15)


def profiled_phase(port: int, calls: int) -> dict[str, Any]:
    data_dir = Path(tempfile.mkdtemp(prefix="nanogrid-profile-"))
    grid = start_grid(data_dir, port, profiled=True)
    try:
        noop = noop_function(
            f"http://127.0.0.1:{port}", (data_dir / "local-key").read_text().strip()
        )
        client = cProfile.Profile()
        grid.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        client.enable()
        measured(noop, calls)
        client.disable()
        grid.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        before = json.loads((data_dir / "snapshot1.json").read_text())
        after = json.loads((data_dir / "snapshot2.json").read_text())
        client_rows: dict[str, list[float]] = {}
        for entry in client.getstats():
            code = entry.code
            key = (
                f"{code.co_filename}:{code.co_firstlineno}:{code.co_name}"
                if not isinstance(code, str)
                else f"~:0:{code}"
            )
            client_rows[key] = [entry.callcount, entry.inlinetime]
        edges0 = json.loads((data_dir / "edges1.json").read_text())
        edges = {
            edge: n - edges0.get(edge, 0)
            for edge, n in json.loads((data_dir / "edges2.json").read_text()).items()
            if n - edges0.get(edge, 0) >= calls
        }  # at least once per call
        return {
            "grid": {
                **profile_breakdown(before, after, calls),
                "calls_per_call": {
                    edge.replace(str(Path.home()), "~"): round(n / calls, 2)
                    for edge, n in sorted(edges.items())
                },
            },
            "client": profile_breakdown({}, client_rows, calls),
        }
    finally:
        grid.terminate()
        grid.wait(15)


def ray_warm(peers_python: str | None, calls: int, runs: int) -> dict[str, Any]:
    if not peers_python:
        return {"skipped": "no --peers-python"}
    best: dict[str, Any] | None = None
    for _ in range(runs):
        done = subprocess.run(
            [peers_python, str(Path(__file__).with_name("peers.py")), str(calls), "1000"],
            capture_output=True,
            text=True,
            check=True,
        )
        ray = json.loads(done.stdout.strip().splitlines()[-1]).get("ray", {})
        if "remote" in ray and (best is None or ray["remote"]["p50_ms"] < best["remote"]["p50_ms"]):
            best = ray
    return best or {"skipped": "ray did not run"}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--serve":
        serve(sys.argv[3:], Path(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument(
        "--runs", type=int, default=3, help="plain phase runs; the best p50 is kept"
    )
    parser.add_argument("--port", type=int, default=8798)
    parser.add_argument("--peers-python")
    parser.add_argument("--sandbox", default="process", choices=["process", "docker"])
    parser.add_argument(
        "--map", type=int, default=0, metavar="N", help="measure one .map() of N calls instead"
    )
    parser.add_argument(
        "--skip-profile", action="store_true", help="only the plain phase (and Ray)"
    )
    parser.add_argument("--top", type=int, default=25, help="functions listed per side")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "profile.json"
    )
    args = parser.parse_args()
    global SANDBOX, MAP, TOP
    SANDBOX, MAP, TOP = args.sandbox, args.map, args.top
    if MAP:
        args.calls = MAP

    load_before = [round(x, 2) for x in os.getloadavg()]
    report: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_before": load_before,
        },
        "sandbox": args.sandbox,
    }
    report["plain"] = plain_phase(args.port, args.calls, args.runs)
    report["ray"] = (
        ray_warm(args.peers_python, args.calls, args.runs)
        if not MAP
        else {"skipped": "--map (bench_embedded.py compares .map() with Ray's)"}
    )
    if "remote" in report["ray"] and not MAP:
        report["remote_p50_ours_over_ray"] = round(
            report["plain"]["remote"]["p50_ms"] / report["ray"]["remote"]["p50_ms"], 2
        )
    if not args.skip_profile:
        profile = profiled_phase(args.port, args.calls)
        cpu = report["plain"]["cpu_us_per_call"]
        for side, label in (("grid", "grid process (controller + worker)"), ("client", "client")):
            shares = profile[side]["share_by_part"]
            profile[side]["us_per_call_by_part"] = {
                part: round(share * cpu[label], 1) for part, share in shares.items()
            }
        report["profile"] = profile
    report["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
