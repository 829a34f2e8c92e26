"""The SQLite and DynamoDB registries: upgrades that keep data, transactions that always end, files kept private.

Registries "from an older release" are written by that release's own code, taken from git history.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nanogrid_backend.models import (
    COMPLETED,
    FAILED,
    PENDING,
    RUNNING,
    ApiKey,
    FunctionRecord,
    JobRecord,
)
from nanogrid_backend.registry import doctor, windows
from nanogrid_backend.registry.base import RegistryBusy, RegistryError
from nanogrid_backend.registry.lock import DataDirLock, DataDirLocked
from nanogrid_backend.registry.sqlite import (
    BACKUPS_KEPT,
    SCHEMA_VERSION,
    SQLiteRegistry,
    list_backups,
)
from tests.conftest import ROOT, require

FIRST_COMMIT, MEMORY_FIELDS, API_KEYS, AI_USAGE, LAST_UNVERSIONED = (
    "2ed229e",
    "58acc7a",
    "9fd009b",
    "36f6bae",
    "85dca21",
)

# What each old release writes, with its own code (run in a subprocess with only that release's modules on the path).
OLD_WRITER = textwrap.dedent("""
    import dataclasses, sys
    from pathlib import Path
    from backend import models  # the old releases' own import name
    from backend.registry.sqlite import SQLiteRegistry

    def fields_of(cls, **values):
        names = {f.name for f in dataclasses.fields(cls)}
        return {k: v for k, v in values.items() if k in names}

    registry = SQLiteRegistry(Path(sys.argv[1]))
    registry.put_function(models.FunctionRecord("fn-old", "double", "python3.11", "", "pickle", 256, 30.0, 100, "3.11",
                                                **fields_of(models.FunctionRecord, source="def double(x): ...",
                                                            created_at=100.0, owner="alice")))
    jobs = [models.JobRecord(job_id, "fn-old",
                             **fields_of(models.JobRecord, payload=b"{}", created_at=t, owner="alice"))
            for job_id, t in (("job-done", 1.0), ("job-failed", 2.0), ("job-pending", 3.0), ("job-running", 4.0))]
    registry.create_jobs(jobs)
    for job in jobs[:2] + jobs[3:]:
        registry.mark_running(job.job_id, "worker-1", 10.0)
    done, failed = jobs[0], jobs[1]
    done.status, done.result_format, done.result, done.cold = "completed", "pickle", b"\\x80\\x04K\\x04.", True
    done.output_files, done.execution_time_ms, done.finished_at = [{"name": "a.txt", "size": 3}], 1.5, 11.0
    failed.status, failed.error, failed.finished_at = "failed", {"kind": "crash", "message": "boom"}, 12.0
    registry.finish_job(done)
    registry.finish_job(failed)
    if hasattr(models, "ApiKey"):
        registry.put_key(models.ApiKey("k1", "alice", "hash-1", created_at=5.0, rate_limit=3.0))
""")


def old_registry(commit: str, path: Path) -> Path:
    """A registry file written by the code of ``commit``."""
    tree = path.parent / f"code-{commit}"
    modules = (
        "backend/__init__.py",
        "backend/models.py",
        "backend/registry/__init__.py",  # as they were then
        "backend/registry/base.py",
        "backend/registry/sqlite.py",
    )
    for module in modules:
        shown = subprocess.run(["git", "show", f"{commit}:{module}"], cwd=ROOT, capture_output=True)
        require(
            shown.returncode == 0,
            f"git history with commit {commit} is needed ({shown.stderr.decode().strip()})",
        )
        (tree / module).parent.mkdir(parents=True, exist_ok=True)
        (tree / module).write_bytes(shown.stdout)
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(tree)}
    written = subprocess.run(
        [sys.executable, "-c", OLD_WRITER, str(path)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert written.returncode == 0, written.stderr
    return path


def columns(path: Path, table: str) -> list[str]:
    with sqlite3.connect(path) as db:
        return [row[1] for row in db.execute(f"PRAGMA table_info({table})")]


def user_version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("PRAGMA user_version").fetchone()[0]
    finally:
        db.close()


@pytest.fixture()
def registry(tmp_path: Path) -> Iterator[SQLiteRegistry]:
    opened = SQLiteRegistry(tmp_path / "registry.sqlite3")
    yield opened
    opened.close()


def a_function(owner: str = "alice") -> FunctionRecord:
    return FunctionRecord(
        "fn-1",
        "double",
        "python3.11",
        "",
        "pickle",
        256,
        30.0,
        100,
        "3.11",
        created_at=1.0,
        owner=owner,
    )


# upgrades


@pytest.mark.parametrize(
    "commit", [FIRST_COMMIT, MEMORY_FIELDS, API_KEYS, AI_USAGE, LAST_UNVERSIONED]
)
def test_a_registry_written_by_an_older_release_opens_with_everything_in_it(
    tmp_path: Path, commit: str
):
    """An upgrade must never lose or garble a function, job or key, nor stop the registry from taking new ones."""
    path = old_registry(commit, tmp_path / "registry.sqlite3")
    assert user_version(path) == 0  # written before versioning

    registry = SQLiteRegistry(path)
    try:
        assert registry.schema_version == SCHEMA_VERSION
        pre_keys = commit in (FIRST_COMMIT, MEMORY_FIELDS)
        owner = "local" if pre_keys else "alice"  # before keys, everything was the local user's
        (function,) = registry.list_functions(owner=owner)
        assert (
            function.function_id,
            function.memory_mib,
            function.timeout_s,
            function.created_at,
        ) == ("fn-old", 256, 30.0, 100.0)
        done = registry.get_job("job-done")
        assert done.status == COMPLETED and done.result == b"\x80\x04K\x04." and done.cold is True
        assert done.output_files == [{"name": "a.txt", "size": 3}] and done.execution_time_ms == 1.5
        assert done.ai_usage is None and done.owner == owner
        assert registry.get_job("job-failed").error == {"kind": "crash", "message": "boom"}
        assert registry.count_jobs() == {COMPLETED: 1, FAILED: 1, PENDING: 1, RUNNING: 1}
        assert registry.count_jobs(owner=owner) == registry.count_jobs()
        assert [j.job_id for j in registry.list_jobs(limit=-1, owner=owner)] == [
            "job-running",
            "job-pending",
            "job-failed",
            "job-done",
        ]
        assert [k.name for k in registry.list_keys()] == ([] if pre_keys else ["alice"])

        # and it works: the old pending job runs and finishes, new jobs and keys are taken
        assert registry.mark_running("job-pending", "worker-2", 20.0)
        pending = registry.get_job("job-pending")
        pending.status, pending.ai_usage, pending.finished_at = COMPLETED, {"calls": 1}, 21.0
        assert registry.finish_job(pending)
        assert registry.get_job("job-pending").ai_usage == {"calls": 1}
        registry.create_jobs([JobRecord("job-new", "fn-old", owner=owner, memory_limit_mib=64)])
        registry.put_key(ApiKey("k2", "bob", "hash-2", rate_burst=7))
        assert registry.get_key("k2").rate_burst == 7
    finally:
        registry.close()

    backups = list_backups(path)
    assert len(backups) == 1 and user_version(backups[0]) == 0, (
        "the copy from before the migration is kept"
    )
    reopened = SQLiteRegistry(path)
    try:
        assert reopened.count_jobs() == {COMPLETED: 2, FAILED: 1, PENDING: 1, RUNNING: 1}
        assert reopened.get_job("job-new").memory_limit_mib == 64
    finally:
        reopened.close()


def test_a_registry_newer_than_the_code_is_refused_untouched(tmp_path: Path):
    """Code must never write into a schema it does not know (it would drop what the newer release stores)."""
    path = tmp_path / "registry.sqlite3"
    SQLiteRegistry(path).close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    before = path.read_bytes()
    with pytest.raises(RegistryError, match="newer than this NanoGrid") as refused:
        SQLiteRegistry(path)
    assert "\n" not in str(refused.value) and "upgrade NanoGrid" in str(refused.value)
    assert path.read_bytes() == before


def test_a_field_without_a_migration_is_named_at_open(tmp_path: Path):
    """A developer who adds a field and forgets its migration must hear which line to add, not a write failing later."""
    path = tmp_path / "registry.sqlite3"
    SQLiteRegistry(path).close()
    with sqlite3.connect(path) as db:
        db.execute(
            "ALTER TABLE jobs DROP COLUMN ai_usage"
        )  # the field exists in JobRecord, not in the file
    with pytest.raises(
        RegistryError, match=r"JobRecord\.ai_usage .*ALTER TABLE jobs ADD COLUMN ai_usage"
    ):
        SQLiteRegistry(path)


def test_every_record_field_round_trips_by_name(registry: SQLiteRegistry):
    """Columns are matched by name: a record must come back exactly as written, whatever the column order."""
    job = JobRecord(
        "job-1",
        "fn-1",
        status=COMPLETED,
        payload=b"p",
        result_format="json",
        result=b"4",
        error={"kind": "x"},
        stdout="out",
        stderr="err",
        output_files=[{"name": "f"}],
        execution_time_ms=2.5,
        peak_memory_bytes=7,
        cold=False,
        memory_limit_mib=64,
        baseline_memory_bytes=3,
        ai_usage={"tokens": 9},
        worker_id="w",
        sandbox_id="s",
        started_at=1.0,
        finished_at=2.0,
        owner="alice",
    )
    registry.create_jobs([job])
    assert registry.get_job("job-1") == job
    registry.put_function(a_function())
    assert registry.get_function("fn-1") == a_function()
    key = ApiKey("k1", "alice", "h", revoked_at=3.0, rate_limit=1.5, rate_burst=4)
    registry.put_key(key)
    assert registry.get_key("k1") == key


def test_counts_cover_every_job_not_a_page(registry: SQLiteRegistry):
    """/v1/system/status counted at most 1,000 rows: a count must be right at any size."""
    registry.create_jobs(
        [JobRecord(f"job-{i}", "fn-1", owner="alice" if i % 3 else "bob") for i in range(2500)]
    )
    assert registry.count_jobs() == {PENDING: 2500}
    assert registry.count_jobs(owner="bob") == {PENDING: 834}
    assert registry.count_jobs(owner="nobody") == {}


# transactions

HOLD_LOCK = textwrap.dedent("""
    import sqlite3, sys
    db = sqlite3.connect(sys.argv[1], isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT INTO jobs (job_id, function_id, status) VALUES ('job-other', 'fn-1', 'pending')")
    print("locked", flush=True)
    sys.stdin.readline()
    db.execute(sys.argv[2])
""")


class LockHolder:
    """Another process holding the registry's write lock (as an operator's sqlite3 shell would) until released."""

    def __init__(self, path: Path, end: str = "COMMIT") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, str(path), end],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        assert self.proc.wait(30) == 0


def test_a_write_that_must_not_wait_never_waits_and_leaves_the_waiting_ones_as_they_were(
    tmp_path: Path,
):
    """``create_jobs_now`` (the event loop's write): with the lock held by another process or by another thread it
    writes nothing and says so at once, instead of waiting; the registry's other writes still wait for a lock."""
    registry = SQLiteRegistry(tmp_path / "registry.sqlite3", busy_timeout_s=5, lock_wait_s=10)
    try:
        holder = LockHolder(registry.path, end="ROLLBACK")
        answered: list[bool] = []
        attempt = threading.Thread(
            target=lambda: answered.append(registry.create_jobs_now([JobRecord("job-1", "fn-1")]))
        )
        attempt.start()
        attempt.join(3)  # SQLite's own busy wait is 5 s here
        assert answered == [False], "it waited for the other process's lock"
        threading.Timer(0.5, holder.release).start()
        registry.create_jobs([JobRecord("job-2", "fn-1")])  # waits the half second, then writes
        with registry._write_lock:  # another thread of this grid writing
            elsewhere = threading.Thread(
                target=lambda: answered.append(
                    registry.create_jobs_now([JobRecord("job-3", "fn-1")])
                )
            )
            elsewhere.start()
            elsewhere.join(3)
        assert answered == [False, False]
        assert registry.create_jobs_now([JobRecord("job-4", "fn-1")])
        assert [registry.get_job(j) is not None for j in ("job-1", "job-2", "job-3", "job-4")] == [
            False,
            True,
            False,
            True,
        ]
    finally:
        registry.close()


def test_a_lock_held_past_the_wait_fails_one_write_and_never_the_next(tmp_path: Path):
    """The fault of issue 17: a write that met a held lock left the connection inside its transaction, and every
    later write answered "cannot start a transaction within a transaction" for good."""
    registry = SQLiteRegistry(tmp_path / "registry.sqlite3", busy_timeout_s=0.1, lock_wait_s=0.5)
    try:
        holder = LockHolder(registry.path, end="ROLLBACK")
        with pytest.raises(RegistryBusy, match="stayed locked by another process") as busy:
            registry.create_jobs([JobRecord("job-1", "fn-1"), JobRecord("job-2", "fn-1")])
        assert "\n" not in str(busy.value)
        holder.release()
        registry.create_jobs([JobRecord("job-3", "fn-1")])
        assert registry.mark_running("job-3", "w", 1.0)
        assert registry.get_job("job-1") is None and registry.count_jobs() == {RUNNING: 1}
    finally:
        registry.close()


def test_a_lock_held_longer_than_the_busy_timeout_only_delays_writes(tmp_path: Path):
    """A lock held elsewhere for a while must delay a write, not fail it; reads must not wait behind that write."""
    registry = SQLiteRegistry(tmp_path / "registry.sqlite3", busy_timeout_s=0.1, lock_wait_s=60)
    try:
        registry.create_jobs([JobRecord("job-0", "fn-1")])
        holder = LockHolder(registry.path)
        writer = threading.Thread(target=registry.create_jobs, args=([JobRecord("job-1", "fn-1")],))
        writer.start()
        assert (
            registry.get_job("job-0").status == PENDING
        )  # answered while the write waits for the lock
        assert writer.is_alive() and registry.get_job("job-1") is None
        holder.release()
        writer.join(30)
        assert registry.count_jobs() == {PENDING: 3}  # the other process's row and both of ours
    finally:
        registry.close()


def test_a_batch_that_fails_half_way_writes_none_of_its_jobs(registry: SQLiteRegistry):
    """A submission is all or nothing: a job recorded without the rest of its batch would be run but never answered."""
    unserialisable = JobRecord("job-2", "fn-1", error={"not json": object()})
    with pytest.raises(TypeError):
        registry.create_jobs([JobRecord("job-1", "fn-1"), unserialisable])
    with pytest.raises(sqlite3.IntegrityError):
        registry.create_jobs([JobRecord("job-3", "fn-1"), JobRecord("job-3", "fn-1")])
    assert registry.count_jobs() == {}
    registry.create_jobs([JobRecord("job-4", "fn-1")])
    assert registry.count_jobs() == {PENDING: 1}


def test_a_batch_of_outcomes_is_recorded_together_and_each_only_once(
    registry: SQLiteRegistry, monkeypatch: pytest.MonkeyPatch
):
    """A worker's batch: marked running only while still pending (a cancelled call is never run), its outcomes
    written in one transaction with their metrics counters, a job that already had a final state left as it was,
    and a batch that fails half way leaving every job as it stood, counters included."""
    registry.create_jobs([JobRecord(f"job-{i}", "fn-1", owner="alice") for i in range(4)])
    cancelled = JobRecord("job-2", "fn-1", status="cancelled", finished_at=5.0, owner="alice")
    assert registry.finish_job(cancelled)
    assert registry.mark_running_many(
        ["job-0", "job-1", "job-2", "job-3", "job-unknown"], "w-1", 10.0
    ) == {"job-0", "job-1", "job-3"}
    assert (
        registry.get_job("job-0").status == RUNNING and registry.get_job("job-0").worker_id == "w-1"
    )
    assert registry.get_job("job-2").status == "cancelled"

    def outcome(job_id: str, status: str = COMPLETED, ms: float = 2.0) -> JobRecord:
        return JobRecord(
            job_id,
            "fn-1",
            status=status,
            started_at=10.0,
            finished_at=10.5,
            execution_time_ms=ms,
            peak_memory_bytes=20 << 20,
            result=b"r",
            result_format="pickle",
            owner="alice",
        )

    def counters_fail(job: JobRecord) -> list:
        raise OSError("disk full")  # after the batch's updates, inside its transaction

    with monkeypatch.context() as patch:
        patch.setattr(windows, "counters_for", counters_fail)
        with pytest.raises(OSError):
            registry.finish_jobs([outcome("job-0"), outcome("job-1")])
    assert registry.get_job("job-0").status == RUNNING  # nothing of the failed batch was written
    assert (
        registry.function_windows("fn-1", now=11.0)["1h"]["count"] == 1
    )  # the cancelled call only
    assert registry.finish_jobs(
        [outcome("job-0"), outcome("job-1", FAILED, 8.0), outcome("job-2"), outcome("job-3")]
    ) == [True, True, False, True]
    assert registry.finish_jobs([outcome("job-0")]) == [False]  # recorded once, counted once
    assert [registry.get_job(f"job-{i}").status for i in range(4)] == [
        COMPLETED,
        FAILED,
        "cancelled",
        COMPLETED,
    ]
    assert registry.get_job("job-0").payload == b""  # arguments are dropped once the outcome is in
    hour = registry.function_windows("fn-1", now=11.0)["1h"]
    assert hour["count"] == 4 and hour["errors"] == 1 and hour["duration_ms"]["max"] == 8.0


def test_an_interrupt_inside_a_write_rolls_it_back(registry: SQLiteRegistry):
    """Ctrl-C in the middle of a write must not leave the connection inside a transaction."""

    def interrupted(db: sqlite3.Connection) -> None:
        db.execute(
            "INSERT INTO jobs (job_id, function_id, status) VALUES ('job-1', 'fn-1', 'pending')"
        )
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        registry._write(interrupted)
    registry.create_jobs([JobRecord("job-2", "fn-1")])
    assert registry.get_job("job-1") is None and registry.get_job("job-2") is not None


# integrity, backups, files


def damage_pages(path: Path, page_size: int = 4096) -> None:
    """Overwrite up to three pages in the middle of the file (never the header page), as a bad disk would."""
    pages = path.stat().st_size // page_size
    first = max(1, pages // 2)
    with open(path, "r+b") as f:
        f.seek(first * page_size)
        f.write(b"\xa5" * page_size * min(3, pages - first))


def filled(path: Path, jobs: int = 2000) -> Path:
    registry = SQLiteRegistry(path)
    registry.put_function(a_function())
    registry.create_jobs(
        [
            JobRecord(f"job-{i}", "fn-1", status=COMPLETED, stdout="x" * 200, owner="alice")
            for i in range(jobs)
        ]
    )
    registry.close()
    return path


@pytest.mark.parametrize("damage", ["pages", "header", "half"])
def test_a_damaged_registry_is_refused_in_one_line_and_never_backed_up(tmp_path: Path, damage: str):
    """A damaged file must stop the start with a way out, and must never push a good backup out of the rotation."""
    path = filled(tmp_path / "registry.sqlite3")
    SQLiteRegistry(path, keep_backups=BACKUPS_KEPT).close()
    good = list_backups(path)
    if damage == "pages":
        damage_pages(path)
    else:
        os.truncate(path, 10 if damage == "header" else path.stat().st_size // 2)
    for _ in range(BACKUPS_KEPT + 1):
        with pytest.raises(RegistryError, match="is damaged") as refused:
            SQLiteRegistry(path, keep_backups=BACKUPS_KEPT)
        assert "\n" not in str(
            refused.value
        ) and f"nanogrid doctor --data-dir {tmp_path} --repair" in str(refused.value)
    assert list_backups(path) == good


@pytest.mark.parametrize("state", ["empty", "missing"])
def test_a_lost_registry_in_a_used_data_dir_is_never_made_into_a_new_grid(
    tmp_path: Path, state: str
):
    """A 0-byte or missing registry beside stored functions used to become a new, empty grid: keys, functions
    and jobs gone without a word."""
    (tmp_path / "store" / "packages").mkdir(parents=True)
    (tmp_path / "store" / "packages" / "fn-1.zip").write_bytes(b"PK")
    path = tmp_path / "registry.sqlite3"
    if state == "empty":
        path.write_bytes(b"")
    with pytest.raises(
        RegistryError, match="nanogrid doctor .* --repair.*move the data dir aside"
    ) as refused:
        SQLiteRegistry(path)
    assert "\n" not in str(refused.value)
    assert (path.stat().st_size == 0) if state == "empty" else not path.exists()


def test_an_empty_registry_in_a_new_data_dir_is_a_new_grid(tmp_path: Path):
    """Only evidence of an earlier grid blocks the start: a new data dir (or a touched file) must just work."""
    (tmp_path / "registry.sqlite3").write_bytes(b"")
    registry = SQLiteRegistry(tmp_path / "registry.sqlite3")
    registry.create_jobs([JobRecord("job-1", "fn-1")])
    assert (
        registry.get_job("job-1") is not None
    )  # it took the write: a working registry, not a refusal
    registry.close()


def test_each_start_backs_up_and_keeps_the_newest_copies(tmp_path: Path):
    """Backups are whole, consistent copies, private to the account, and never pile up."""
    path = filled(tmp_path / "registry.sqlite3", jobs=10)
    for n in range(BACKUPS_KEPT + 2):
        registry = SQLiteRegistry(path, keep_backups=BACKUPS_KEPT)
        registry.create_jobs([JobRecord(f"job-extra-{n}", "fn-1")])
        registry.close()
    backups = list_backups(path)
    assert len(backups) == BACKUPS_KEPT
    newest = doctor.examine(backups[-1])
    assert newest.ok and newest.jobs == {
        COMPLETED: 10,
        PENDING: BACKUPS_KEPT + 1,
    }  # as it was at the last start
    assert list_backups(path) == backups and not list(tmp_path.glob("*.bak-*-wal")), (
        "looking leaves nothing beside"
    )
    assert all(stat.S_IMODE(b.stat().st_mode) == 0o600 for b in backups)


def test_registry_files_are_private_to_the_account(tmp_path: Path):
    """The registry holds results, payloads and key hashes: no other local account may read it."""
    old_umask = os.umask(0o022)
    try:
        registry = SQLiteRegistry(tmp_path / "data" / "registry.sqlite3", keep_backups=1)
        registry.create_jobs([JobRecord("job-1", "fn-1")])
        files = [
            tmp_path / "data" / name
            for name in ("registry.sqlite3", "registry.sqlite3-wal", "registry.sqlite3-shm")
        ]
        assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
        assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700
        registry.close()
        os.chmod(files[0], 0o644)  # a registry from before this rule
        SQLiteRegistry(files[0], keep_backups=1).close()
        assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
        assert all(stat.S_IMODE(b.stat().st_mode) == 0o600 for b in list_backups(files[0]))
    finally:
        os.umask(old_umask)


def test_one_data_dir_has_one_grid(tmp_path: Path):
    """A second holder must be refused (naming the first's pid), and the lock must free itself when the holder ends."""
    first = DataDirLock(tmp_path).acquire()
    with pytest.raises(
        DataDirLocked, match=f"another grid \\(pid {os.getpid()}\\) is running on {tmp_path}"
    ):
        DataDirLock(tmp_path).acquire()
    first.release()
    DataDirLock(tmp_path).acquire().release()


# doctor


def test_doctor_reports_and_repairs_from_the_newest_good_backup(tmp_path: Path):
    """Repair must bring back the last good state, keep the damaged file for inspection, and skip damaged backups."""
    path = filled(tmp_path / "registry.sqlite3", jobs=100)
    SQLiteRegistry(path, keep_backups=BACKUPS_KEPT).close()
    registry = SQLiteRegistry(path, keep_backups=BACKUPS_KEPT)
    registry.create_jobs([JobRecord("job-after-backups", "fn-1")])
    registry.close()
    newest = list_backups(path)[-1]
    damage_pages(newest)  # the newest copy is bad too: the one before it must be used
    damage_pages(path)

    report = doctor.inspect(tmp_path)
    assert not report.healthy and "malformed" in report.registry.problem
    assert [b.ok for b in report.backups] == [False, True]

    done = doctor.repair(tmp_path)
    assert "moved the damaged registry aside" in done[0] and "100 jobs" in done[1]
    assert len(list(tmp_path.glob("registry.sqlite3.damaged-*Z"))) == 1
    repaired = SQLiteRegistry(path)
    try:
        assert (
            repaired.count_jobs() == {COMPLETED: 100}
            and repaired.get_function("fn-1") == a_function()
        )
    finally:
        repaired.close()
    assert doctor.inspect(tmp_path).healthy
    assert doctor.repair(tmp_path) == [f"{path} is healthy: nothing to repair"]


def test_doctor_refuses_to_repair_under_a_running_grid_or_without_a_backup(tmp_path: Path):
    """Repair must never swap the file under a live grid, nor invent an empty registry."""
    path = filled(tmp_path / "registry.sqlite3", jobs=1)
    damage = path.read_bytes()
    path.write_bytes(damage[:10])
    lock = DataDirLock(tmp_path).acquire()
    with pytest.raises(RegistryError, match="is running on .* stop it before --repair"):
        doctor.repair(tmp_path)
    lock.release()
    with pytest.raises(RegistryError, match=r"no good backup .*\(there are no backups\)"):
        doctor.repair(tmp_path)
    assert path.read_bytes() == damage[:10]


def test_doctor_looks_without_changing_anything(tmp_path: Path):
    """Looking at an old registry must not migrate it (an older release may still need to open it)."""
    path = old_registry(LAST_UNVERSIONED, tmp_path / "registry.sqlite3")
    before = path.read_bytes()
    report = doctor.inspect(tmp_path)
    assert report.healthy and report.registry.version == 0 and report.registry.keys == 1
    assert report.registry.jobs == {COMPLETED: 1, FAILED: 1, PENDING: 1, RUNNING: 1}
    assert path.read_bytes() == before and not list_backups(path)


# DynamoDB item shapes (the moto server: DynamoDB's wire protocol on loopback)


@pytest.fixture(scope="module")
def dynamodb_table() -> Iterator[str]:
    from tests.aws_cluster import moto_server

    with moto_server():
        from nanogrid_backend.registry.dynamodb import create_table

        create_table("nanogrid-registry-test")
        yield "nanogrid-registry-test"


@pytest.mark.integration
def test_dynamodb_items_written_before_versioning_read_with_defaults(dynamodb_table: str):
    """Items from an older controller lack the attributes added since: they must read with the defaults,
    finish normally, and come back marked with the current item version."""
    import boto3

    from nanogrid_backend.registry.dynamodb import ITEM_VERSION, DynamoDBRegistry

    table = boto3.resource("dynamodb").Table(dynamodb_table)
    # shapes as 8b6d449 (the first DynamoDB registry) wrote them: no item_version, no ai_usage
    table.put_item(
        Item={
            "pk": "job#job-old",
            "kind": "job",
            "job_id": "job-old",
            "function_id": "fn-1",
            "status": "pending",
            "payload_format": "json",
            "stdout": "",
            "stderr": "",
            "output_files": "[]",
            "created_at": 1,
            "owner": "alice",
            "expires_at": 10**10,
        }
    )
    table.put_item(
        Item={
            "pk": "key#k-old",
            "kind": "key",
            "key_id": "k-old",
            "name": "alice",
            "key_hash": "h",
            "created_at": 1,
            "rate_burst": 5,
        }
    )
    table.put_item(
        Item={
            "pk": "job#job-newer",
            "kind": "job",
            "job_id": "job-newer",
            "function_id": "fn-1",
            "status": "pending",
            "created_at": 2,
            "owner": "bob",
            "item_version": ITEM_VERSION + 1,
            "an_attribute_from_a_newer_release": "x",
        }
    )
    registry = DynamoDBRegistry(dynamodb_table)

    old = registry.get_job("job-old")
    assert (
        old.ai_usage is None
        and old.output_files == []
        and old.created_at == 1.0
        and old.owner == "alice"
    )
    key = registry.get_key("k-old")
    assert key.revoked_at is None and key.rate_limit is None and key.rate_burst == 5
    assert (
        registry.get_job("job-newer").owner == "bob"
    )  # a rolling upgrade: unknown attributes are passed over
    assert registry.count_jobs() == {PENDING: 2} and registry.count_jobs(owner="alice") == {
        PENDING: 1
    }

    assert registry.mark_running("job-old", "w", 3.0)
    old.status, old.ai_usage, old.finished_at = COMPLETED, {"calls": 2}, 4.0
    assert registry.finish_job(old)
    assert registry.get_job("job-old").ai_usage == {"calls": 2}
    assert table.get_item(Key={"pk": "job#job-old"})["Item"]["item_version"] == ITEM_VERSION
    registry.put_key(dataclasses.replace(key, revoked_at=5.0))
    assert table.get_item(Key={"pk": "key#k-old"})["Item"]["item_version"] == ITEM_VERSION
    assert registry.get_key("k-old").revoked_at == 5.0


def test_a_later_jobs_id_sorts_after_an_earlier_ones_and_none_repeats():
    """Never: a new job's id landing anywhere in the registry's index on ids (with random ids every insert touched
    a page anywhere in it, and a call's registry writes grew a third dearer by 100,000 jobs), nor two jobs with
    one id."""
    import time

    from nanogrid_backend.models import new_job_id

    made = []
    for _ in range(5):
        made += [new_job_id() for _ in range(2000)]
        time.sleep(0.002)  # the next millisecond
    assert len(set(made)) == len(made)
    assert all(len(job_id) == 36 and job_id.startswith("job-") for job_id in made)
    int(made[0][4:], 16)  # hex, as before
    # ordered by the millisecond they were made in (within one, by chance)
    batches = [made[i : i + 2000] for i in range(0, len(made), 2000)]
    for earlier, later in zip(batches, batches[1:], strict=False):
        assert max(earlier) < min(later)
