"""Schedule lateness on an idle grid: from each due time to its firing, and to its run starting in a sandbox.

    python benchmarks/bench_schedules.py [--sandbox process|docker] [--period 2] [--firings 10]

A ``Period(seconds=2)`` function runs on its own; each firing records its due time and when the scheduler
claimed it (``fired_at``), and its job when a worker took it (``started_at``). The target: every firing
within 1 s of its due time. Writes JSON to benchmarks/results/schedules-<sandbox>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import nanogrid
from nanogrid_backend.config import GridConfig
from nanogrid_backend.embedded import EmbeddedGrid

TARGET_S = 1.0


def summary(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {
        "min_s": round(values[0], 4),
        "p50_s": round(statistics.median(values), 4),
        "p90_s": round(values[max(0, int(len(values) * 0.9) - 1)], 4),
        "max_s": round(values[-1], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sandbox", default="process", choices=["process", "docker"])
    parser.add_argument("--period", type=float, default=2.0)
    parser.add_argument("--firings", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = GridConfig.load(data_dir=Path(tmp), port=0, sandbox=args.sandbox, stem_cells=1)
        with EmbeddedGrid(config) as grid:
            client = nanogrid.connect(grid.url, api_key=grid.api_key)

            @nanogrid.remote(schedule=nanogrid.Period(seconds=args.period))
            def tick():
                return None

            tick.deploy()
            deadline = time.monotonic() + args.period * (args.firings + 5) + 30
            info = tick.schedule_info()
            assert info is not None
            firings: list[dict] = []
            while len(firings) < args.firings and time.monotonic() < deadline:
                time.sleep(args.period / 2)
                firings = [f for f in reversed(info.refresh().firings) if f["job_id"]]
            info.remove()
            runs = [client.status(f["job_id"], wait=30) for f in firings[: args.firings]]
    fired = [f["lateness_s"] for f in firings[: args.firings]]
    started = [
        run["started_at"] - f["due_time"]
        for run, f in zip(runs, firings, strict=False)
        if run["started_at"]
    ]
    result = {
        "sandbox": args.sandbox,
        "period_s": args.period,
        "firings": len(fired),
        "target_s": TARGET_S,
        "fired_after_due": summary(fired),
        "run_started_after_due": summary(started),
        "within_target": sum(v <= TARGET_S for v in fired),
        "outcomes": sorted({f["outcome"] for f in firings}),
    }
    out = Path(__file__).parent / "results" / f"schedules-{args.sandbox}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
