"""Many owners on one grid, tried from a hostile or greedy owner's side: private data at rest, disk quotas and
retention, fair turns and concurrency caps, and views that show nobody another owner's ids."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from nanogrid_backend.keys import create_key
from nanogrid_backend.models import JobMessage
from nanogrid_backend.queue.local import LocalQueue
from nanogrid_backend.retention import Janitor
from nanogrid_backend.store.base import QuotaExceeded
from nanogrid_backend.store.local import LocalStore
from nanogrid_backend.store.s3 import S3Store
from tests.aws_cluster import moto_server
from tests.conftest import start_grid

MiB = 1 << 20

SLEEPY = b"""import time


def handler(event, context):
    time.sleep(event["seconds"])
    return event.get("tag")
"""

QUICK = b"""def handler(event, context):
    return event["tag"]
"""

WRITER = b"""import os


def handler(event, context):
    out = os.environ["NANOGRID_OUTPUT_DIR"]
    os.makedirs(os.path.join(out, "sub"), exist_ok=True)
    for name, size in event["files"].items():
        with open(os.path.join(out, name), "wb") as f:
            if event.get("sparse"):
                f.truncate(size)
            else:
                f.write(b"x" * size)
    return sorted(event["files"])
"""


def message(owner: str, n: int) -> JobMessage:
    return JobMessage(f"job-{owner}-{n}", "fn-x", "json", b"null", 10.0, 128, owner=owner)


# --- fair turns and caps, on the queue itself ---------------------------------------------------------------------


def test_one_owners_backlog_never_delays_another_owner_by_more_than_one_turn():
    """Must never happen: an owner's single call waiting behind another owner's backlog of a thousand."""
    queue = LocalQueue()
    queue.put([message("alice", n) for n in range(1000)])
    queue.put([message("bob", 0)])
    queue.put([message("carol", 0), message("carol", 1)])
    served = [queue.get(timeout=0).job_id for _ in range(6)]
    assert served == [
        "job-alice-0",
        "job-bob-0",
        "job-carol-0",
        "job-alice-1",
        "job-carol-1",
        "job-alice-2",
    ]
    assert queue.depth() == 997 and queue.depth_of("alice") == 997 and queue.depth_of("bob") == 0


def test_an_owner_at_its_cap_is_passed_over_until_one_of_its_calls_ends():
    """Must never happen: an owner holding more slots than its cap, even when it alone has work queued."""
    queue = LocalQueue(limit=lambda owner: 2 if owner == "alice" else None)
    queue.put([message("alice", n) for n in range(5)])
    first, second = queue.get(timeout=0), queue.get(timeout=0)
    assert (
        queue.get(timeout=0.05) is None
    )  # alice has 2 out: her third waits although slots are idle
    queue.put([message("bob", 0)])
    assert queue.get(timeout=0).job_id == "job-bob-0"  # another owner is served meanwhile
    queue.ack(first)
    assert queue.get(timeout=0).job_id == "job-alice-2"
    queue.ack(first)  # a second ack of the same message frees nothing more
    assert queue.get(timeout=0.05) is None and queue.running_of("alice") == 2
    queue.ack(second)
    assert queue.get(timeout=0).job_id == "job-alice-3"


def test_cancelled_calls_leave_the_queue_at_once_and_the_turns_stay_fair():
    """Must never happen: an owner's cancelled backlog still counted as waiting, still holding payload memory,
    or taken by workers one cap-turn at a time while another owner waits."""
    queue = LocalQueue(load_payload=lambda job_id: b"null", memory_budget_bytes=len(b"null") * 3)
    queue.put(
        [message("alice", n) for n in range(6)]
    )  # the last three are kept on disk, over the budget
    queue.put([message("bob", 0)])  # on disk too
    queue.discard({f"job-alice-{n}" for n in range(1, 6)} | {"job-unknown"})
    assert (
        queue.depth() == 2 and queue.depth_of("alice") == 1 and queue.held_bytes() == len(b"null")
    )
    assert [queue.get(timeout=0).job_id for _ in range(2)] == ["job-alice-0", "job-bob-0"]
    assert queue.get(timeout=0.05) is None and queue.depth() == 0
    queue.put([message("alice", 9)])
    assert queue.get(timeout=0).job_id == "job-alice-9"


def test_a_batch_is_one_turn_and_one_place_of_the_cap():
    """Must never happen: a batch of one owner's calls taking more than its turn, holding more than one place of
    its cap, mixing in another function's or owner's calls, or freeing its place before its last call is done."""
    queue = LocalQueue(limit=lambda owner: 1 if owner == "alice" else None)
    queue.put([message("alice", n) for n in range(8)])
    queue.put([JobMessage("job-alice-other", "fn-y", "json", b"null", 10.0, 128, owner="alice")])
    queue.put([message("alice", 99), message("bob", 0)])
    asked = []

    def most(first: JobMessage, queued: int) -> int:
        asked.append((first.job_id, queued))
        return 5

    batch = queue.get_batch(0, most)
    assert [m.job_id for m in batch] == [f"job-alice-{n}" for n in range(5)]
    assert asked == [("job-alice-0", 9)]  # what she still has queued behind the first
    assert (
        queue.depth_of("alice") == 5 and queue.running_of("alice") == 1
    )  # five calls, one place of her cap
    assert [m.job_id for m in queue.get_batch(0, most)] == [
        "job-bob-0"
    ]  # alice is at her cap: bob's turn
    assert queue.get_batch(0.05, most) == []
    for taken in batch[:4]:
        queue.ack(taken)
    assert queue.get_batch(0.05, most) == []  # one call of her batch is still out
    queue.ack(batch[4])
    assert [m.job_id for m in queue.get_batch(0, most)] == [
        "job-alice-5",
        "job-alice-6",
        "job-alice-7",
    ]
    assert (
        queue.get_batch(0.05, most) == []
    )  # at her cap again; her other function's call waits its turn


def test_a_batch_ends_at_another_function_and_at_payloads_kept_on_disk():
    """A batch holds only calls of its first call's function, in queue order; arguments kept on disk are read back
    one call at a time, never several at once."""
    queue = LocalQueue(load_payload=lambda job_id: b"null", memory_budget_bytes=len(b"null") * 4)
    queue.put(
        [
            message("alice", 0),
            message("alice", 1),
            JobMessage("job-alice-y", "fn-y", "json", b"null", 10.0, 128, owner="alice"),
            message("alice", 2),
            message("alice", 3),
            message("alice", 4),
            message("alice", 5),
        ]
    )
    take = lambda: [m.job_id for m in queue.get_batch(0, lambda first, queued: 10)]  # noqa: E731
    assert take() == ["job-alice-0", "job-alice-1"]
    assert take() == ["job-alice-y"]
    assert take() == ["job-alice-2"]  # 3, 4 and 5 are over the memory budget: kept on disk
    assert take() == ["job-alice-3"] and take() == ["job-alice-4"]
    assert queue.depth() == 1 and queue.held_bytes() == 0
    big = LocalQueue()  # a batch's arguments travel in one frame: they add up to a bounded size
    big.put(
        [
            JobMessage(f"job-big-{n}", "fn-x", "json", b"x" * (400 << 10), 10.0, 128, owner="alice")
            for n in range(5)
        ]
    )
    assert [m.job_id for m in big.get_batch(0, lambda first, queued: 10)] == [
        "job-big-0",
        "job-big-1",
        "job-big-2",
    ]


# --- disk quotas and retention, on the store itself ---------------------------------------------------------------


def output_file(tmp_path: Path, name: str, size: int, sparse: bool = False) -> Path:
    path = tmp_path / "sandbox-out" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        if sparse:
            f.truncate(size)
        else:
            f.write(b"x" * size)
    return path


def test_outputs_over_the_owners_quota_fail_the_call_and_keep_none_of_its_files(tmp_path):
    """Must never happen: an owner storing more than its quota, or a refused call leaving half its files."""
    store = LocalStore(tmp_path / "store", quota=lambda owner: MiB if owner == "alice" else None)
    assert (
        store.save_output(
            "job-1", "a.bin", output_file(tmp_path, "a.bin", 600 << 10), owner="alice"
        )
        == 600 << 10
    )
    assert store.save_output(
        "job-2", "b.bin", output_file(tmp_path, "b.bin", 300 << 10), owner="alice"
    )
    with pytest.raises(QuotaExceeded) as refused:
        store.save_output(
            "job-2", "sub/c.bin", output_file(tmp_path, "c.bin", 300 << 10), owner="alice"
        )
    assert refused.value.kind == "quota"
    assert (
        "over its disk quota of 1.0 MiB" in refused.value.message
        and "'alice'" in refused.value.message
    )
    assert not (
        tmp_path / "store" / "outputs" / "job-2"
    ).exists()  # b.bin went with the refused call
    assert store.usage("alice") == 600 << 10 and store.quota_left("alice") == (1024 - 600) << 10
    with pytest.raises(QuotaExceeded):
        store.check_quota("alice", 500 << 10)  # what a writer asks before taking a call's bytes
    # another owner is not charged for alice's files, and has no quota here
    assert (
        store.save_output("job-3", "d.bin", output_file(tmp_path, "d.bin", 2 * MiB), owner="bob")
        == 2 * MiB
    )
    assert store.usage("bob") == 2 * MiB and store.quota_left("bob") is None
    # a restarted grid counts what is on disk, per owner
    again = LocalStore(tmp_path / "store", quota=lambda owner: MiB)
    assert again.usage("alice") == 600 << 10 and again.usage("bob") == 2 * MiB


def test_a_sparse_file_counts_at_its_apparent_size(tmp_path):
    """Must never happen: a 1 GiB sparse file slipping under a 100 MiB quota because it uses no blocks yet."""
    store = LocalStore(tmp_path / "store", quota=lambda owner: 100 * MiB)
    sparse = output_file(tmp_path, "hole.bin", 1 << 30, sparse=True)
    assert sparse.stat().st_blocks * 512 < MiB  # really sparse on this file system
    with pytest.raises(QuotaExceeded, match="1.00 GiB would bring owner 'mallory'"):
        store.save_output("job-1", "hole.bin", sparse, owner="mallory")


def test_the_store_finds_the_owner_from_the_job_when_the_worker_does_not_say(tmp_path):
    """Must never happen: outputs saved without an owner escaping every quota."""
    store = LocalStore(tmp_path / "store", quota=lambda owner: MiB, owner_of=lambda job_id: "alice")
    with pytest.raises(QuotaExceeded, match="'alice'"):
        store.save_output("job-1", "big.bin", output_file(tmp_path, "big.bin", 2 * MiB))


def test_retention_deletes_expired_outputs_and_blobs_and_says_what_it_freed(tmp_path):
    """Must never happen: outputs kept for ever, or a pass deleting outputs younger than the retention."""
    store = LocalStore(tmp_path / "store", quota=lambda owner: 10 * MiB)
    store.save_output("job-old", "a.bin", output_file(tmp_path, "a.bin", 3 * MiB), owner="alice")
    store.save_output("job-old", "sub/b.bin", output_file(tmp_path, "b.bin", MiB), owner="alice")
    store.save_output("job-new", "c.bin", output_file(tmp_path, "c.bin", MiB), owner="alice")
    store.put_blob("payloads/job-old", b"p" * 1000)
    week_ago = time.time() - 8 * 86400
    os.utime(tmp_path / "store" / "outputs" / "job-old.owner", (week_ago, week_ago))
    os.utime(tmp_path / "store" / "blobs" / "payloads" / "job-old", (week_ago, week_ago))
    janitor = Janitor(store, retention_s=7 * 86400, interval_s=3600)
    freed = janitor.sweep()
    assert (freed.jobs, freed.blobs, freed.bytes) == (1, 1, 4 * MiB + 1000)
    assert not (tmp_path / "store" / "outputs" / "job-old").exists()
    assert list(store.open_output("job-new", "c.bin")) == [b"x" * MiB]
    assert store.usage("alice") == MiB  # the freed space is alice's again
    assert janitor.sweep().bytes == 0 and janitor.totals.bytes == 4 * MiB + 1000


@pytest.mark.integration
def test_s3_store_quota_and_retention_on_a_real_s3_protocol_server(tmp_path):
    """Must never happen on S3 either: an owner over its quota keeping files, or expired outputs kept."""
    with moto_server():
        store = S3Store(
            "code",
            "data",
            quota=lambda owner: MiB if owner == "alice" else None,
            owner_of=lambda job_id: "alice",
        )
        store.s3.create_bucket(Bucket="code")
        store.s3.create_bucket(Bucket="data")
        assert (
            store.save_output("job-1", "a.bin", output_file(tmp_path, "a.bin", 600 << 10))
            == 600 << 10
        )
        store.save_output("job-2", "b.bin", output_file(tmp_path, "b.bin", 300 << 10))
        with pytest.raises(QuotaExceeded, match="over its disk quota of 1.0 MiB"):
            store.save_output("job-2", "c.bin", output_file(tmp_path, "c.bin", 300 << 10))
        with pytest.raises(FileNotFoundError):
            list(store.open_output("job-2", "b.bin"))  # the refused call's first file went with it
        assert store.usage("alice") == 600 << 10 and store.quota_left("alice") == (1024 - 600) << 10
        assert (
            store.save_output(
                "job-3", "d.bin", output_file(tmp_path, "d.bin", 2 * MiB), owner="bob"
            )
            == 2 * MiB
        )
        assert store.expire(time.time() - 3600).jobs == 0  # nothing is an hour old
        freed = store.expire(time.time() + 1)
        assert (freed.jobs, freed.bytes) == (2, (600 << 10) + 2 * MiB)
        assert store.usage("alice") == store.usage("bob") == 0
        assert store.s3.list_objects_v2(Bucket="data").get("KeyCount") == 0


def test_everything_the_store_writes_is_private(tmp_path):
    """Must never happen: a package, output or blob readable by another account, whatever the umask."""
    old = os.umask(0o022)
    try:
        store = LocalStore(tmp_path / "store")
        store.put_package("fn-1", b"zip")
        store.put_blob("payloads/job-1", b"payload")
        store.save_output(
            "job-1", "deep/er/x.bin", output_file(tmp_path, "x.bin", 10), owner="alice"
        )
    finally:
        os.umask(old)
    assert loose_modes(tmp_path / "store") == []


def loose_modes(root: Path) -> list[str]:
    """Every path under ``root`` (itself included) that another account could read, write or enter."""
    loose = []
    for dirpath, dirnames, filenames in os.walk(root):
        for path in [Path(dirpath)] + [Path(dirpath) / n for n in dirnames + filenames]:
            mode = path.lstat().st_mode
            if not stat.S_ISLNK(mode) and mode & 0o077:
                loose.append(f"{path.relative_to(root.parent)} {stat.filemode(mode)}")
    return sorted(set(loose))


# --- the embedded grid, as two owners and an attacker meet it -----------------------------------------------------


@pytest.fixture()
def tenants(tmp_path_factory) -> Iterator[tuple]:
    """A grid with two slots and three owners: alice, bob, and an operator with an admin key."""
    # the grid's parent is left open to everyone, so the data dir's own modes are what stops another account
    parent = Path(tempfile.mkdtemp(prefix="nanogrid-tenancy-"))
    parent.chmod(0o755)
    grid = start_grid(parent / "data", workers=2, stem_cells=2, kill_grace_s=0.5)
    registry = grid.grid.registry
    keys = {
        name: create_key(registry, name, **limits)[0]
        for name, limits in {
            "alice": {},
            "bob": {"disk_quota_bytes": MiB, "max_timeout_s": 2.0},
            "ops": {"admin": True},
        }.items()
    }
    clients = {
        name: httpx.Client(base_url=grid.url, timeout=60, headers={"x-api-key": key})
        for name, key in keys.items()
    }
    try:
        yield grid, clients
    finally:
        for client in clients.values():
            client.close()
        grid.stop()
        shutil.rmtree(parent, ignore_errors=True)


def upload(http: httpx.Client, name: str, source: bytes, **form: str) -> str:
    response = http.post(
        "/v1/upload",
        files={"file": (f"{name}.py", source)},
        data={
            "function_name": name,
            "runtime": "python%d.%d" % sys.version_info[:2],
            "handler": f"{name}.handler",
            **form,
        },
    )
    assert response.status_code in (200, 201), response.text
    return response.json()["function_id"]


@pytest.mark.integration
def test_another_local_account_reads_nothing_of_the_grid(tenants):
    """Must never happen: any other account on the machine reading an owner's code, payloads, results or outputs."""
    grid, clients = tenants
    writer = upload(clients["alice"], "writer", WRITER)
    done = (
        clients["alice"]
        .post(
            "/v1/run",
            json={"function_id": writer, "payload": {"files": {"a.txt": 10, "sub/b.bin": 2000}}},
        )
        .json()
    )
    assert done["status"] == "completed", done
    assert {f["name"] for f in done["output_files"]} == {"a.txt", "sub/b.bin"}
    data_dir = grid.config.data_dir
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert loose_modes(data_dir) == []
    files = [str(p) for p in data_dir.rglob("*") if p.is_file()]
    assert any(f.endswith("registry.sqlite3") for f in files) and any(
        "/outputs/" in f for f in files
    )
    if os.geteuid() != 0:
        return  # the modes above are the proof; as root the test also tries it as the nobody account
    probe = (
        "import json, sys\nopened = []\nfor path in json.loads(sys.argv[1]):\n"
        "    try:\n        open(path, 'rb').read(1); opened.append(path)\n    except PermissionError:\n"
        "        pass\nprint(json.dumps(opened))\n"
    )
    python = shutil.which(
        "python3", path="/usr/bin:/bin"
    )  # the venv's may sit where nobody cannot enter
    assert python, "a system python3 to run the probe as nobody"
    nobody = subprocess.run(
        [python, "-c", probe, json.dumps([*files, str(data_dir / "store")])],
        capture_output=True,
        text=True,
        user=65534,
        group=65534,
        cwd="/",
    )
    assert nobody.returncode == 0, nobody.stderr
    assert json.loads(nobody.stdout) == []


@pytest.mark.integration
def test_a_greedy_owners_backlog_does_not_starve_another_owners_call(tenants):
    """Must never happen: bob's one call waiting for alice's 200 queued calls, or alice holding both slots."""
    grid, clients = tenants
    alice, bob = clients["alice"], clients["bob"]
    alice_fn, bob_fn = upload(alice, "sleepy", SLEEPY), upload(bob, "sleepy", SLEEPY)
    with alice.stream(
        "POST",
        "/v1/map",
        json={
            "function_id": alice_fn,
            "payloads": [{"seconds": 0.2, "tag": n} for n in range(200)],
        },
    ) as stream:
        alice_jobs = json.loads(next(stream.iter_lines()))["job_ids"]
    assert grid.grid.queue.depth_of("alice") >= 190  # queued before bob's call, which comes next
    done = bob.post(
        "/v1/run", json={"function_id": bob_fn, "payload": {"seconds": 0, "tag": "bob"}}
    ).json()
    assert done["status"] == "completed" and done["result"] == "bob"
    alice.post("/v1/jobs/cancel", json={"job_ids": alice_jobs})
    views = [alice.get(f"/v1/status/{job_id}", params={"wait": 30}).json() for job_id in alice_jobs]
    ran = sorted((v for v in views if v["status"] == "completed"), key=lambda v: v["finished_at"])
    before_bob = [v for v in ran if v["finished_at"] < done["finished_at"]]
    assert len(before_bob) < 20, f"bob's call finished after {len(before_bob)} of alice's"
    # alice's cap on a 2-slot grid with other owners is 1: her calls never overlapped
    for earlier, later in zip(ran, ran[1:], strict=False):
        assert later["started_at"] >= earlier["finished_at"], (earlier, later)
    assert grid.grid.queue.depth_of("alice") == 0


@pytest.mark.integration
def test_a_greedy_owners_batches_hold_one_slot_and_let_another_owner_through(tenants):
    """Must never happen: alice's short calls, taken in batches, holding both slots (two of her calls at once) or
    keeping bob's one call waiting behind her backlog."""
    grid, clients = tenants
    alice, bob = clients["alice"], clients["bob"]
    alice_fn, bob_fn = upload(alice, "quick", QUICK), upload(bob, "sleepy", SLEEPY)
    assert (
        alice.post("/v1/run", json={"function_id": alice_fn, "payload": {"tag": -1}}).json()[
            "result"
        ]
        == -1
    )
    batched = grid.grid.worker.stats["batched_calls"]
    with alice.stream(
        "POST",
        "/v1/map",
        json={"function_id": alice_fn, "payloads": [{"tag": n} for n in range(3000)]},
    ) as stream:
        lines = stream.iter_lines()
        alice_jobs = json.loads(next(lines))["job_ids"]
        done = bob.post(
            "/v1/run", json={"function_id": bob_fn, "payload": {"seconds": 0, "tag": "bob"}}
        ).json()
        for _ in lines:  # every result streamed back
            pass
    assert done["status"] == "completed" and done["result"] == "bob"
    assert grid.grid.worker.stats["batched_calls"] - batched >= 1000, (
        "alice's backlog was not taken in batches"
    )
    views = [alice.get(f"/v1/status/{job_id}").json() for job_id in alice_jobs]
    assert [v["result"] for v in views] == list(range(3000))
    before_bob = [v for v in views if v["finished_at"] < done["finished_at"]]
    assert len(before_bob) < 1500, f"bob's call finished after {len(before_bob)} of alice's 3000"
    ran = sorted(views, key=lambda v: (v["started_at"], v["finished_at"]))
    for earlier, later in zip(ran, ran[1:], strict=False):  # her cap is one slot, batches included
        assert later["started_at"] >= earlier["finished_at"], (earlier, later)


@pytest.mark.integration
def test_a_key_with_a_lower_max_timeout_stays_limited(tenants):
    """Must never happen: a key limited to 2 s running a call for longer, through any function of its owner."""
    grid, clients = tenants
    bob = clients["bob"]
    refused = bob.post(
        "/v1/upload",
        files={"file": ("slow.py", SLEEPY)},
        data={"function_name": "slow", "handler": "slow.handler", "timeout": "30"},
    )
    assert refused.status_code == 422 and "at most 2 s (this key's max timeout)" in refused.text
    function_id = upload(bob, "sleepy", SLEEPY)
    assert (
        bob.get(f"/v1/functions/{function_id}").json()["timeout_s"] == 2.0
    )  # the default fits the key
    # a function bob uploaded with another key of his, before the limit, runs under the limit all the same
    other_key, _ = create_key(grid.grid.registry, "bob")
    other = httpx.Client(base_url=grid.url, timeout=60, headers={"x-api-key": other_key})
    long_fn = upload(other, "slow", SLEEPY, timeout="30")
    job = bob.post("/v1/run", json={"function_id": long_fn, "payload": {"seconds": 10}}).json()
    assert job["status"] == "failed" and job["error"]["kind"] == "timeout", job


@pytest.mark.integration
def test_outputs_over_a_keys_disk_quota_fail_the_call_with_the_quota_named(tenants):
    """Must never happen: an owner filling the host's disk past its quota, even with sparse files."""
    grid, clients = tenants
    bob = clients["bob"]
    writer = upload(bob, "writer", WRITER)
    ok = bob.post(
        "/v1/run", json={"function_id": writer, "payload": {"files": {"a.bin": 600 << 10}}}
    ).json()
    assert ok["status"] == "completed", ok
    over = bob.post(
        "/v1/run",
        json={
            "function_id": writer,
            "payload": {"files": {"b.bin": 300 << 10, "c.bin": 300 << 10}},
        },
    ).json()
    assert over["status"] == "failed" and over["error"]["kind"] == "quota", over
    assert "over its disk quota of 1.0 MiB" in over["error"]["message"]
    assert over["output_files"] == []
    sparse = bob.post(
        "/v1/run",
        json={"function_id": writer, "payload": {"files": {"hole.bin": 64 * MiB}, "sparse": True}},
    ).json()
    assert sparse["status"] == "failed" and sparse["error"]["kind"] == "quota", sparse
    assert grid.grid.store.usage("bob") == 600 << 10
    # alice has the grid's default quota and is not charged for bob's files
    alice_writer = upload(clients["alice"], "writer", WRITER)
    assert (
        clients["alice"]
        .post(
            "/v1/run", json={"function_id": alice_writer, "payload": {"files": {"a.bin": 2 * MiB}}}
        )
        .json()["status"]
        == "completed"
    )


@pytest.mark.integration
def test_no_view_shows_an_owner_anything_of_another_owners(tenants):
    """Must never happen: bob learning alice's function ids, job ids or warm sandboxes from any listing."""
    grid, clients = tenants
    alice, bob, ops = clients["alice"], clients["bob"], clients["ops"]
    function_id = upload(alice, "sleepy", SLEEPY)
    finished = alice.post(
        "/v1/run", json={"function_id": function_id, "payload": {"seconds": 0, "tag": "secret"}}
    ).json()
    running = alice.post(
        "/v1/run",
        json={"function_id": function_id, "payload": {"seconds": 3}},
        headers={"X-Async": "true"},
    ).json()
    queued = alice.post(
        "/v1/run",
        json={"function_id": function_id, "payload": {"seconds": 0}},
        headers={"X-Async": "true"},
    ).json()
    secrets = [function_id, finished["job_id"], running["job_id"], queued["job_id"], "alice"]
    # alice's own views have them, so their absence from bob's is not a blind spot
    assert (
        all(s in alice.get("/v1/jobs").text for s in secrets[1:4])
        and function_id in alice.get("/v1/functions").text
    )
    deadline = (
        time.monotonic() + 60
    )  # a loaded machine's worker may not have taken her first call yet
    while alice.get(f"/v1/status/{running['job_id']}").json()["status"] == "pending":
        assert time.monotonic() < deadline, "alice's first call was never taken"
        time.sleep(0.05)
    assert (
        alice.get("/v1/system/status").json()["queue_depth"] == 1
    )  # her second call waits: her cap is 1 of 2 slots
    bob_fn = upload(bob, "sleepy", SLEEPY)
    assert (
        bob.post("/v1/run", json={"function_id": bob_fn, "payload": {"seconds": 0}}).json()[
            "status"
        ]
        == "completed"
    )

    def bob_sees_nothing_of_alice() -> dict:
        views = {
            path: bob.get(path)
            for path in (
                "/v1/system/status",
                "/v1/jobs",
                "/v1/jobs?status=running",
                "/v1/jobs?status=pending",
                "/v1/functions",
                "/metrics",
            )
        }
        for path, response in views.items():
            assert response.status_code == 200, (path, response.text)
            leaked = [s for s in secrets if s in response.text]
            assert leaked == [], f"{path} shows bob {leaked}"
        assert bob.get("/v1/jobs", params={"all_owners": "true"}).status_code == 403
        return views["/v1/system/status"].json()

    status = bob_sees_nothing_of_alice()  # while alice's call runs and another waits
    assert status["jobs"] == {"completed": 1} and status["queue_depth"] == 0
    (worker,) = status["workers"]
    assert worker["pool"]["idle_by_function"] == {bob_fn: 1} and worker["slots"] == 2
    assert "completed" not in worker  # no grid-wide job counters for a non-admin
    assert (
        alice.get(f"/v1/status/{queued['job_id']}", params={"wait": 30}).json()["status"]
        == "completed"
    )
    bob_sees_nothing_of_alice()  # and once her sandbox is idle in the pool
    # the admin key sees every owner's jobs and warm sandboxes, but never another owner's result
    everything = ops.get("/v1/system/status").json()
    assert function_id in json.dumps(everything["workers"]) and everything["jobs"]["completed"] == 4
    listed = {
        j["job_id"]: j
        for j in ops.get("/v1/jobs", params={"all_owners": "true", "limit": 1000}).json()
    }
    assert set(secrets[1:4]) <= set(listed) and listed[finished["job_id"]]["result"] is None
    assert ops.get("/v1/jobs").json() == []  # by default an admin lists its own, like everyone
