"""How fast a grid serves again after a fault ends (target: within 5 s, without a restart where none is needed).

    python -m benchmarks.bench_faults [--out benchmarks/results/faults.json] [--sandboxes process,docker]

Each figure is the time from the end of the fault to the first call that comes back right:
  idle_sandboxes_killed  every sandbox of the grid killed while idle (SIGKILL / `docker rm -f`), then a call
  sigstop                `nanogrid up` stopped with SIGSTOP for 3 s, then SIGCONT, then calls until one answers
  kill_9_restart         `nanogrid up` killed with SIGKILL, started again, calls until one answers (includes start)
  disk_full              a 20 MiB tmpfs data dir filled by another file, the file deleted, then a call
  kill_9_restart_95_percent_full   kill_9_restart with the data dir on a disk of its own that is 95 % full
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import nanogrid
from tests.conftest import start_grid
from tests.test_faults import GridProcess, kill_sandboxes


@nanogrid.remote(timeout=30)
def echo(x):
    return x


def until_served(call: Callable[[], object], limit_s: float = 120.0) -> float:
    """Seconds until ``call()`` returns without an error (errors while the grid recovers are expected)."""
    started = time.monotonic()
    while True:
        try:
            call()
            return time.monotonic() - started
        except nanogrid.NanoGridError:
            if time.monotonic() - started > limit_s:
                raise
            time.sleep(0.05)


def idle_sandboxes_killed(kind: str, work: Path) -> dict:
    grid = start_grid(
        work / f"idle-{kind}", sandbox=kind, workers=2, stem_cells=1, kill_grace_s=0.5
    )
    try:
        nanogrid.connect(grid.url, api_key=grid.api_key, timeout=10)
        echo.remote(0)
        warm = min(_timed(lambda: echo.remote(1)) for _ in range(20))
        killed = kill_sandboxes(work / f"idle-{kind}", kind)
        return {
            "sandboxes_killed": killed,
            "recovery_s": round(until_served(lambda: echo.remote(2)), 4),
            "warm_call_s": round(warm, 4),
        }
    finally:
        grid.stop()


def sigstop(work: Path) -> dict:
    grid = GridProcess(work / "sigstop", "process", workers=2)
    try:
        grid.connect(timeout=2)
        echo.remote(0)
        os.kill(grid.proc.pid, signal.SIGSTOP)
        time.sleep(3)
        os.kill(grid.proc.pid, signal.SIGCONT)
        return {"stopped_s": 3, "recovery_s": round(until_served(lambda: echo.remote(1)), 4)}
    finally:
        grid.stop()


def kill_9_restart(kind: str, work: Path) -> dict:
    data_dir = work / f"restart-{kind}"
    data_dir.mkdir()
    grid = GridProcess(data_dir, kind, workers=1)
    grid.connect(timeout=10)
    echo.remote(0)
    grid.kill()
    started = time.monotonic()
    grid = GridProcess(data_dir, kind, workers=1)
    try:
        up = time.monotonic() - started
        grid.connect(timeout=10)
        first = until_served(lambda: echo.remote(1))
        return {"process_up_s": round(up, 4), "recovery_s": round(up + first, 4)}
    finally:
        grid.stop()


def disk_full(work: Path) -> dict | None:
    mount = work / "small"
    mount.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)]
        ).returncode
    ):
        return None
    grid = start_grid(mount / "data", sandbox="process", workers=1, stem_cells=1, kill_grace_s=0.5)
    try:
        nanogrid.connect(grid.url, api_key=grid.api_key, timeout=10)
        echo.remote(0)
        filler = mount / "filler"
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
            except OSError:
                pass
        try:
            echo.remote(1)
        except nanogrid.NanoGridError:
            pass
        filler.unlink()
        return {"recovery_s": round(until_served(lambda: echo.remote(2)), 4)}
    finally:
        grid.stop()
        subprocess.run(["umount", "-l", str(mount)], check=False)


def kill_9_restart_on_a_nearly_full_disk(
    kind: str, work: Path, size_gib: int = 252, full: float = 0.95
) -> dict | None:
    """``kill_9_restart`` with the data dir on a disk of its own that is ``full`` full (a sparse ext4 image, filled
    with fallocate: the host's disk is not used up): the restart must write nothing it cannot do without."""
    if os.geteuid() != 0:
        return None
    image, mount = work / f"nearly-full-{kind}.img", work / f"nearly-full-{kind}"
    mount.mkdir()
    with open(image, "wb") as f:
        f.truncate(size_gib << 30)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    try:
        stats = os.statvfs(mount)
        total = stats.f_blocks * stats.f_frsize
        filler = int(total * full) - (total - stats.f_bavail * stats.f_frsize)
        subprocess.run(["fallocate", "-l", str(filler), str(mount / "filler")], check=True)
        stats = os.statvfs(mount)
        used = 1 - stats.f_bavail / stats.f_blocks
        figures = kill_9_restart(kind, mount)
        return {**figures, "disk_gib": size_gib, "used_share": round(used, 4)}
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
        image.unlink(missing_ok=True)


def _timed(call: Callable[[], object]) -> float:
    started = time.monotonic()
    call()
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/faults.json"))
    parser.add_argument("--sandboxes", default="process,docker")
    args = parser.parse_args()
    kinds = args.sandboxes.split(",")
    figures: dict = {"machine": platform.node(), "cpus": os.cpu_count(), "target_s": 5.0}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        figures["idle_sandboxes_killed"] = {
            kind: idle_sandboxes_killed(kind, work) for kind in kinds
        }
        figures["sigstop"] = sigstop(work)
        figures["kill_9_restart"] = {kind: kill_9_restart(kind, work) for kind in kinds}
        figures["disk_full"] = disk_full(work)
        figures["kill_9_restart_95_percent_full"] = {
            kind: kill_9_restart_on_a_nearly_full_disk(kind, work) for kind in kinds
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
