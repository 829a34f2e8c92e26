"""Invocation history, metrics windows, retries and the AutoTuner, from the side of a user who relies on them and of
an owner who must never see another owner's calls.

The registry tests use real SQLite files; the grid tests a real embedded grid with process sandboxes.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import httpx
import pytest

import nanogrid
from nanogrid.job import Job
from nanogrid_backend.keys import create_key
from nanogrid_backend.models import COMPLETED, FAILED, FunctionRecord, JobRecord
from nanogrid_backend.registry import windows
from nanogrid_backend.registry.sqlite import SCHEMA_VERSION, SQLiteRegistry

MiB = 1 << 20


def function(
    function_id: str = "fn-a", owner: str = "alice", memory_mib: int = 1024
) -> FunctionRecord:
    return FunctionRecord(
        function_id,
        "work",
        "python3.11",
        "function.pkl",
        "pickle",
        memory_mib,
        30.0,
        10,
        "3.11",
        owner=owner,
    )


def finished(
    registry: SQLiteRegistry,
    function_id: str = "fn-a",
    owner: str = "alice",
    *,
    status: str = COMPLETED,
    ms: float | None = 10.0,
    peak_mib: float | None = 50.0,
    cold: bool = False,
    created: float | None = None,
    finished_at: float | None = None,
    stdout: str = "",
) -> JobRecord:
    """A call created and finished through the registry's own write path, as a worker records it."""
    job = JobRecord(
        "job-" + uuid.uuid4().hex, function_id, owner=owner, created_at=created or time.time()
    )
    registry.create_jobs([job])
    job.status, job.execution_time_ms, job.cold, job.stdout = status, ms, cold, stdout
    job.peak_memory_bytes = None if peak_mib is None else int(peak_mib * MiB)
    job.finished_at = finished_at or time.time()
    job.error = (
        {"kind": "exception", "type": "ValueError", "message": "bad"} if status == FAILED else None
    )
    assert registry.finish_job(job)
    return job


@pytest.fixture()
def registry(tmp_path: Path):
    registry = SQLiteRegistry(tmp_path / "registry.sqlite3")
    registry.put_function(function())
    yield registry
    registry.close()


# --- the registry --------------------------------------------------------------------------------------------------


def test_history_pages_newest_first_without_gaps_or_repeats(registry):
    """Paging with next_before must never skip or repeat a call, even when calls share a creation time."""
    now = time.time()
    made = [
        finished(registry, created=now - i // 3) for i in range(25)
    ]  # three calls per timestamp
    seen, before = [], None
    while True:
        page = registry.list_history("alice", "fn-a", limit=7, before=before)
        seen += [entry.job.job_id for entry in page]
        if len(page) < 7:
            break
        last = page[-1].job
        before = (last.created_at, last.job_id)
    assert sorted(seen) == sorted(job.job_id for job in made) and len(seen) == len(set(seen))
    times = [registry.get_job(job_id).created_at for job_id in seen]
    assert times == sorted(times, reverse=True)


def test_history_filters_by_status_and_never_shows_another_owners_calls(registry):
    """Another owner's call must never appear, not even when the function id is guessed."""
    ok, bad = finished(registry), finished(registry, status=FAILED)
    finished(registry, owner="mallory")
    assert [e.job.job_id for e in registry.list_history("alice", "fn-a", status=FAILED)] == [
        bad.job_id
    ]
    assert {e.job.job_id for e in registry.list_history("alice")} == {ok.job_id, bad.job_id}
    assert registry.list_history("mallory", "fn-a", status=FAILED) == []


def test_history_caps_captured_text_and_says_how_much_there_is(registry):
    """A page must not carry megabytes of output per call, and must say that more exists."""
    finished(registry, stdout="x" * 100_000)
    (entry,) = registry.list_history("alice", "fn-a", text_cap=2048)
    assert len(entry.job.stdout) == 2048 and entry.stdout_size == 100_000
    assert entry.job.payload == b"" and entry.job.result is None


def test_windows_count_errors_cold_starts_and_percentiles(registry):
    """The figures must match the calls: counts exact, percentiles within a bucket (about 9 %), max exact."""
    for ms in range(1, 101):  # 1..100 ms
        finished(
            registry,
            ms=float(ms),
            peak_mib=float(ms),
            cold=ms <= 10,
            status=FAILED if ms > 95 else COMPLETED,
        )
    hour = registry.function_windows("fn-a")["1h"]
    assert (hour["count"], hour["errors"], hour["cold_starts"]) == (100, 5, 10)
    assert hour["error_rate"] == pytest.approx(0.05) and hour["cold_share"] == pytest.approx(0.10)
    duration = hour["duration_ms"]
    assert duration["p50"] == pytest.approx(50, rel=0.1) and duration["p95"] == pytest.approx(
        95, rel=0.1
    )
    assert duration["p99"] <= duration["max"] == 100 and duration["mean"] == pytest.approx(50.5)
    assert sum(b["count"] for b in hour["peak_memory_mib"]["histogram"]) == 100
    assert hour["peak_memory_mib"]["max"] == pytest.approx(100)


def test_windows_keep_old_calls_out_of_short_windows(registry):
    """A call from three days ago must count in 7d and 30d, never in 1h or 24h."""
    finished(registry, finished_at=time.time() - 3 * 86400)
    found = registry.function_windows("fn-a")
    assert [found[w]["count"] for w in ("1h", "24h", "7d", "30d")] == [0, 0, 1, 1]


def test_a_call_recorded_twice_counts_once(registry):
    """A duplicate delivery's second outcome is refused, and must not be counted either."""
    job = finished(registry)
    assert not registry.finish_job(job)
    assert registry.function_windows("fn-a")["1h"]["count"] == 1


def test_retention_deletes_old_calls_and_keeps_unfinished_ones(registry):
    """Pruning must never delete a call that has not finished, however old."""
    old = finished(registry, created=time.time() - 40 * 86400)
    waiting = JobRecord("job-waiting", "fn-a", owner="alice", created_at=time.time() - 40 * 86400)
    registry.create_jobs([waiting])
    recent = finished(registry)
    assert registry.prune_history(time.time() - 30 * 86400) == 1
    assert registry.get_job(old.job_id) is None
    assert (
        registry.get_job("job-waiting") is not None and registry.get_job(recent.job_id) is not None
    )


def test_windows_and_history_survive_a_reopen(tmp_path):
    path = tmp_path / "registry.sqlite3"
    registry = SQLiteRegistry(path)
    registry.put_function(function())
    finished(registry)
    registry.close()
    again = SQLiteRegistry(path)
    try:
        assert again.schema_version == SCHEMA_VERSION
        assert (
            again.function_windows("fn-a")["24h"]["count"] == 1
            and len(again.list_history("alice")) == 1
        )
    finally:
        again.close()


def test_bucket_bounds_hold_every_value():
    for value in (0.001, 0.5, 1, 3, 10.7, 999, 123456):
        bucket = windows.bucket_of(value)
        assert 2 ** (bucket / 4) <= value < windows.bucket_upper(bucket)


# --- on a grid -----------------------------------------------------------------------------------------------------


@pytest.fixture()
def client(grid) -> nanogrid.Client:
    return nanogrid.connect(grid.url, api_key=grid.api_key)


def test_fn_history_shows_every_call_with_what_happened(client):
    @nanogrid.remote
    def shout(word: str) -> str:
        print("said", word)
        if word == "boom":
            raise ValueError("no boom here")
        return word.upper()

    assert shout.remote("hi") == "HI"
    with pytest.raises(ValueError):
        shout.remote("boom")
    calls = shout.history()
    assert [c["status"] for c in calls] == ["failed", "completed"]  # newest first
    failed, ok = calls
    assert failed["exit_reason"] == "exception" and "no boom here" in failed["error"]["message"]
    assert ok["exit_reason"] == "ok" and ok["stdout"] == "said hi\n" and ok["duration_ms"] > 0
    assert ok["worker_id"] and ok["cold"] in (True, False) and ok["finished_at"] >= ok["created_at"]
    assert [c["job_id"] for c in shout.history(status="completed")] == [ok["job_id"]]
    assert shout.history(limit=1, before=failed["job_id"])[0]["job_id"] == ok["job_id"]
    job = Job.from_id(ok["job_id"], client)
    assert job.result() == "HI" and job.stdout == "said hi\n"


def test_a_failed_call_keeps_a_large_exception_whole(client):
    """What must never happen: a failure whose pickled exception is over the grid's 1 MiB blob threshold (a failed
    %%nanogrid cell's state travels in one) comes back as a bare RemoteError, without what the exception carried."""

    @nanogrid.remote
    def refuse(size: int) -> None:
        raise ValueError(b"x" * size)

    with pytest.raises(ValueError) as raised:
        refuse.remote(3 * MiB)
    assert raised.value.args[0] == b"x" * (3 * MiB)
    (call,) = refuse.history()
    assert call["status"] == "failed" and call["error"]["type"] == "ValueError"


def test_full_output_is_one_request_away(client, grid):
    @nanogrid.remote
    def chatty() -> int:
        print("y" * 10_000)
        return 1

    chatty.remote()
    (call,) = chatty.history()
    assert call["truncated"] and len(call["stdout"]) == 2048 and call["stdout_size"] == 10_001
    whole = client.request("GET", f"{client.url}/v1/history/{call['job_id']}").json()
    assert whole["stdout"] == "y" * 10_000 + "\n" and not whole["truncated"]


def test_another_owner_sees_none_of_my_history_windows_or_advice(client, grid):
    """Guessing a function or job id must answer 404, and the owner-wide history must not list my calls."""

    @nanogrid.remote
    def private() -> str:
        return "mine"

    private.remote()
    function_id = private.deploy()
    (call,) = private.history()
    key, _ = create_key(grid.grid.registry, "mallory-" + uuid.uuid4().hex[:6])
    with httpx.Client(base_url=grid.url, headers={"x-api-key": key}) as other:
        for path in (
            f"/v1/functions/{function_id}/windows",
            f"/v1/functions/{function_id}/autotune",
            f"/v1/history/{call['job_id']}",
        ):
            assert other.get(path).status_code == 404, path
        assert (
            other.post(
                f"/v1/functions/{function_id}/autotune/apply", json={"memory_mib": 256}
            ).status_code
            == 404
        )
        assert other.get(f"/v1/functions/{function_id}/history").json()["items"] == []
        assert other.get("/v1/history").json()["items"] == []
        assert other.get("/v1/history", params={"before": call["job_id"]}).status_code == 404
        assert other.get(f"/v1/functions/{function_id}/history").status_code == 200
    assert httpx.get(f"{grid.url}/v1/history").status_code == 401


def test_windows_of_a_function_on_the_grid(client):
    @nanogrid.remote
    def quick(x: int) -> int:
        if x < 0:
            raise ValueError(x)
        return x

    assert list(quick.map(range(8))) == list(range(8))
    with pytest.raises(ValueError):
        quick.remote(-1)
    hour = quick.windows()["1h"]
    assert hour["count"] == 9 and hour["errors"] == 1 and hour["error_rate"] == pytest.approx(1 / 9)
    assert hour["cold_starts"] >= 1 and hour["duration_ms"]["p50"] > 0


def test_named_exceptions_are_tried_again_and_every_try_is_kept(client):
    """A call that keeps failing must end failed after exactly 1 + retries tries, each one in the history."""

    @nanogrid.remote(retries=2, retry_on=[LookupError], backoff=0.05)
    def flaky() -> None:
        raise KeyError("still missing")  # a subclass of the named LookupError

    with pytest.raises(KeyError):
        flaky.remote()
    calls = flaky.history()
    assert sorted(c["attempt"] for c in calls) == [1, 2, 3] and all(
        c["status"] == "failed" for c in calls
    )
    final = next(c for c in calls if c["retry_of"] is None)
    assert final["attempt"] == 3
    assert {c["retry_of"] for c in calls if c["attempt"] < 3} == {final["job_id"]}
    assert flaky.windows()["1h"]["count"] == 3


def test_exceptions_not_named_are_not_tried_again(client):
    @nanogrid.remote(retries=3, retry_on=[TimeoutError], backoff=0.05)
    def wrong() -> None:
        raise ValueError("a bug, not bad luck")

    with pytest.raises(ValueError):
        wrong.remote()
    assert [c["attempt"] for c in wrong.history()] == [1]


def test_a_crashed_sandbox_is_tried_again_with_each_crash_kept(client):
    """A sandbox that dies under the call is retried without being named; the call fails once the tries run out."""

    @nanogrid.remote(retries=1, backoff=0.05)
    def dies() -> None:
        os._exit(7)

    with pytest.raises(nanogrid.errors.NanoGridError):
        dies.remote()
    calls = dies.history()
    assert sorted((c["attempt"], c["exit_reason"]) for c in calls) == [(1, "crash"), (2, "crash")]
    assert (
        Job.from_id(next(c["job_id"] for c in calls if c["retry_of"] is None), client).status
        == "failed"
    )


def test_without_retries_a_crash_is_tried_once(client):
    @nanogrid.remote
    def dies_once() -> None:
        os._exit(7)

    with pytest.raises(nanogrid.errors.NanoGridError):
        dies_once.remote()
    assert [c["attempt"] for c in dies_once.history()] == [1]


def test_retry_settings_are_checked_at_decoration():
    with pytest.raises(nanogrid.errors.InvalidArgument, match="retries"):
        nanogrid.remote(retries=-1)
    with pytest.raises(nanogrid.errors.InvalidArgument, match="retry_on"):
        nanogrid.remote(retries=1, retry_on=[42])


def test_autotuner_advises_from_observed_peaks_and_one_call_applies_it(client, grid):
    """Oversized by 8x: the advice must be smaller, say why, quote a positive saving, and the
    applied version must run."""

    @nanogrid.remote(memory=2048)
    def small(x: int) -> int:
        return x + 1

    small.remote(1)
    function_id = small.deploy()
    registry = grid.grid.registry
    owner = registry.get_function(function_id).owner
    for peak in range(30, 60):  # measured peaks of 30..59 MiB, 100 ms each
        finished(registry, function_id, owner, ms=100.0, peak_mib=float(peak))
    advice = small.autotune()
    assert (
        advice["recommended_mib"] == 128 and advice["current_mib"] == 2048
    )  # 59 MiB * 1.25, at least 128
    assert advice["saving_per_million"]["lambda"] == pytest.approx(
        (2048 - 128) / 1024 * 0.1 * 0.0000166667 * 1e6, rel=0.05
    )
    assert advice["saving_per_million"]["ec2"] > 0 and any(
        "59" in reason for reason in advice["reasons"]
    )
    applied = small.autotune(apply=True)["applied"]
    assert applied["memory_mib"] == 128 and applied["function_id"] != function_id
    assert (
        small.remote(41) == 42 and small.deploy() == applied["function_id"]
    )  # the next calls use that version
    assert small.history()[0]["memory_limit_mib"] == 128


def test_autotuner_says_when_it_knows_too_little(client):
    @nanogrid.remote
    def rare() -> None:
        return None

    rare.remote()
    advice = rare.autotune()
    assert advice["recommended_mib"] is None and "calls" in advice["reasons"][0]
