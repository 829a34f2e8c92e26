"""What stands between a running grid and serving calls, said once to the operator and by ``/health``.

A grid starts whenever its data is intact, even on a full disk, so that its operator can see and fix what
is wrong; it then says what does not work instead of failing every call in silence. ``/health`` needs no
key, so what it says names no number of the host (free space is for ``nanogrid up`` and ``nanogrid doctor``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from nanogrid_backend.sandbox.scratch import HOST_RESERVE_BYTES

if TYPE_CHECKING:
    from nanogrid_backend.grid import Grid


def problems(grid: Grid, for_operator: bool = False) -> list[str]:
    """Why calls fail now (empty: none known); ``for_operator`` adds the host's numbers."""
    found = []
    if grid.registry.disk_full():
        found.append(
            "the grid's data disk is full: no call can be recorded until its operator frees space"
        )
    short = grid.factory.disk_shortfall() if grid.factory is not None else None
    disks = short is not None  # sandboxes with disks of their own
    if short:
        found.append(
            f"sandboxes cannot start: {short}"
            if for_operator
            else "sandboxes cannot start: the worker's disk has too little free space for a sandbox disk"
        )
    elif (
        grid.pool is not None
        and grid.pool.problem
        and not (disks and grid.pool.problem_kind == "storage")
    ):
        # (disk room idle sandboxes hold is theirs to give: calls still start)
        found.append(grid.pool.problem)
    return found


def space_needed(sandbox_disk_mib: int) -> int:
    """Free bytes a grid needs on its data disk to run calls: the reserve for its own data and one sandbox disk."""
    return HOST_RESERVE_BYTES + (sandbox_disk_mib << 20)


def space_report(data_dir: Path, sandbox_disk_mib: int) -> tuple[bool, str]:
    """(enough, one line) on the data disk's free space against what the grid needs (``nanogrid doctor``)."""
    probe = data_dir if data_dir.exists() else data_dir.parent
    free, need = shutil.disk_usage(probe).free, space_needed(sandbox_disk_mib)
    line = (
        f"{free / (1 << 30):.1f} GiB free on the data disk; the grid needs {need / (1 << 30):.1f} GiB "
        f"({HOST_RESERVE_BYTES >> 20} MiB kept for its own data + a {sandbox_disk_mib} MiB sandbox disk)"
    )
    return free >= need, line
