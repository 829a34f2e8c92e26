"""The Python client against a live embedded grid: values, jobs, map, errors, limits, isolation."""

from __future__ import annotations

import base64
import os
import pickle
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import nanogrid
from nanogrid.transfer import ArgsEncoder
from tests.conftest import require_docker, start_grid

pytestmark = pytest.mark.integration


@nanogrid.remote(memory=256, timeout=30)
def square(x):
    print("working on", x)
    return x * x


def test_remote_returns_the_value_and_keeps_stdout(client):
    assert square.remote(7) == 49
    job = square.spawn(8)
    assert job.result(timeout=30) == 64
    assert job.status == "completed"
    assert job.stdout == "working on 8\n"
    assert job.stderr == ""
    assert job.duration is not None and job.duration >= 0
    assert job.peak_memory_bytes and job.peak_memory_bytes > 1 << 20
    assert job.cold is False  # square ran above, so its sandbox was warm
    assert job.worker_id and job.sandbox_id
    assert job.outputs == []


def test_map_returns_ordered_results(client):
    assert list(square.map(range(100), progress=False)) == [x * x for x in range(100)]


def test_map_zips_several_iterables_and_can_return_exceptions(client):
    @nanogrid.remote
    def divide(a, b):
        return a / b

    results = list(divide.map([1, 4, 9], [1, 0, 3], return_exceptions=True, progress=False))
    assert results[0] == 1 and results[2] == 3
    assert isinstance(results[1], ZeroDivisionError)


def test_remote_exception_is_reraised_as_its_type_with_the_remote_traceback(client):
    class InventoryError(Exception):
        pass

    @nanogrid.remote
    def check_stock(item):
        raise InventoryError(f"no {item} left")

    with pytest.raises(InventoryError, match="no apples left") as info:
        check_stock.remote("apples")
    cause = info.value.__cause__
    assert isinstance(cause, nanogrid.errors.RemoteTraceback)
    assert "check_stock" in cause.text and "raise InventoryError" in cause.text
    assert "bootstrap.py" not in cause.text  # the runtime's own frames are trimmed


def test_closures_and_globals_travel_with_the_function(client):
    factor = 3

    @nanogrid.remote
    def scale(x):
        return x * factor

    assert scale.remote(5) == 15
    factor = 4  # noqa: F841  (a changed closure is a new function version)
    assert scale.remote(5) == 20


def test_output_files_are_listed_and_downloadable(client):
    @nanogrid.remote
    def report(n):
        out = nanogrid.output_dir()
        (out / "sub").mkdir()
        (out / "numbers.txt").write_text("\n".join(map(str, range(n))))
        (out / "sub" / "blob.bin").write_bytes(os.urandom(1000))
        return "done"

    job = report.spawn(5)
    assert job.result(timeout=30) == "done"
    files = {f.name: f for f in job.outputs}
    assert set(files) == {"numbers.txt", "sub/blob.bin"}
    assert files["numbers.txt"].read() == b"0\n1\n2\n3\n4"
    assert files["sub/blob.bin"].size == 1000 and len(files["sub/blob.bin"].read()) == 1000
    # the next call starts with an empty output directory
    again = report.spawn(2)
    again.result(timeout=30)
    assert files["numbers.txt"].read() == b"0\n1\n2\n3\n4"  # the first job's files are kept


def test_output_files_come_back_when_the_function_replaces_or_removes_its_output_dir(client):
    """What must never happen: a call's files lost, or left for the next call, because the function removed or
    replaced the directory the sandbox holds (where the sandbox can, it rejects that; where it cannot, each call
    finds the directory by its path)."""

    @nanogrid.remote
    def rebuild(mode):
        import shutil

        out = nanogrid.output_dir()
        if mode == "remove":
            shutil.rmtree(out, ignore_errors=True)  # all of it where it can, else what is in it
            return "removed"
        try:
            shutil.rmtree(out)
            out.mkdir()
        except OSError:  # a mount point (the sandbox's own disk): it stays, emptied
            for path in out.iterdir():
                path.unlink()
        (out / "fresh.txt").write_text(mode)
        return "replaced"

    job = rebuild.spawn("replace")
    assert job.result(timeout=30) == "replaced"
    assert [(f.name, f.read()) for f in job.outputs] == [("fresh.txt", b"replace")]
    # a call after one that removed the directory gets it back, empty, with its own files only
    assert rebuild.remote("remove") == "removed"
    job = rebuild.spawn("again")
    assert job.result(timeout=30) == "replaced"
    assert [(f.name, f.read()) for f in job.outputs] == [("fresh.txt", b"again")]
    # calls queued together (a function's short calls run in batches): each call's files are its own
    jobs = [rebuild.spawn(f"map{n}") for n in range(3)]
    for n, job in enumerate(jobs):
        assert job.result(timeout=30) == "replaced"
        assert [(f.name, f.read()) for f in job.outputs] == [("fresh.txt", f"map{n}".encode())]


def test_timeout_kills_and_replaces_the_sandbox(client):
    @nanogrid.remote(timeout=1)
    def spin():
        while True:
            pass

    started = time.monotonic()
    with pytest.raises(nanogrid.FunctionTimeout, match="timed out after 1 s"):
        spin.remote()
    assert time.monotonic() - started < 10
    assert square.remote(3) == 9


def test_memory_limit_is_enforced(client):
    @nanogrid.remote(memory=64, timeout=30)
    def hog():
        blocks = [bytearray(16 << 20) for _ in range(16)]  # 256 MiB, 4x the limit
        return len(blocks)

    with pytest.raises(nanogrid.OutOfMemory, match="out of memory"):
        hog.remote()
    assert square.remote(4) == 16


def test_peak_memory_is_measured_per_call(client):
    @nanogrid.remote(memory=512, timeout=30)
    def allocate(mib):
        block = bytearray(mib << 20)
        return len(block)

    small = allocate.spawn(1)
    small.result(timeout=30)
    big = allocate.spawn(200)
    big.result(timeout=30)
    again = allocate.spawn(1)
    again.result(timeout=30)
    assert 200 << 20 <= big.peak_memory_bytes <= 260 << 20
    assert small.peak_memory_bytes < 100 << 20
    assert again.peak_memory_bytes < 100 << 20  # the peak is reset before each call


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_a_function_that_kills_its_sandbox_fails_alone(client, how):
    @nanogrid.remote
    def die(how):
        import os
        import signal

        if how == "exit":
            os._exit(3)
        os.kill(os.getpid(), signal.SIGKILL)

    with pytest.raises(nanogrid.SandboxCrashed, match="died"):
        die.remote(how)
    assert square.remote(5) == 25


def test_sys_exit_is_an_ordinary_remote_error(client):
    @nanogrid.remote
    def leave():
        raise SystemExit(2)

    with pytest.raises(SystemExit):
        leave.remote()
    assert square.remote(6) == 36


def test_warm_sandboxes_are_reused_but_never_shared_between_functions(client):
    def process_token():
        import builtins
        import uuid

        return builtins.__dict__.setdefault("_test_token", uuid.uuid4().hex)  # one per interpreter

    @nanogrid.remote
    def first():
        return process_token()

    @nanogrid.remote
    def second():
        return process_token()

    a = [first.spawn() for _ in range(3)]
    tokens_a = {j.result(timeout=30) for j in a}
    b = [second.spawn() for _ in range(3)]
    tokens_b = {j.result(timeout=30) for j in b}
    assert not tokens_a & tokens_b
    assert not {j.sandbox_id for j in a} & {j.sandbox_id for j in b}
    assert any(j.cold is False for j in a[1:])


def test_cancel_stops_a_running_job(client):
    @nanogrid.remote(timeout=60)
    def nap():
        time.sleep(60)

    job = nap.spawn()
    deadline = time.monotonic() + 10
    while job.status != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    job.cancel()
    assert job.wait(timeout=10).status == "cancelled"
    with pytest.raises(nanogrid.JobCancelled):
        job.result()
    assert square.remote(2) == 4


@pytest.mark.parametrize("many", [False, True], ids=["alone", "in a batch"])
def test_a_cancel_that_comes_as_the_job_is_marked_running_stops_it(grid, monkeypatch, many):
    """What must never happen: a cancel lost because it came between the worker marking the job running (which a
    client polling its status then sees) and the worker noting it runs it; the job then ran to its end."""
    from nanogrid_backend.controller import jobs

    nanogrid.connect(grid.url, api_key=grid.api_key)
    registry = grid.grid.worker.registry

    @nanogrid.remote(timeout=60)
    def doze(x):
        time.sleep(30 if x else 0)
        return x

    assert doze.remote(0) == 0  # timed as short: its queued calls are taken in batches
    cancelled: list[str] = []

    def cancel_at_once(job_ids: list[str]) -> None:
        for job_id in job_ids:
            job = registry.get_job(job_id)
            if job is not None and job.status == "running":
                cancelled.append(job_id)
                jobs.cancel(grid.grid, job)  # as the cancel route does, before the worker goes on

    mark_one, mark_many = registry.mark_running, registry.mark_running_many

    def mark_running(job_id: str, *args: Any, **kwargs: Any) -> bool:
        marked = mark_one(job_id, *args, **kwargs)
        cancel_at_once([job_id])
        return marked

    def mark_running_many(job_ids: list[str], *args: Any, **kwargs: Any) -> set[str]:
        marked = mark_many(job_ids, *args, **kwargs)
        cancel_at_once(job_ids)
        return marked

    monkeypatch.setattr(registry, "mark_running", mark_running)
    monkeypatch.setattr(registry, "mark_running_many", mark_running_many)
    started = time.monotonic()
    if many:
        results = list(doze.map([1, 1, 1], return_exceptions=True, progress=False))
        assert all(isinstance(r, nanogrid.JobCancelled) for r in results), results
    else:
        assert doze.spawn(1).wait(timeout=20).status == "cancelled"
    assert cancelled and time.monotonic() - started < 20
    monkeypatch.undo()
    assert doze.remote(0) == 0


def test_job_result_timeout_leaves_the_job_running(client):
    @nanogrid.remote(timeout=30)
    def slow():
        time.sleep(1.5)
        return "late"

    job = slow.spawn()
    with pytest.raises(TimeoutError, match="still"):
        job.result(timeout=0.2)
    assert job.result(timeout=30) == "late"


def test_unpicklable_arguments_name_the_problem(client):
    import threading

    with pytest.raises(
        TypeError, match="cannot send argument 0 to the grid: cannot pickle '_thread.lock' object"
    ):
        square.remote(threading.Lock())


@pytest.fixture(params=["process", "docker"])
def capped(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[nanogrid.Client]:
    """A client of a grid of each kind that takes at most 16 MiB per argument (the default is 2 GiB)."""
    if request.param == "docker":
        require_docker()
    grid = start_grid(tmp_path, sandbox=request.param, stem_cells=0, max_payload_bytes=16 << 20)
    client = nanogrid.Client(grid.url, api_key=grid.api_key)
    try:
        yield client
    finally:
        client.close()
        grid.stop()


def test_huge_arguments_are_refused_before_sending(capped):
    """What must never happen: a value over the grid's own limit is uploaded, or refused without saying which."""
    with pytest.raises(
        ValueError, match=r"argument 0 pickles to 17\.0 MiB, over the grid's 16\.0 MiB limit"
    ):
        nanogrid.RemoteFunction(square.fn, client=capped).remote(b"x" * (17 << 20))
    assert capped.functions() == [] and capped.jobs() == []  # not even the function went


def test_a_call_that_prints_a_lot_keeps_its_value_and_its_output(client):
    """What must never happen: a function that prints more than a frame header's default size (256 KiB, here
    1.2 MiB once escaped as JSON) has its sandbox discarded as a protocol violation instead of answering."""

    @nanogrid.remote(timeout=60)
    def loud(n):
        print("é" * n)
        return n

    job = loud.spawn(200_000)
    assert job.result(timeout=60) == 200_000
    assert job.stdout == "é" * 200_000 + "\n"


def test_a_runtime_this_grid_lacks_is_refused_with_both_versions(client):
    @nanogrid.remote(runtime="python3.99")
    def future():
        return 1

    with pytest.raises(nanogrid.VersionMismatch, match="only runs python3.11"):
        future.remote()


def test_calling_the_decorated_function_runs_it_locally():
    assert square(3) == 9


def test_a_failing_map_cancels_what_has_not_run(client):
    @nanogrid.remote(timeout=60)
    def maybe_slow(x):
        if x == 0:
            raise ValueError("first item fails")
        time.sleep(5)
        return x

    with pytest.raises(ValueError, match="first item fails"):
        list(maybe_slow.map(range(20), progress=False))
    # what had not run when the first item failed was cancelled rather than left to sleep on the grid (the client
    # stops sending the rest); a call that was already running may finish (on a busy grid the failing call can
    # wait behind others), but none that started after the failure completes: each sleeps 5 s
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        views = [j for j in client.jobs(limit=100) if j["function_name"] == "maybe_slow"]
        states = [j["status"] for j in views]
        if "running" not in states and "pending" not in states:
            break
        time.sleep(0.1)
    assert "running" not in states and "pending" not in states, states
    (failure,) = [j for j in views if j["status"] == "failed"]
    assert "cancelled" in states and set(states) <= {"failed", "cancelled", "completed"}, states
    late = [
        j for j in views if j["status"] == "completed" and j["started_at"] > failure["finished_at"]
    ]
    assert late == [], late


def test_an_exception_with_a_huge_message_is_still_the_functions_own(client):
    """What must never happen: a function's own long error reported as a protocol violation of its sandbox."""

    @nanogrid.remote(timeout=30)
    def loud():
        raise ValueError("x" * (3 << 20))

    try:
        loud.remote()
    except (
        ValueError,
        nanogrid.RemoteError,
    ) as exc:  # rebuilt as itself, or as its type name and text
        text = str(exc)
        assert "protocol violation" not in text[-500:] and text.removeprefix(
            "ValueError: "
        ).startswith("xxxx")
        assert isinstance(exc, ValueError) or exc.type_name == "ValueError"
    else:
        raise AssertionError("the function's ValueError did not come back")


# --- batches of short calls: one frame exchange with a sandbox, one registry transaction ---------------------


@pytest.fixture(params=["process", "docker"])
def batching(request: pytest.FixtureRequest) -> tuple[nanogrid.Client, dict]:
    """A client of each kind of grid, and its worker's counters (how many calls ran in batches)."""
    embedded = request.getfixturevalue("grid" if request.param == "process" else "docker_grid")
    return nanogrid.connect(embedded.url, api_key=embedded.api_key), embedded.grid.worker.stats


def views_of(client: nanogrid.Client, function_name: str, count: int) -> list[dict]:
    """The newest ``count`` finished jobs of a function (its job list), with their unpickled results."""
    views = [v for v in client.jobs(limit=1000) if v["function_name"] == function_name][:count]
    assert len(views) == count
    for view in views:
        view["value"] = (
            pickle.loads(base64.b64decode(view["result_pickle"])) if view["result_pickle"] else None
        )
    return views


def test_short_calls_run_in_batches_and_each_keeps_its_own_outcome(batching):
    """Never: a batched call reported with another call's value, error, output or files, or a batch that loses one."""
    client, stats = batching

    @nanogrid.remote(timeout=30)
    def mixed(x):
        print("item", x)
        if x % 7 == 3:
            raise ValueError(f"bad {x}")
        if (
            x % 25 == 0
        ):  # output files end a batch: the calls after it run on, and no file lands on another call
            (nanogrid.output_dir() / f"n{x}.txt").write_text(str(x))
        return x

    assert (
        mixed.remote(1) == 1
    )  # timed once: its calls are short, so its backlog is taken in batches
    batched = stats["batched_calls"]
    results = list(mixed.map(range(300), return_exceptions=True, progress=False))
    for x, result in enumerate(results):
        if x % 7 == 3:
            assert isinstance(result, ValueError) and str(result) == f"bad {x}"
        else:
            assert result == x
    assert stats["batched_calls"] - batched >= 100, "the backlog was not taken in batches"
    for view in views_of(client, "mixed", 300):
        x = int(view["stdout"].split()[1])
        assert view["stdout"] == f"item {x}\n" and view["stderr"] == ""
        assert view["status"] == ("failed" if x % 7 == 3 else "completed")
        assert [f["name"] for f in view["output_files"]] == (
            [f"n{x}.txt"] if x % 25 == 0 and x % 7 != 3 else []
        )
        if view["status"] == "completed":
            assert view["value"] == x
        else:
            assert view["error"]["type"] == "ValueError" and f"bad {x}" in view["error"]["message"]
        assert view["execution_time_ms"] is not None and view["peak_memory_bytes"]
        assert view["started_at"] <= view["finished_at"]
    assert mixed.windows()["1h"]["count"] == 301  # every call counted once in the metrics windows


def test_a_call_that_hangs_in_a_batch_times_out_alone(batching):
    """Never: the calls batched with a hanging one failed with it, or its timeout charged to its neighbour."""
    client, _ = batching

    @nanogrid.remote(timeout=2)
    def mostly_quick(x):
        if x == 60:
            while True:
                pass
        return x

    assert mostly_quick.remote(0) == 0
    results = list(mostly_quick.map(range(120), return_exceptions=True, progress=False))
    assert isinstance(results[60], nanogrid.FunctionTimeout), results[60]
    assert [r for x, r in enumerate(results) if x != 60] == [x for x in range(120) if x != 60]
    assert square.remote(4) == 16


def test_a_batched_call_keeps_its_retry_policy(batching):
    """A call that fails inside a batch is tried again, alone, as often as its policy says, every try kept."""
    client, _ = batching

    @nanogrid.remote(retries=2, retry_on=[LookupError], backoff=0.05)
    def picky(x):
        if x == 5:
            raise KeyError(f"no {x}")
        return x

    assert picky.remote(0) == 0
    results = list(picky.map(range(40), return_exceptions=True, progress=False))
    assert isinstance(results[5], KeyError)
    assert [r for x, r in enumerate(results) if x != 5] == [x for x in range(40) if x != 5]
    tries = [c for c in picky.history(limit=100) if c["status"] == "failed"]
    assert sorted(c["attempt"] for c in tries) == [1, 2, 3]


def test_a_call_cancelled_while_it_waits_in_a_batch_never_runs(batching, tmp_path):
    """Never: a call cancelled while it waits behind a slow call of its batch run anyway, or its cancel taking
    the other calls of the batch with it."""
    client, _ = batching
    source = tmp_path / "napper.py"
    source.write_text(
        "import time\n\n\ndef handler(event, context):\n    if event['n'] == 0:\n"
        "        time.sleep(2)\n    return event['n']\n"
    )
    function_id = client.upload(source, function_name="napper", handler="napper.handler")[
        "function_id"
    ]
    assert (
        client.run({"function_id": function_id, "payload": {"n": 99}})["result"] == 99
    )  # timed: its calls are short
    lines = client.map_stream(
        {"function_id": function_id, "payloads": [{"n": n} for n in range(30)]}
    )
    job_ids = next(lines)["job_ids"]
    deadline = time.monotonic() + 30
    while (
        client.status(job_ids[10])["status"] == "pending"
    ):  # taken in call 0's batch, behind its nap
        assert time.monotonic() < deadline
        time.sleep(0.02)
    cancelled = client.cancel(job_ids[10])
    views = {view["index"]: view for view in lines}
    assert cancelled["status"] == views[10]["status"] == "cancelled", views[10]
    assert [views[n]["result"] for n in range(30) if n != 10] == [n for n in range(30) if n != 10]


def test_a_failing_calls_retries_do_not_hold_back_the_rest_of_its_batch(tmp_path: Path):
    """Never: the completed calls of a batch waiting, unannounced, while one failed call of it waits out its retry
    backoff. On a grid of its own with one owner: on a shared grid with several owners, the fairness cap gives this
    owner one slot, which the retrying call's backoff holds, so its other calls would queue behind it by design."""
    embedded = start_grid(tmp_path, workers=2, kill_grace_s=0.5)
    client = nanogrid.connect(embedded.url, api_key=embedded.api_key)

    @nanogrid.remote(retries=2, retry_on=[LookupError], backoff=1.0)
    def stubborn(x):
        if x == 5:
            raise KeyError(x)
        return x

    try:
        _retrying_call_in_a_batch(client, stubborn)
    finally:
        embedded.stop()


def _retrying_call_in_a_batch(client: nanogrid.Client, stubborn: nanogrid.RemoteFunction) -> None:
    assert stubborn.remote(0) == 0
    encoder = ArgsEncoder(client)
    pickles = [
        base64.b64encode(data).decode()
        for data, _ in encoder.send([encoder.pickle((n,), {}) for n in range(20)])
    ]
    arrived = {}
    for line in client.map_stream({"function_id": stubborn.deploy(), "args_pickle": pickles}):
        if "index" in line:
            arrived[line["index"]] = (
                len(arrived),
                line["status"],
            )  # the order in which outcomes arrived
    assert arrived[5][1] == "failed" and all(
        arrived[n][1] == "completed" for n in range(20) if n != 5
    )
    # Its two retries take 3 s of backoff: every other call, batched with it or not, is announced before it.
    assert arrived[5][0] == 19, "other calls waited for the failing call's retries"


def test_large_results_in_a_batch_stay_with_their_calls(batching):
    """Never: a large result of a batched call (sent in pieces, or left on the sandbox's disk) given to another
    call, lost, or refused as a protocol violation because the next call of the batch wrote its own."""
    client, stats = batching

    @nanogrid.remote(timeout=30)
    def sized(x):
        return bytes([x]) * ((2 << 20) if x % 3 == 0 else 10)

    assert sized.remote(1) == b"\x01" * 10
    batched = stats["batched_calls"]
    results = list(sized.map(range(40), progress=False))
    assert results == [bytes([x]) * ((2 << 20) if x % 3 == 0 else 10) for x in range(40)]
    assert stats["batched_calls"] > batched
