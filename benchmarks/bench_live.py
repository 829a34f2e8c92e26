"""Live output latency: from a line printed in the sandbox to the same line in the caller's hands.

    python benchmarks/bench_live.py [--sandbox process|docker] [--lines 20]

The function prints its own clock with each line (the sandbox shares the host's clock, Docker
included); the caller follows the job with ``Job.stream()`` and notes when each line arrives.
Writes JSON to benchmarks/results/live-<sandbox>.json.
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sandbox", default="process", choices=["process", "docker"])
    parser.add_argument("--lines", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = GridConfig.load(data_dir=Path(tmp), port=0, sandbox=args.sandbox, stem_cells=1)
        with EmbeddedGrid(config) as grid:
            nanogrid.connect(grid.url, api_key=grid.api_key)

            @nanogrid.remote(timeout=120)
            def ticker(lines):
                import time

                for _ in range(lines):
                    print(f"tick {time.time():.6f}")
                    time.sleep(0.25)

            ticker.remote(1)  # warm
            delays = []
            for _, text in ticker.spawn(args.lines).stream(poll_s=1.0):
                arrived = time.time()
                delays += [
                    arrived - float(line.split()[1])
                    for line in text.splitlines()
                    if line.startswith("tick")
                ]
    delays.sort()
    result = {
        "sandbox": args.sandbox,
        "lines": len(delays),
        "p50_s": round(statistics.median(delays), 4),
        "p95_s": round(delays[int(len(delays) * 0.95) - 1], 4),
        "max_s": round(delays[-1], 4),
        "target_s": 0.5,
    }
    out = Path(__file__).parent / "results" / f"live-{args.sandbox}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
