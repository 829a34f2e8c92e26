"""What finding a ``%%nanogrid`` cell's changes costs, as a share of the cell's round trip.

    python benchmarks/bench_cell_state.py [--mib 50] [--runs 5] [--sandbox process] [--out FILE.json]

A notebook namespace of about ``--mib`` MiB (a numpy array, a bytearray, a list of floats, a dict)
is read by a cell that changes one small entry. Round trip: the magic's call in an IPython shell,
from pickling the names to the names being back in the notebook. State diff: the time the sandbox
spends hashing every input's pickle before and after the cell and comparing (reported by the cell
itself), plus the notebook's own scan for other names of a changed object. Target: <= 10 %.
The grid's payload cap is raised for the run, since the default (16 MiB) is below the namespace.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def namespace(mib: int) -> dict[str, object]:
    import numpy as np

    quarter = (mib << 20) // 4
    return {
        "matrix": np.random.default_rng(1).random(2 * quarter // 8),
        "raw": bytearray(quarter),
        "readings": [float(i) for i in range(quarter // 9)],
        "meta": {"runs": 0, "names": [str(i) for i in range(1000)]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mib", type=int, default=50)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sandbox", default="process", choices=["process", "docker"])
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "cell_state.json"
    )
    args = parser.parse_args()

    from IPython.core.magic_arguments import parse_argstring
    from IPython.testing.globalipapp import start_ipython

    import nanogrid.magics.cell as cell
    from nanogrid.cell_state import pack_state
    from nanogrid.magics import NanoGridMagics
    from nanogrid_backend.config import GridConfig
    from nanogrid_backend.embedded import EmbeddedGrid

    limit = 1 << 30
    with tempfile.TemporaryDirectory() as data_dir:
        config = GridConfig.load(
            data_dir=Path(data_dir), port=0, sandbox=args.sandbox, max_payload_bytes=limit
        )
        with EmbeddedGrid(config) as grid:
            ip = start_ipython()
            ip.run_line_magic("load_ext", "nanogrid")
            ip.run_line_magic("nanogrid", f"connect {grid.url} {grid.api_key}")
            ip.user_ns.update(namespace(args.mib))
            size = len(
                pack_state(
                    [(k, ip.user_ns[k]) for k in ("matrix", "raw", "readings", "meta")], ip.user_ns
                ).data
            )
            body = "meta['runs'] += 1\nlen(readings) + len(raw) + matrix.size\n"
            options = parse_argstring(
                NanoGridMagics.nanogrid, "--memory 2048 --timeout 300 --name cell-state-bench"
            )
            trips, diffs = [], []
            for _ in range(args.runs + 1):  # the first call warms the sandbox
                started = time.perf_counter()
                job = cell.start(ip, body, options)
                outcome = job.outcome()
                trips.append(time.perf_counter() - started)
                diffs.append(outcome.diff_ms / 1000)
    trips, diffs = trips[1:], diffs[1:]
    shares = [d / t for d, t in zip(diffs, trips, strict=True)]
    result = {
        "benchmark": "cell_state",
        "sandbox": args.sandbox,
        "namespace_pickled_mib": round(size / (1 << 20), 1),
        "runs": args.runs,
        "round_trip_ms_median": round(statistics.median(trips) * 1000, 1),
        "state_diff_ms_median": round(statistics.median(diffs) * 1000, 1),
        "state_diff_share_median": round(statistics.median(shares), 4),
        "target_share": 0.10,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
