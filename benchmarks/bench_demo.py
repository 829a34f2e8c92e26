"""The README's first command from a fresh clone: seconds until `make demo` prints its first result.

    python benchmarks/bench_demo.py [--cold-cache] [--repo .] [--commit HEAD] [--out benchmarks/results/demo.json]

Clones the repository (HEAD by default) into a temp dir and runs `make demo` there as a newcomer would, stamping
each line it prints: the venv, the installs from the lock files, NanoGrid itself, the grid's start and the demo's first
result (`square.remote(7)`). Warm cache by default (pip's and uv's caches as this user has them); `--cold-cache`
gives both an empty cache dir, so every wheel comes over the network.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The first line that shows each phase has begun: what make echoes before a step, then what the demo prints.
PHASES = [
    ("venv", "-m venv"),
    ("uv", "-r requirements-uv.txt"),
    ("install", "--require-hashes -r requirements"),
    ("nanogrid_editable", "-e ."),
    ("demo_command", "/bin/nanogrid demo"),
    ("grid_start", "Starting an embedded grid"),
    ("grid_up", "  http"),
    ("first_result", "   -> "),
]


def run_demo(
    clone: Path, env: dict[str, str], timeout_s: float
) -> tuple[list[tuple[float, str]], int]:
    """Every line `make demo` prints, with its seconds since the start, and make's exit status."""
    started = time.monotonic()
    proc = subprocess.Popen(
        ["make", "demo"],
        cwd=clone,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a timeout stops make, pip and the demo's grid together
    )
    assert proc.stdout is not None
    lines = []
    try:
        for line in proc.stdout:
            lines.append((round(time.monotonic() - started, 3), line.rstrip("\n")))
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"make demo ran past {timeout_s:.0f} s")
        return lines, proc.wait(timeout_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)


def phases(lines: list[tuple[float, str]]) -> dict[str, float]:
    """Seconds from the start at which each phase began (the first line that shows it)."""
    found: dict[str, float] = {}
    for at, line in lines:
        for name, marker in PHASES:
            if name not in found and marker in line:
                found[name] = at
                break
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=ROOT, help="the repository to clone")
    parser.add_argument(
        "--commit", default="HEAD", help="the commit to check out (an earlier one: A/B)"
    )
    parser.add_argument(
        "--cold-cache", action="store_true", help="empty pip and uv caches: every wheel downloaded"
    )
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "demo.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="nanogrid-bench-demo-"))
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # the demo's lines as it prints them, not at exit
    for name in ("VIRTUAL_ENV", "UV_PYTHON", "MAKEFLAGS", "MAKELEVEL"):
        env.pop(name, None)  # a newcomer's shell: no venv of this checkout active, not inside make
    if args.cold_cache:
        env["PIP_CACHE_DIR"] = str(work / "pip-cache")
        env["UV_CACHE_DIR"] = str(work / "uv-cache")
    load_before = [round(x, 2) for x in os.getloadavg()]  # a shared machine's other work shows here
    try:
        clone = work / "nanogrid"
        subprocess.run(["git", "clone", "-q", str(args.repo), str(clone)], check=True)
        subprocess.run(["git", "checkout", "-q", args.commit], cwd=clone, check=True)
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=clone,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        lines, status = run_demo(clone, env, args.timeout)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    began = phases(lines)
    order = [name for name, _ in PHASES if name in began] + ["end"]
    ends = {**began, "end": lines[-1][0] if lines else 0.0}
    output = [f"{at:7.2f}  {line}" for at, line in lines]
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average_before": load_before,
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "commit": commit,
        "cache": "cold" if args.cold_cache else "warm",
        "make_status": status,
        "first_result_s": began.get("first_result"),
        "total_s": ends["end"],
        # how long each phase took, up to the next one's first line
        "phase_s": {a: round(ends[b] - ends[a], 2) for a, b in itertools.pairwise(order)},
        "output": output,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "output"}, indent=2))
    if status != 0 or "first_result" not in began:
        print("\n".join(output[-20:]), file=sys.stderr)
        sys.exit(f"make demo failed (status {status}) before its first result")


if __name__ == "__main__":
    main()
