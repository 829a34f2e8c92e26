"""Where a warm ``.remote()`` call's wall time goes, hop by hop: the critical path from the client's call to its
answer, with the time between hops (a thread waking, a process answering) that a CPU profile does not show.

    python benchmarks/bench_path.py [--calls 2000] [--sandbox process] [--out benchmarks/results/path.json]

The grid runs as ``nanogrid up`` with a few of its functions wrapped to note the monotonic clock as each call
passes (``--serve``); the client notes its own. Both read ``CLOCK_MONOTONIC``, so their notes line up. Calls go
one after another, so the n-th note of each kind belongs to the n-th call. Reported: each hop's median and p90 in
microseconds, and their sum against the median round trip. The wrappers cost ~1 µs each, ten per call.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.peers import machine  # noqa: E402

# (note, the hop that ends with it), in the order a call passes them
HOPS = [
    ("client call", ""),
    ("request read", "client: arguments pickled, request sent; grid: request read"),
    ("queued", "grid loop: checked, recorded, queued"),
    ("taken", "worker thread woken with the call"),
    ("marked running", "registry: marked running"),
    ("sent to sandbox", "pool, call frame written"),
    ("reply read", "sandbox: ran the call and answered"),
    ("recorded", "worker: reply checked, outcome recorded"),
    ("loop resumed", "event loop woken with the outcome"),
    ("answered", "grid loop: answer made and written"),
    ("client result", "client: answer read, result unpickled"),
]


def serve(notes_path: Path, argv: list[str]) -> None:
    """``nanogrid up`` with the grid's hops noted; SIGUSR1 writes the notes so far."""
    from nanogrid_backend.controller import fast_run, jobs
    from nanogrid_backend.queue.local import LocalQueue
    from nanogrid_backend.registry.sqlite import SQLiteRegistry
    from nanogrid_backend.sandbox.base import Sandbox

    notes: dict[str, list[int]] = {name: [] for name, _ in HOPS}
    clock = time.perf_counter_ns

    def after(owner: Any, name: str, note: str, when: Any = None) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            if when is None or when(result):
                notes[note].append(clock())
            return result

        setattr(owner, name, wrapped)

    def after_async(owner: Any, name: str, note: str, before: str | None = None) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        async def wrapped(*args: Any, **kwargs: Any) -> Any:
            if before is not None:
                notes[before].append(clock())
            result = await original(*args, **kwargs)
            notes[note].append(clock())
            return result

        setattr(owner, name, wrapped)

    original_accept = fast_run.FastRun._accept

    def accept(self: Any, scope: Any, body: bytes) -> Any:
        notes["request read"].append(clock())
        return original_accept(self, scope, body)

    fast_run.FastRun._accept = accept  # type: ignore[method-assign]
    after_async(jobs, "submit_from_loop", "queued")
    after(LocalQueue, "get_batch", "taken", when=lambda got: bool(got))
    after(SQLiteRegistry, "mark_running", "marked running")
    original_answer = Sandbox._answer

    def answer(self: Any, *args: Any, **kwargs: Any) -> Any:
        notes["sent to sandbox"].append(clock())
        result = original_answer(self, *args, **kwargs)
        notes["reply read"].append(clock())
        return result

    Sandbox._answer = answer  # type: ignore[method-assign]
    after(SQLiteRegistry, "finish_job", "recorded")
    after_async(jobs, "until_finished", "loop resumed")
    after_async(fast_run, "_send_json", "answered")

    def write(*_: Any) -> None:
        notes_path.write_text(json.dumps(notes))

    signal.signal(signal.SIGUSR1, write)
    from nanogrid.cli import main as cli_main

    cli_main(argv)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--serve":
        serve(Path(sys.argv[2]), sys.argv[3:])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--port", type=int, default=8797)
    parser.add_argument("--sandbox", default="process", choices=["process", "docker"])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "path.json")
    args = parser.parse_args()

    import httpx

    import nanogrid

    data_dir = Path(tempfile.mkdtemp(prefix="nanogrid-path-"))
    notes_path = data_dir / "notes.json"
    up = ["up", "--port", str(args.port), "--data-dir", str(data_dir), "--sandbox", args.sandbox]
    grid = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(notes_path), *up],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    load_before = [round(x, 2) for x in os.getloadavg()]
    try:
        url = f"http://127.0.0.1:{args.port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("nanogrid up did not answer within 90 s")
            time.sleep(0.1)
        nanogrid.connect(url, api_key=(data_dir / "local-key").read_text().strip())

        @nanogrid.remote
        def noop(x: int) -> int:
            return x

        for _ in range(300):  # warm
            noop.remote(1)
        time.sleep(0.2)  # the last call's notes after its answer went out
        grid.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        skip = {name: len(v) for name, v in json.loads(notes_path.read_text()).items()}
        starts, ends = [], []
        for _ in range(args.calls):
            starts.append(time.perf_counter_ns())
            noop.remote(1)
            ends.append(time.perf_counter_ns())
        time.sleep(0.2)
        grid.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        notes = {name: v[skip[name] :] for name, v in json.loads(notes_path.read_text()).items()}
    finally:
        grid.terminate()
        grid.wait(15)
    notes["client call"], notes["client result"] = starts, ends
    counts = {name: len(notes[name]) for name, _ in HOPS}
    if len(set(counts.values())) != 1:
        raise RuntimeError(f"the hops were not all noted once per call: {counts}")

    def stats(values: list[float]) -> dict[str, float]:
        ordered = sorted(values)
        return {
            "p50_us": round(ordered[len(ordered) // 2], 1),
            "p90_us": round(ordered[int(len(ordered) * 0.9)], 1),
        }

    hops = {}
    for (previous, _), (name, what) in zip(HOPS, HOPS[1:], strict=False):
        hops[what] = stats(
            [(b - a) / 1000 for a, b in zip(notes[previous], notes[name], strict=True)]
        )
    round_trip = stats([(b - a) / 1000 for a, b in zip(starts, ends, strict=True)])
    report = {
        "machine": machine(load_before),
        "sandbox": args.sandbox,
        "calls": args.calls,
        "round_trip": round_trip,
        "hops": hops,
        "sum_of_hop_medians_us": round(sum(h["p50_us"] for h in hops.values()), 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
