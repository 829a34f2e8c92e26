"""Volumes from the user's and the attacker's side.

What must never happen: another owner naming, listing, reading, writing, removing or mounting your volume; the host
following a link a sandbox planted on a volume (reading or overwriting a host file through it); a write to a
read-only mount; a full volume failing a call without saying which volume; a sandbox with volumes serving a function
without them; a volume lost between calls or removed while a sandbox has it mounted.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import nanogrid
from nanogrid.function import RemoteFunction
from nanogrid_backend.embedded import EmbeddedGrid
from nanogrid_backend.keys import create_key

pytestmark = pytest.mark.integration


def on(client: nanogrid.Client, **options: Any):  # noqa: ANN201
    """@remote with an explicit client (one per owner in these tests)."""
    return lambda fn: RemoteFunction(fn, client=client, **options)


@pytest.fixture(params=["process", "docker"])
def embedded(request: pytest.FixtureRequest) -> EmbeddedGrid:
    grid: EmbeddedGrid = request.getfixturevalue(
        "grid" if request.param == "process" else "docker_grid"
    )
    if grid.grid.volumes.problem:
        pytest.skip(f"no volumes here: {grid.grid.volumes.problem}")
    return grid


def owner(embedded: EmbeddedGrid, name: str, **limits: int) -> nanogrid.Client:
    key, _ = create_key(embedded.grid.registry, name, **limits)  # type: ignore[arg-type]
    return nanogrid.Client(
        embedded.url, api_key=key
    )  # not connect(): that closes the default client


def test_mount_paths_and_names_are_refused_before_anything_is_sent() -> None:
    """A volume never hides the sandbox's own directories, and a bad name or path never reaches the grid."""
    volume = nanogrid.Volume("data")
    for path in ("/tmp", "/sandbox/x", "/usr", "data", "/data/../etc", "/"):
        with pytest.raises(nanogrid.InvalidArgument):
            nanogrid.remote(volumes={path: volume})(lambda: 1)
    with pytest.raises(nanogrid.InvalidArgument):
        nanogrid.remote(volumes={"/a": volume, "/a/b": volume})(lambda: 1)
    with pytest.raises(nanogrid.InvalidArgument):
        nanogrid.remote(volumes={"/a": "data"})(lambda: 1)  # type: ignore[dict-item]
    for name in ("../x", "", "a/b", ".hidden", "x" * 64):
        with pytest.raises(nanogrid.InvalidArgument):
            nanogrid.Volume(name)
    with pytest.raises(nanogrid.InvalidArgument):
        volume.put(__file__, "../escape")


def test_files_outlive_calls_and_every_sandbox_sees_the_same_volume(
    embedded: EmbeddedGrid, tmp_path: Path
) -> None:
    """What the client puts, a function reads; what a function writes, the next call and the client see."""
    client = owner(embedded, f"vol-user-{embedded.grid.factory.kind}")  # type: ignore[union-attr]
    vol = nanogrid.Volume("datasets", size_mib=64, client=client)
    source = tmp_path / "train.csv"
    source.write_bytes(b"a,b\n1,2\n" * 1000)
    assert vol.put(source, "raw/train.csv") == source.stat().st_size

    @on(client, volumes={"/data": vol})
    def count_and_note(n: int) -> int:
        with open(f"/data/notes/{n}.txt", "w") as f:
            f.write(f"call {n}")
        return len(open("/data/raw/train.csv", "rb").read())

    (tmp_path / "empty").write_bytes(b"")  # a put makes the directories above the file
    vol.put(tmp_path / "empty", "notes/0.txt")
    assert count_and_note.remote(1) == source.stat().st_size
    assert count_and_note.remote(2) == source.stat().st_size
    assert vol.read("notes/1.txt") == b"call 1" and vol.read("notes/2.txt") == b"call 2"
    assert [e["name"] for e in vol.listdir("notes")] == ["0.txt", "1.txt", "2.txt"]
    target = tmp_path / "back.csv"
    assert (
        vol.get("raw/train.csv", target) == source.stat().st_size
        and target.read_bytes() == source.read_bytes()
    )

    @on(client, volumes={"/data": nanogrid.Volume("datasets", read_only=True, client=client)})
    def try_write() -> str:
        try:
            open("/data/raw/train.csv", "w").write("overwritten")
        except OSError as exc:
            return type(exc).__name__
        return "written"

    assert try_write.remote() in ("OSError", "PermissionError")  # EROFS
    assert vol.read("raw/train.csv") == source.read_bytes()

    @on(client)
    def sees_data() -> bool:
        return os.path.exists("/data/raw")

    assert (
        sees_data.remote() is False
    )  # a function without the volume never gets a sandbox that has it

    vol.remove("notes")
    assert [e["name"] for e in vol.listdir("/")] == ["raw"]
    assert [v["name"] for v in nanogrid.volumes(client)] == ["datasets"]


def test_another_owner_can_never_reach_a_volume(embedded: EmbeddedGrid, tmp_path: Path) -> None:
    """A second key cannot list, read, write, remove, delete or mount the first owner's volume; its own volume of the
    same name is a different, empty one."""
    kind = embedded.grid.factory.kind  # type: ignore[union-attr]
    alice, mallory = owner(embedded, f"vol-alice-{kind}"), owner(embedded, f"vol-mallory-{kind}")
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"alice's data")
    nanogrid.Volume("private", size_mib=32, client=alice).put(secret, "secret.txt")

    assert nanogrid.volumes(mallory) == []
    theirs = nanogrid.Volume("private", client=mallory)
    theirs._made = True  # as if made: every route must refuse on its own
    for attempt in (
        lambda: theirs.read("secret.txt"),
        lambda: theirs.listdir("/"),
        lambda: theirs.info(),
        lambda: theirs.remove("secret.txt"),
        lambda: theirs.put(secret, "planted.txt"),
        lambda: theirs.get("secret.txt", tmp_path / "stolen"),
        lambda: theirs.delete(),
    ):
        with pytest.raises(nanogrid.APIError) as refused:
            attempt()
        assert refused.value.status == 404

    @on(
        mallory, volumes={"/data": theirs}
    )  # not made by the client: the worker itself must refuse to mount it
    def steal() -> list:
        import os

        return os.listdir("/data")

    theirs._made = True  # (delete() above forgot it)
    with pytest.raises(nanogrid.JobFailed) as failed:
        steal.remote()
    assert "you do not have" in str(failed.value)

    mine = nanogrid.Volume("private", size_mib=16, client=mallory)
    mine.ensure()
    assert steal.remote() == []  # their own, empty volume of that name
    assert nanogrid.Volume("private", client=alice).read("secret.txt") == b"alice's data"
    assert [e["name"] for e in nanogrid.Volume("private", client=alice).listdir("/")] == [
        "secret.txt"
    ]


def test_links_a_sandbox_plants_are_never_followed_by_the_host(
    docker_grid: EmbeddedGrid, tmp_path: Path
) -> None:
    """A link on the volume to a host file is neither read nor written through by get, put, listdir or remove."""
    client = owner(docker_grid, "vol-links")
    host_file = tmp_path / "host-secret.txt"
    host_file.write_bytes(b"host only")
    vol = nanogrid.Volume("links", size_mib=16, client=client)
    vol.ensure()

    @on(client, volumes={"/data": vol})
    def plant(target: str, directory: str) -> None:
        import os

        os.symlink(target, "/data/evil")
        os.symlink(directory, "/data/evildir")

    plant.remote(str(host_file), str(tmp_path))
    with pytest.raises(nanogrid.APIError) as refused:
        vol.read("evil")
    assert refused.value.status == 409
    with pytest.raises(nanogrid.APIError) as refused:
        vol.read("evildir/host-secret.txt")
    assert refused.value.status == 409
    with pytest.raises(nanogrid.APIError):
        vol.put(host_file, "evildir/written.txt")
    assert not (tmp_path / "written.txt").exists()
    replacement = tmp_path / "replacement.txt"
    replacement.write_bytes(b"replaced the link")
    vol.put(replacement, "evil")  # the link is replaced by a file, not written through
    assert host_file.read_bytes() == b"host only"
    assert vol.read("evil") == b"replaced the link"
    assert {e["name"]: e["kind"] for e in vol.listdir("/")} == {"evil": "file", "evildir": "link"}
    vol.remove("evildir")
    assert tmp_path.is_dir() and host_file.exists()


def test_a_full_volume_is_named_in_the_error(embedded: EmbeddedGrid, tmp_path: Path) -> None:
    """Filling a volume fails the call with OutOfDisk naming the volume; an upload that does not fit is refused
    (507) naming it, and leaves nothing half-written."""
    kind = embedded.grid.factory.kind  # type: ignore[union-attr]
    client = owner(embedded, f"vol-full-{kind}")
    vol = nanogrid.Volume("small", size_mib=16, client=client)

    @on(client, volumes={"/small": vol})
    def fill() -> None:
        with open("/small/big.bin", "wb") as f:
            while True:
                f.write(b"\0" * (1 << 20))

    with pytest.raises(nanogrid.OutOfDisk) as full:
        fill.remote()
    assert "'small'" in str(full.value)
    vol.remove("big.bin")
    big = tmp_path / "big.bin"
    with big.open("wb") as f:
        f.truncate(32 << 20)
    with pytest.raises(nanogrid.APIError) as refused:
        vol.put(big, "big.bin")
    assert refused.value.status == 507 and "'small'" in refused.value.detail
    assert vol.listdir("/") == []


def test_quotas_and_removal(embedded: EmbeddedGrid, monkeypatch: pytest.MonkeyPatch) -> None:
    """An owner's volumes never exceed the owner's quota; a volume keeps its size; a volume is never removed from
    under a running call (idle sandboxes holding it are stopped instead)."""
    kind = embedded.grid.factory.kind  # type: ignore[union-attr]
    client = owner(embedded, f"vol-quota-{kind}")
    monkeypatch.setattr(
        embedded.grid.volumes, "owner_volume_mib", 48
    )  # the grid's owner_volume_mib setting
    nanogrid.Volume("one", size_mib=32, client=client).ensure()
    with pytest.raises(nanogrid.APIError) as refused:
        nanogrid.Volume("two", size_mib=32, client=client).ensure()
    assert refused.value.status == 413
    with pytest.raises(nanogrid.APIError) as refused:
        nanogrid.Volume("one", size_mib=64, client=client).ensure()
    assert refused.value.status == 409
    vol = nanogrid.Volume("one", client=client)

    @on(client, volumes={"/one": vol})
    def touch() -> None:
        open("/one/x", "w").close()

    touch.remote()  # its sandbox stays warm, with the volume mounted: deleting stops it

    @on(client, volumes={"/one": vol}, timeout=60)
    def hold(seconds: float) -> None:
        import time

        open("/one/started", "w").close()
        time.sleep(seconds)

    running = hold.spawn(5)
    while "started" not in [
        e["name"] for e in vol.listdir("/")
    ]:  # a running call is never stopped under its feet
        assert not running.done
    with pytest.raises(nanogrid.APIError) as refused:
        vol.delete()
    assert refused.value.status == 409
    running.result(timeout=60)
    assert [e["name"] for e in vol.listdir("/")] == ["started", "x"]
    vol.delete()
    assert nanogrid.volumes(client) == []


def test_a_cell_mounts_a_volume_with_the_magic(grid: EmbeddedGrid, tmp_path: Path) -> None:
    """`%%nanogrid --volume NAME:/PATH` gives the cell the owner's volume, and `:ro` keeps it read-only."""
    import IPython
    from IPython.testing.globalipapp import start_ipython

    if grid.grid.volumes.problem:
        pytest.skip(f"no volumes here: {grid.grid.volumes.problem}")
    shell = start_ipython() or IPython.get_ipython()
    shell.run_line_magic("load_ext", "nanogrid")
    shell.run_line_magic("nanogrid", f"connect {grid.url} {grid.api_key}")
    source = tmp_path / "cell.txt"
    source.write_text("for the cell")
    nanogrid.Volume("cells", size_mib=16, client=nanogrid.get_client()).put(source, "cell.txt")
    assert (
        shell.run_cell_magic(
            "nanogrid", "--volume cells:/data", "text = open('/data/cell.txt').read()\ntext\n"
        )
        == "for the cell"
    )
    assert shell.user_ns["text"] == "for the cell"
    cell = "import os\ntry:\n    open('/data/new.txt', 'w')\n    ok = True\nexcept OSError:\n    ok = False\nok\n"
    assert shell.run_cell_magic("nanogrid", "--volume cells:/data:ro", cell) is False
    with pytest.raises(nanogrid.InvalidArgument):
        shell.run_cell_magic("nanogrid", "--volume cells:/tmp", "1\n")


def test_the_cli_manages_volumes(grid: EmbeddedGrid, tmp_path: Path) -> None:
    """`nanogrid volumes ...` makes, fills, lists, reads and removes a volume; a name you do not have exits 1."""
    import subprocess
    import sys

    if grid.grid.volumes.problem:
        pytest.skip(f"no volumes here: {grid.grid.volumes.problem}")
    key, _ = create_key(grid.grid.registry, "vol-cli")
    env = {**os.environ, "NANOGRID_URL": grid.url, "NANOGRID_API_KEY": key}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "nanogrid.cli", "volumes", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    (tmp_path / "f.txt").write_text("cli")
    assert cli("create", "tools", "--size", "16").returncode == 0
    assert cli("put", "tools", str(tmp_path / "f.txt"), "dir/f.txt").returncode == 0
    assert "f.txt" in cli("ls", "tools", "dir").stdout
    assert cli("get", "tools", "dir/f.txt", str(tmp_path / "back.txt")).returncode == 0
    assert (tmp_path / "back.txt").read_text() == "cli"
    assert "tools" in cli("list").stdout
    assert cli("rm", "tools", "dir").returncode == 0
    assert cli("delete", "tools").returncode == 0
    missing = cli("ls", "tools")
    assert missing.returncode == 1 and "no volume 'tools'" in missing.stderr


def test_a_stem_cell_given_a_volume_lets_go_of_every_mount_when_it_stops(
    docker_grid: EmbeddedGrid,
) -> None:
    """A sandbox that had a volume bound at /data itself leaves no mount behind once stopped (and its directory is
    removed without ever walking into the volume)."""
    client = owner(docker_grid, "vol-stem")
    vol = nanogrid.Volume("stem", size_mib=16, client=client)

    @on(client, volumes={"/data": vol})
    def keep() -> str:
        open("/data/kept.txt", "w").write("kept")
        return "ok"

    job = keep.spawn()
    assert job.result(timeout=60) == "ok"
    sandboxes = docker_grid.config.data_dir / "sandboxes"
    assert any(
        line.split()[4].startswith(str(sandboxes / job.sandbox_id))
        for line in open("/proc/self/mountinfo")
    )
    assert docker_grid.grid.pool is not None
    idle = docker_grid.grid.pool._remove_idle(job.sandbox_id)  # as the idle TTL would stop it
    assert idle is not None
    idle.close()
    assert not [
        line
        for line in open("/proc/self/mountinfo")
        if str(sandboxes / job.sandbox_id) in line.split()[4]
    ]
    assert not (sandboxes / job.sandbox_id).exists()
    assert vol.read("kept.txt") == b"kept"
    vol.delete()


def test_two_sandboxes_mounting_a_volume_at_once_see_each_others_writes(tmp_path: Path) -> None:
    """Two calls running at the same time in two sandboxes share the volume live: what one writes, the other reads
    while both run (no commit, no reload). A grid of its own, so that both of its slots are free."""
    from tests.conftest import start_grid

    embedded = start_grid(tmp_path / "grid", workers=2, owner_max_concurrency=2)
    try:
        if embedded.grid.volumes.problem:
            pytest.skip(f"no volumes here: {embedded.grid.volumes.problem}")
        client = nanogrid.Client(embedded.url, api_key=embedded.api_key)
        vol = nanogrid.Volume("live", size_mib=16, client=client)

        def meet(me: str, other: str) -> str:
            import os
            import time

            with open(f"/data/.{me}", "w") as f:
                f.write(me)
            os.rename(f"/data/.{me}", f"/data/{me}")  # published whole
            deadline = time.monotonic() + 30
            while not os.path.exists(f"/data/{other}"):
                if time.monotonic() > deadline:
                    return "never saw " + other
                time.sleep(0.05)
            return open(f"/data/{other}").read()

        first = on(client, volumes={"/data": vol}, timeout=60, name="meet_a")(meet).spawn("a", "b")
        second = on(client, volumes={"/data": vol}, timeout=60, name="meet_b")(meet).spawn("b", "a")
        assert (first.result(timeout=60), second.result(timeout=60)) == ("b", "a")
        assert first.sandbox_id != second.sandbox_id
    finally:
        embedded.stop()


def test_volumes_and_sandbox_disks_share_the_host_disk_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both are sparse files that may still grow: never a sandbox disk given room a volume may still fill, nor a
    volume made in room the sandbox disks may still fill (together they could fill the host's disk)."""
    from nanogrid_backend.registry.sqlite import SQLiteRegistry
    from nanogrid_backend.sandbox import scratch
    from nanogrid_backend.volumes import VolumeError, VolumeStore
    from tests.conftest import require, tmpfs

    require(not scratch.unavailable(), f"volumes need loop devices: {scratch.unavailable()}")
    monkeypatch.setattr(scratch, "HOST_RESERVE_BYTES", 16 << 20)
    with tmpfs(tmp_path / "disk", 320) as disk:
        registry = SQLiteRegistry(tmp_path / "registry.sqlite3")
        room = scratch.DiskRoom(disk / "sandboxes", reserve=16 << 20)
        for directory in ("one", "two"):
            (disk / "sandboxes" / directory).mkdir(parents=True)
        volumes = VolumeStore(disk / "volumes", registry, uid=os.getuid())
        room.also_promised, volumes.also_promised = volumes.promised, room.promised
        made: list[scratch.ScratchDisk] = []
        try:
            volumes.create("alice", "big", 200)
            with pytest.raises(scratch.ScratchError, match="volumes may still fill"):
                made.append(room.make(disk / "sandboxes" / "one", 120))
            made.append(room.make(disk / "sandboxes" / "two", 60))  # 200 + 60 + 16 of 320 MiB: fits
            with pytest.raises(VolumeError, match="no room for a 64 MiB volume") as refused:
                volumes.create("alice", "more", 64)
            assert refused.value.status == 507
        finally:
            for scratch_disk in made:
                scratch_disk.close()
            volumes.close()
            registry.close()
