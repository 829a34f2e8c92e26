"""Volumes in AWS mode: kept in S3 (a moto server here), copied onto each worker and synced around calls.

Each worker's copy is a real volume (an ext4 loop mount, as in the embedded grid); "a call" writes into the copy's
directory as a sandbox bound to it would, then ends (``after_call``). What must never happen: a worker reads a stale
file after another's call changed it and ended; a warm copy downloads again what it has; a file a call removed comes
back; another owner names, lists or mounts the volume; the host follows a link a call planted or uploads it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from nanogrid_backend.registry.sqlite import SQLiteRegistry
from nanogrid_backend.sandbox import scratch
from nanogrid_backend.volume_sync import S3Volumes, SyncedVolumes
from nanogrid_backend.volumes import VolumeError, VolumeSet
from tests.aws_cluster import moto_server
from tests.conftest import require

pytestmark = pytest.mark.integration
BUCKET, TABLE = "nanogrid-volumes-test", "nanogrid-volumes-registry"


@pytest.fixture(scope="module")
def s3() -> Iterator[object]:
    """A moto server for S3 and DynamoDB, reached through boto3's default clients (AWS_ENDPOINT_URL)."""
    require(not scratch.unavailable(), f"volumes need loop devices: {scratch.unavailable()}")
    with moto_server():
        import boto3

        from nanogrid_backend.registry.dynamodb import create_table

        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        create_table(TABLE)
        yield client


@pytest.fixture(params=["sqlite", "dynamodb"])
def grid(
    request: pytest.FixtureRequest, s3: object, tmp_path: Path
) -> Iterator[tuple[S3Volumes, SyncedVolumes, SyncedVolumes]]:
    """The controller's view of the volumes and two workers' copies, sharing one registry and one bucket."""
    from nanogrid_backend.registry.dynamodb import DynamoDBRegistry

    registry = (
        SQLiteRegistry(tmp_path / "registry.sqlite3")
        if request.param == "sqlite"
        else DynamoDBRegistry(TABLE)
    )
    home = S3Volumes(s3, BUCKET, registry, max_volume_mib=64, owner_volume_mib=128)
    workers = [
        SyncedVolumes(tmp_path / f"worker-{n}", registry, home, uid=os.getuid()) for n in "ab"
    ]
    try:
        yield home, workers[0], workers[1]
    finally:
        for worker in workers:
            worker.close()
        for record in [r for owner in ("alice", "bob") for r in registry.list_volumes(owner)]:
            home.delete(record["owner"], record["name"])
        registry.close()


def call(
    worker: SyncedVolumes,
    owner: str,
    write: dict[str, bytes] | None = None,
    remove: tuple[str, ...] = (),
    read: tuple[str, ...] = (),
) -> dict[str, bytes | None]:
    """One call that mounts alice's "datasets" at /data: it reads, writes and removes files as a sandbox bound to the
    worker's copy would, then ends."""
    volumes: VolumeSet = worker.attach(
        owner, [{"name": "datasets", "path": "/data", "read_only": False}]
    )
    volumes.hold()
    volumes.before_call()  # as the worker does before each call (agent._volumes_around)
    try:
        root = Path(volumes.mounts[0].source)
        seen = {
            path: (root / path).read_bytes() if (root / path).is_file() else None for path in read
        }
        for path, data in (write or {}).items():
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_bytes(data)
        for path in remove:
            (root / path).unlink()
        return seen
    finally:
        volumes.after_call()
        volumes.release()


def test_a_call_reads_what_was_put_and_what_another_workers_call_wrote(grid, monkeypatch) -> None:
    """Never a stale file after a call that changed it ended; never a second download of what a copy has, nor a
    listing of a volume nobody changed."""
    home, a, b = grid
    listings = []
    listed = home.remote_files
    monkeypatch.setattr(
        home, "remote_files", lambda owner, name: listings.append(name) or listed(owner, name)
    )
    home.create("alice", "datasets", 32)
    (source := Path(a.directory).parent / "train.csv").write_bytes(b"x,y\n1,2\n")
    home.put("alice", "datasets", "raw/train.csv", source)

    assert call(a, "alice", read=("raw/train.csv",)) == {"raw/train.csv": b"x,y\n1,2\n"}
    assert a.downloads == 1 and len(listings) == 1
    assert call(a, "alice", read=("raw/train.csv",)) == {"raw/train.csv": b"x,y\n1,2\n"}
    assert a.downloads == 1, "a warm copy downloaded again what it had"
    assert len(listings) == 1, "a volume nobody changed was listed again"

    call(b, "alice", write={"raw/train.csv": b"x,y\n3,4\n", "results/b.txt": b"from b"})
    assert b.uploads == 2
    assert call(a, "alice", read=("raw/train.csv", "results/b.txt")) == {
        "raw/train.csv": b"x,y\n3,4\n",
        "results/b.txt": b"from b",
    }
    listed = {e["name"]: e for e in home.listdir("alice", "datasets", "results")}
    assert listed["b.txt"]["kind"] == "file" and listed["b.txt"]["size"] == 6
    assert home.get("alice", "datasets")["used_bytes"] == len(b"x,y\n3,4\n") + len(b"from b")


def test_what_a_call_removes_is_gone_everywhere_and_put_or_remove_reach_every_copy(
    grid, tmp_path: Path
) -> None:
    """Never a file a call removed coming back from S3, nor one removed through the API lingering in a copy."""
    home, a, b = grid
    home.create("alice", "datasets", 32)
    call(a, "alice", write={"one.txt": b"1", "two.txt": b"2"})
    assert call(b, "alice", read=("one.txt", "two.txt")) == {"one.txt": b"1", "two.txt": b"2"}

    call(b, "alice", remove=("one.txt",))
    assert [e["name"] for e in home.listdir("alice", "datasets")] == ["two.txt"]
    assert call(a, "alice", read=("one.txt",)) == {"one.txt": None}

    home.remove("alice", "datasets", "two.txt")
    (tmp_path / "three.txt").write_bytes(b"3")
    home.put("alice", "datasets", "three.txt", tmp_path / "three.txt")
    assert call(b, "alice", read=("two.txt", "three.txt")) == {"two.txt": None, "three.txt": b"3"}
    fd, size = home.open_file("alice", "datasets", "three.txt")
    with os.fdopen(fd, "rb") as f:
        assert (f.read(), size) == (b"3", 1)


def test_two_workers_writing_at_once_merge_per_file_and_the_last_upload_of_a_file_wins(
    grid,
) -> None:
    """Never a lost file that only one writer changed; for a file both changed, the one uploaded last is kept."""
    home, a, b = grid
    home.create("alice", "datasets", 32)
    call(a, "alice", write={"shared.txt": b"original"})
    set_a = a.attach("alice", [{"name": "datasets", "path": "/data"}])
    set_b = b.attach("alice", [{"name": "datasets", "path": "/data"}])
    set_a.before_call()
    set_b.before_call()
    root_a, root_b = Path(set_a.mounts[0].source), Path(set_b.mounts[0].source)
    (root_a / "a-only.txt").write_bytes(b"A")
    (root_b / "b-only.txt").write_bytes(b"B")
    (root_a / "shared.txt").write_bytes(b"written by a")
    (root_b / "shared.txt").write_bytes(b"written by b")
    set_a.after_call()
    set_b.after_call()  # ends last: its shared.txt wins
    assert call(a, "alice", read=("a-only.txt", "b-only.txt", "shared.txt")) == {
        "a-only.txt": b"A",
        "b-only.txt": b"B",
        "shared.txt": b"written by b",
    }


def test_a_full_volume_and_another_owner_are_refused(grid, tmp_path: Path) -> None:
    """Never a put past a volume's size; never another owner naming, listing, reading or mounting it."""
    home, a, _ = grid
    home.create("alice", "datasets", 16)
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * (10 << 20))
    home.put("alice", "datasets", "one.bin", big)
    with pytest.raises(VolumeError, match="'datasets' is full") as full:
        home.put("alice", "datasets", "two.bin", big)
    assert full.value.status == 507
    home.put("alice", "datasets", "one.bin", big)  # replacing a file counts its new size only

    for attempt in (
        lambda: home.get("bob", "datasets"),
        lambda: home.listdir("bob", "datasets"),
        lambda: home.open_file("bob", "datasets", "one.bin"),
        lambda: a.attach("bob", [{"name": "datasets", "path": "/data"}]),
    ):
        with pytest.raises(VolumeError) as refused:
            attempt()
        assert refused.value.status == 404
    assert home.list_volumes("bob") == []
    with pytest.raises(VolumeError, match="exists with 16 MiB"):
        home.create("alice", "datasets", 32)
    with pytest.raises(VolumeError, match="do(es)? not fit"):
        home.create("alice", "more", 64)
        home.create("alice", "even-more", 64)


def test_links_and_odd_files_a_call_plants_are_never_uploaded_or_followed(
    grid, tmp_path: Path
) -> None:
    """Never the host reading through a link a call made (to a host file), nor uploading anything but regular
    files."""
    home, a, b = grid
    home.create("alice", "datasets", 32)
    secret = tmp_path / "host-secret.txt"
    secret.write_bytes(b"the host's own file")
    volumes = a.attach("alice", [{"name": "datasets", "path": "/data"}])
    volumes.before_call()
    root = Path(volumes.mounts[0].source)
    (root / "link.txt").symlink_to(secret)
    (root / "dir-link").symlink_to(tmp_path)
    os.mkfifo(root / "pipe")
    (root / "real.txt").write_bytes(b"real")
    volumes.after_call()
    assert sorted(e["name"] for e in home.listdir("alice", "datasets")) == ["real.txt"]
    assert call(b, "alice", read=("link.txt", "real.txt")) == {
        "link.txt": None,
        "real.txt": b"real",
    }


def test_a_volume_made_again_with_another_size_gets_a_new_copy(grid) -> None:
    """Never a worker's copy of a removed volume showing its files in the new volume of the same name."""
    home, a, _ = grid
    home.create("alice", "datasets", 16)
    call(a, "alice", write={"old.txt": b"old"})
    home.delete("alice", "datasets")
    home.create("alice", "datasets", 32)
    volumes = a.attach("alice", [{"name": "datasets", "path": "/data"}])
    volumes.before_call()
    try:
        root = Path(volumes.mounts[0].source)
        assert not (root / "old.txt").exists()
        assert os.statvfs(root).f_blocks * os.statvfs(root).f_frsize > 20 << 20
    finally:
        volumes.after_call()
