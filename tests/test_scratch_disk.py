"""Each Docker sandbox's own disk (/tmp, working and output files): sized by ``disk=``, not counted against memory.

What must never happen: a file the function writes is charged to its memory limit (so it dies of
OutOfMemory for writing a file), one sandbox filling its disk takes space from another sandbox or the
host, a full disk surfaces as anything but ``OutOfDisk``, or a crashed grid leaves disks mounted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import nanogrid
from nanogrid_backend.sandbox import scratch
from tests.conftest import require

pytestmark = pytest.mark.integration

MiB = 1 << 20


@pytest.fixture()
def client(docker_grid) -> nanogrid.Client:
    problem = getattr(docker_grid.grid.factory, "scratch_problem", "not a Docker grid")
    require(problem == "", f"sandboxes have no disk of their own here: {problem}")
    return nanogrid.connect(docker_grid.url, api_key=docker_grid.api_key)


@nanogrid.remote(timeout=30)
def healthy(x):
    return x + 1


def test_files_larger_than_the_memory_limit_fit_on_the_disk(client):
    @nanogrid.remote(memory=256, disk=2048, timeout=180)
    def write_big(tmp_mib, output_mib):
        import os

        import nanogrid

        block = os.urandom(1 << 20)
        for path, mib in (
            ("/tmp/scratch.bin", tmp_mib),
            (nanogrid.output_dir() / "result.bin", output_mib),
        ):
            with open(path, "wb") as f:
                for _ in range(mib):
                    f.write(block)
        return os.path.getsize("/tmp/scratch.bin")

    job = write_big.spawn(700, 300)  # 1000 MiB written with 256 MiB of memory
    assert job.result(timeout=180) == 700 * MiB
    (output,) = job.outputs
    assert output.name == "result.bin" and output.size == 300 * MiB
    assert job.peak_memory_bytes is not None and job.peak_memory_bytes <= 256 * MiB


def test_a_full_disk_is_out_of_disk_and_the_next_call_serves(client):
    @nanogrid.remote(memory=256, disk=64, timeout=60)
    def fill():
        block = b"x" * (1 << 20)
        with open("/tmp/fill.bin", "wb") as f:
            for _ in range(200):
                f.write(block)

    with pytest.raises(nanogrid.OutOfDisk) as info:
        fill.remote()
    assert isinstance(info.value, OSError)  # `except OSError` still catches it
    assert "64 MiB" in str(info.value) and "disk=" in str(info.value)
    assert info.value.__cause__ is not None and "fill" in str(
        info.value.__cause__
    )  # where it happened
    assert healthy.remote(1) == 2


def test_one_sandbox_filling_its_disk_leaves_others_their_space(client):
    @nanogrid.remote(disk=64, timeout=60)
    def hog():
        block = b"x" * (1 << 20)
        try:
            with open("/tmp/hog.bin", "wb") as f:
                for _ in range(200):
                    f.write(block)
        except OSError:
            pass
        import shutil

        return shutil.disk_usage("/tmp").free

    @nanogrid.remote(timeout=60)
    def neighbour():
        import shutil

        with open("/tmp/mine.bin", "wb") as f:
            f.write(b"y" * (200 << 20))
        return shutil.disk_usage("/tmp").total

    assert hog.remote() < 1 * MiB  # its own disk is full ...
    assert (
        neighbour.remote() >= 900 * MiB
    )  # ... and the neighbour has the grid's default 1 GiB to itself


def test_the_disk_is_the_sandboxs_own_nosuid_nodev_noexec_filesystem(client):
    @nanogrid.remote(timeout=30)
    def mounts():
        found = {}
        for line in open("/proc/self/mountinfo"):
            fields = line.split()
            if fields[4] in ("/tmp", "/sandbox"):
                found[fields[4]] = (fields[3], fields[5], fields[fields.index("-") + 1])
        return found

    found = mounts.remote()
    assert set(found) == {"/tmp", "/sandbox"}
    for root, options, fstype in found.values():
        assert fstype == "ext4" and root in (
            "/tmp",
            "/work",
        )  # a directory of its own disk, no host path
        assert {"nosuid", "nodev", "noexec"} <= set(options.split(",")), options


def test_disk_is_checked_at_the_call_site_and_by_the_grid(client, docker_grid):
    with pytest.raises(nanogrid.InvalidArgument, match="disk is a whole number of MiB"):
        nanogrid.remote(disk="10GB")  # type: ignore[arg-type]

    @nanogrid.remote(disk=docker_grid.config.max_disk_mib + 1)
    def too_big():
        return 1

    with pytest.raises(nanogrid.APIError, match="disk must be 16"):
        too_big.remote()


def test_disks_left_by_a_crashed_grid_are_unmounted_and_detached(tmp_path: Path):
    require(scratch.unavailable() == "", f"no scratch disks here: {scratch.unavailable()}")
    left = tmp_path / "sandboxes" / "ctr-000000000000"
    left.mkdir(parents=True)
    disk = scratch.ScratchDisk(left, 32)  # never closed: the grid died
    (Path(disk.tmp_dir) / "file").write_bytes(b"left behind")
    assert scratch.mounted_under(tmp_path) == [str(disk.mountpoint)]

    assert scratch.sweep(tmp_path / "sandboxes") == 2  # one mount, one loop device
    assert scratch.mounted_under(tmp_path) == []
    attached = subprocess.run(
        ["losetup", "--list", "--noheadings", "--output", "BACK-FILE"],
        capture_output=True,
        text=True,
    ).stdout
    assert str(tmp_path) not in attached
    shutil.rmtree(left)  # what the grid's start does next (leftovers.remove_dirs)


def test_without_loop_devices_scratch_falls_back_to_memory_and_says_so(
    tmp_path: Path, monkeypatch, caplog
):
    from tests.conftest import require_docker, start_grid

    require_docker()
    monkeypatch.setattr(scratch, "probe", lambda directory: "no loop devices (/dev/loop-control)")
    embedded = start_grid(tmp_path, sandbox="docker", stem_cells=0)
    try:
        assert "memory-backed scratch: no loop devices" in embedded.grid.describe_sandbox()
        assert "memory-backed" in caplog.text and "no loop devices" in caplog.text
        nanogrid.connect(embedded.url, api_key=embedded.api_key)

        @nanogrid.remote(timeout=30)
        def tmp_filesystem():
            return [
                line.split()[-3]
                for line in open("/proc/self/mountinfo")
                if line.split()[4] == "/tmp"
            ]

        assert tmp_filesystem.remote() == ["tmpfs"]
    finally:
        embedded.stop()


def test_a_blob_for_a_sandbox_whose_disk_is_full_comes_over_the_channel(client):
    """Large arguments are written into the sandbox's disk by the host; with no room there they still arrive."""

    @nanogrid.remote(memory=256, disk=64, timeout=60)
    def fill_then_read(data, fill):
        import os

        if fill:
            block = b"x" * (1 << 20)
            try:
                with open("/tmp/keep.bin", "ab") as f:
                    while True:
                        f.write(block)
            except OSError:
                pass
        return len(data), data[:3], os.path.exists("/tmp/keep.bin")

    assert fill_then_read.remote(b"abc" * 300_000, True) == (
        900_000,
        b"abc",
        True,
    )  # inline: under 1 MiB
    big = os.urandom(5 << 20)  # a blob, and the disk has no room left for it
    assert fill_then_read.remote(big, False) == (5 << 20, big[:3], True)


def test_sandbox_disks_never_promise_more_than_the_hosts_free_space(tmp_path: Path, monkeypatch):
    """Never: sandbox disks that, filled together, would fill the host's disk (they are sparse files)."""
    require(scratch.unavailable() == "", f"no scratch disks here: {scratch.unavailable()}")
    room = scratch.DiskRoom(tmp_path, reserve=64 << 20)
    real = scratch.shutil.disk_usage
    monkeypatch.setattr(
        scratch.shutil, "disk_usage", lambda path: real(path)._replace(free=200 << 20)
    )
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    first = room.make(tmp_path / "a", 100)
    with pytest.raises(scratch.ScratchError, match="200 MiB free: too little for another 100 MiB"):
        room.make(
            tmp_path / "b", 100
        )  # 100 MiB it may still fill + 100 MiB + the reserve > 200 MiB
    first.close()
    room.make(tmp_path / "b", 100).close()  # its room is free again


def test_a_sandbox_the_hosts_disk_has_no_room_for_fails_its_call_clearly(client, docker_grid):
    room = docker_grid.grid.factory.disk_room
    saved = room.reserve
    room.reserve = scratch.shutil.disk_usage(
        room.directory
    ).free  # as if the host's disk were nearly full

    @nanogrid.remote(disk=100, timeout=60)
    def small_disk():
        return "ran"

    try:
        with pytest.raises(
            nanogrid.JobFailed, match="no room for a 100 MiB sandbox disk now: ask for a smaller"
        ):
            small_disk.remote()
    finally:
        room.reserve = saved
    assert small_disk.remote() == "ran"
    assert healthy.remote(1) == 2


@pytest.fixture()
def tenants(tmp_path: Path):
    """A Docker grid of its own with two owners, alice and bob, and no stem cells (only calls make disks)."""
    from nanogrid_backend.keys import create_key
    from tests.conftest import require_docker, start_grid

    require_docker()
    require(scratch.unavailable() == "", f"no scratch disks here: {scratch.unavailable()}")
    embedded = start_grid(
        tmp_path / "data", sandbox="docker", stem_cells=0, workers=1, pool_cap=4, idle_ttl_s=600
    )
    try:
        keys = {name: create_key(embedded.grid.registry, name)[0] for name in ("alice", "bob")}
        yield embedded, keys
    finally:
        embedded.stop()


def sized(disk_mib: int, name: str):
    """A function with a ``disk_mib`` disk that returns its disk's size (no packages: the plain runtime)."""

    def size():
        import shutil

        return shutil.disk_usage("/tmp").total

    size.__name__ = size.__qualname__ = name
    return nanogrid.remote(disk=disk_mib, timeout=120, environment=nanogrid.Environment())(size)


def test_idle_sandboxes_give_their_disk_room_to_any_tenants_call(tenants):
    """Never: a call refused for want of disk room that idle sandboxes (another tenant's, here) hold in promises."""
    embedded, keys = tenants
    room, pool = embedded.grid.factory.disk_room, embedded.grid.pool
    nanogrid.connect(embedded.url, api_key=keys["alice"])
    assert (
        sized(200, "alices").remote() >= 180 * MiB
    )  # its sandbox stays idle, holding 200 MiB of room
    assert pool.snapshot()["idle"] == 1
    # As if the host's disk had room for 150 MiB more of sandbox disks, beside what they may still fill.
    room.reserve = scratch.shutil.disk_usage(room.directory).free - room.promised() - 150 * MiB

    nanogrid.connect(embedded.url, api_key=keys["bob"])
    assert sized(200, "bobs").remote() >= 180 * MiB  # alice's idle sandbox made room
    assert pool.snapshot()["idle_by_function"] and len(pool.snapshot()["idle_by_function"]) == 1


def test_a_refused_disk_says_what_the_tenant_can_do_and_evicts_nobody(tenants):
    """Never: a refusal that tells a tenant the host's free disk, or idle sandboxes stopped for a call that still
    could not get its disk."""
    embedded, keys = tenants
    room, pool = embedded.grid.factory.disk_room, embedded.grid.pool
    nanogrid.connect(embedded.url, api_key=keys["alice"])
    assert sized(100, "small").remote() >= 85 * MiB
    room.reserve = scratch.shutil.disk_usage(room.directory).free - room.promised() - 150 * MiB
    nanogrid.connect(embedded.url, api_key=keys["bob"])
    with pytest.raises(nanogrid.JobFailed) as refused:
        sized(2048, "huge").remote()  # even with alice's idle sandbox gone, 2 GiB does not fit
    message = str(refused.value)
    assert (
        refused.value.kind == "storage" and "ask for a smaller one (@remote(disk=MiB))" in message
    ), message
    assert "MiB free" not in message and str(room.directory) not in message, message
    assert pool.snapshot()["idle"] == 1  # alice's sandbox was not stopped for nothing
