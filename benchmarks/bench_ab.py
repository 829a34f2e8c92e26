"""Two versions of NanoGrid side by side: the warm ``.remote()`` of a base commit against the working tree's,
measured in turns, so the machine's drift (other tenants, CPU frequency, a loaded neighbour) falls on both alike.

    python benchmarks/bench_ab.py [--base HEAD] [--sandbox process] [--rounds 10] [--calls 300]
                                  [--map 2000] [--out benchmarks/results/ab.json]

The base is exported with ``git archive`` into a temporary directory (nothing of the checkout changes). Each side
gets its own ``nanogrid up`` and its own client process, both running that side's code; the rounds alternate
which side goes first. Reported per side: p50 and p99 over all rounds, each round's p50, and the CPU per call of
the client and of the grid process with its sandboxes. ``--map N``: each turn is one ``.map()`` of N calls
instead, reported as calls per second (the median of the rounds). A single run of another benchmark on this
machine varied by 30 % from one minute to the next (benchmarks/bench_profile.py: 1.31 and 1.73 ms p50 for the
same tree); the turns are what makes a 5 % change visible.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_profile import cpu_seconds  # noqa: E402
from benchmarks.peers import machine  # noqa: E402

MAP = 0  # --map


def client_main(url: str, key: str) -> None:
    """A side's client (run with that side's code on ``sys.path``): ``N`` on stdin runs N warm calls and answers
    one JSON line with their latencies and the client's CPU; ``map N`` runs one ``.map()`` of N calls."""
    import nanogrid

    nanogrid.connect(url, api_key=key)

    @nanogrid.remote
    def noop(x: int) -> int:
        return x

    for _ in range(300):  # warm: the sandbox is up, the connection open
        noop.remote(1)
    print(json.dumps({"ready": True}), flush=True)
    list(noop.map(range(500), progress=False))  # timed as short: its calls go in batches
    for line in sys.stdin:
        words = line.split()
        n = int(words[-1])
        samples = []
        cpu = time.process_time()
        if words[0] == "map":
            started = time.perf_counter()
            assert list(noop.map(range(n), progress=False)) == list(range(n))
            samples.append((time.perf_counter() - started) / n)  # seconds per call
        for _ in range(n if words[0] != "map" else 0):
            started = time.perf_counter()
            noop.remote(1)
            samples.append(time.perf_counter() - started)
        cpu = time.process_time() - cpu
        print(json.dumps({"samples": samples, "cpu_s": cpu}), flush=True)


class Side:
    def __init__(self, name: str, tree: Path, port: int, sandbox: str) -> None:
        self.name, self.tree = name, tree
        self.data_dir = Path(tempfile.mkdtemp(prefix=f"nanogrid-ab-{name}-"))
        env = {**os.environ, "PYTHONPATH": str(tree)}
        self.env = env
        self.grid = subprocess.Popen(
            [sys.executable, "-m", "nanogrid.cli", "up", "--port", str(port)]
            + ["--data-dir", str(self.data_dir), "--sandbox", sandbox],
            cwd=tree,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"http://127.0.0.1:{port}"
        self.samples: list[float] = []
        self.round_p50_ms: list[float] = []
        self.client_cpu_s = self.grid_cpu_s = 0.0
        self.calls = 0
        self.client: subprocess.Popen | None = None

    def start_client(self) -> None:
        import httpx

        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{self.url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self.grid.poll() is not None:
                raise RuntimeError(f"the {self.name} grid did not start (data dir {self.data_dir})")
            time.sleep(0.1)
        key = (self.data_dir / "local-key").read_text().strip()
        self.client = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--client", self.url, key],
            cwd=self.tree,
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert json.loads(self._line())["ready"]

    def _line(self) -> str:
        assert self.client is not None and self.client.stdout is not None
        line = self.client.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} client ended")
        return line

    def run(self, calls: int, map_calls: int = 0) -> None:
        assert self.client is not None and self.client.stdin is not None

        def grid_cpu() -> float:  # the grid process's and its sandboxes'
            return sum(cpu_seconds(self.grid.pid))

        before = grid_cpu()
        self.client.stdin.write(f"map {map_calls}\n" if map_calls else f"{calls}\n")
        self.client.stdin.flush()
        answer = json.loads(self._line())
        self.grid_cpu_s += grid_cpu() - before
        self.client_cpu_s += answer["cpu_s"]
        self.calls += map_calls or calls
        self.samples += answer["samples"]
        self.round_p50_ms.append(round(_pick(answer["samples"], 0.5) * 1000, 3))

    def report(self) -> dict[str, Any]:
        n = self.calls
        if MAP:  # one sample per round: its seconds per call
            return {
                "map_calls_per_s": round(1 / _pick(self.samples, 0.5), 1),
                "round_calls_per_s": [round(1 / s, 1) for s in self.samples],
                "cpu_us_per_call": {
                    "client": round(self.client_cpu_s / n * 1e6, 1),
                    "grid and sandboxes": round(self.grid_cpu_s / n * 1e6, 1),
                },
            }
        return {
            "p50_ms": round(_pick(self.samples, 0.5) * 1000, 3),
            "p99_ms": round(_pick(self.samples, 0.99) * 1000, 3),
            "calls": n,
            "round_p50_ms": self.round_p50_ms,
            "cpu_us_per_call": {
                "client": round(self.client_cpu_s / n * 1e6, 1),
                "grid and sandboxes": round(self.grid_cpu_s / n * 1e6, 1),
            },
        }

    def stop(self) -> None:
        for proc in (self.client, self.grid):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def _pick(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def export(ref: str) -> tuple[Path, str]:
    """The commit's tree in a temporary directory, and its full hash."""
    commit = subprocess.run(
        ["git", "rev-parse", ref], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    tree = Path(tempfile.mkdtemp(prefix=f"nanogrid-ab-{commit[:8]}-"))
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree, commit


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--client":
        client_main(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--base", default="HEAD", help="the commit to compare the working tree with"
    )
    parser.add_argument("--sandbox", default="process", choices=["process", "docker"])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=300, help="warm calls per side per round")
    parser.add_argument(
        "--map", type=int, default=0, metavar="N", help="a .map() of N calls per turn"
    )
    parser.add_argument("--port", type=int, default=8830, help="the base's; the tree's is the next")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ab.json")
    args = parser.parse_args()
    global MAP
    MAP = args.map

    base_tree, commit = export(args.base)
    sides = [
        Side("base", base_tree, args.port, args.sandbox),
        Side("tree", ROOT, args.port + 1, args.sandbox),
    ]
    load_before = [round(x, 2) for x in os.getloadavg()]
    try:
        for side in sides:
            side.start_client()
        for round_number in range(args.rounds):
            for side in sides if round_number % 2 == 0 else sides[::-1]:
                side.run(args.calls, args.map)
        base, tree = (side.report() for side in sides)
    finally:
        for side in sides:
            side.stop()
        shutil.rmtree(base_tree, ignore_errors=True)
    report = {
        "machine": machine(load_before),
        "sandbox": args.sandbox,
        "base": {"commit": commit, **base},
        "tree": tree,
    }
    if MAP:
        report["tree_over_base_calls_per_s"] = round(
            tree["map_calls_per_s"] / base["map_calls_per_s"], 3
        )
        report["rounds_tree_faster"] = sum(
            t > b for t, b in zip(tree["round_calls_per_s"], base["round_calls_per_s"], strict=True)
        )
    else:
        report["tree_over_base_p50"] = round(tree["p50_ms"] / base["p50_ms"], 3)
        report["rounds_tree_faster"] = sum(
            t < b for t, b in zip(tree["round_p50_ms"], base["round_p50_ms"], strict=True)
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
