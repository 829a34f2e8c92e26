"""What a job id's form costs the registry as it grows: wholly random ids against time-ordered ones, in turns.

    python -m benchmarks.bench_registry_ids [--jobs 100000] [--batch 50] [--rounds 2]
                                            [--out benchmarks/results/registry-ids.json]

Each round writes ``--jobs`` jobs into a new registry (``SQLiteRegistry`` in a temp dir) the way a worker records a
``.map()``: a batch is created, marked running and finished, one transaction each, ``--batch`` jobs at a time.
The two id forms take turns (random, ordered, random, ordered...), so drift on a shared machine reaches both.
Measured per 5,000 jobs: this process's CPU time per job (the registry's own work: no HTTP, no sandbox), so a
registry whose cost grows with its size shows as a rising line. ``random`` is ``job-`` and 32 random hex digits
(the form before); ``ordered`` is ``nanogrid_backend.models.new_job_id`` (milliseconds first, as UUIDv7).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.peers import machine  # noqa: E402
from nanogrid_backend.models import COMPLETED, JobRecord, new_job_id  # noqa: E402
from nanogrid_backend.registry.sqlite import SQLiteRegistry  # noqa: E402

BLOCK = 5000  # jobs per measured block


def random_job_id() -> str:
    return "job-" + os.urandom(16).hex()


FORMS: dict[str, Callable[[], str]] = {"random": random_job_id, "ordered": new_job_id}


def one_round(make_id: Callable[[], str], jobs: int, batch: int) -> dict:
    """CPU µs per job in each block of ``BLOCK`` jobs, and the registry's size at the end."""
    directory = Path(tempfile.mkdtemp(prefix="nanogrid-ids-"))
    try:
        registry = SQLiteRegistry(directory / "registry.sqlite3")
        blocks: list[float] = []
        cpu = time.process_time()
        for start in range(0, jobs, batch):
            now = time.time()
            records = [
                JobRecord(
                    job_id=make_id(),
                    function_id="fn-0123456789abcdef01234567",
                    payload=b"\x80\x05" * 30,
                    created_at=now,
                    owner="local",
                )
                for _ in range(batch)
            ]
            registry.create_jobs(records)
            registry.mark_running_many([job.job_id for job in records], "worker-1", now)
            for job in records:
                job.status, job.result_format, job.result = COMPLETED, "pickle", b"\x80\x05K\x01."
                job.finished_at, job.execution_time_ms = time.time(), 0.01
            registry.finish_jobs(records)
            if (start + batch) % BLOCK == 0:
                spent = time.process_time()
                blocks.append(round((spent - cpu) / BLOCK * 1e6, 1))
                cpu = spent
        registry.close()
        size = sum(path.stat().st_size for path in directory.iterdir())
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return {"cpu_us_per_job_each_block": blocks, "registry_mib": round(size / (1 << 20), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument(
        "--batch", type=int, default=50, help="jobs per transaction (a worker's batch)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each form, in turns")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/registry-ids.json"))
    args = parser.parse_args()
    if args.jobs % BLOCK or BLOCK % args.batch:
        parser.error(f"--jobs must be a multiple of {BLOCK}, and {BLOCK} of --batch")
    runs: dict[str, list[dict]] = {form: [] for form in FORMS}
    load_before = os.getloadavg()
    for _ in range(args.rounds):
        for form, make_id in FORMS.items():
            run = one_round(make_id, args.jobs, args.batch)
            runs[form].append(run)
            blocks = run["cpu_us_per_job_each_block"]
            print(
                f"{form:8} first {blocks[0]:6.1f} µs/job   last {blocks[-1]:6.1f}   {blocks}",
                flush=True,
            )
    summary = {}
    for form, rounds in runs.items():
        # per block position, the median over rounds; then the first two blocks against the last five
        blocks = zip(*(r["cpu_us_per_job_each_block"] for r in rounds), strict=True)
        per_block = [statistics.median(block) for block in blocks]
        early, late = statistics.mean(per_block[:2]), statistics.mean(per_block[-5:])
        summary[form] = {
            "cpu_us_per_job_first_10k": round(early, 1),
            "cpu_us_per_job_last_25k": round(late, 1),
            "late_vs_early": round(late / early, 3),
        }
    result = {
        "machine": machine([round(x, 2) for x in load_before]),
        "jobs": args.jobs,
        "batch": args.batch,
        "summary": summary,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
