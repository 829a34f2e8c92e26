"""Schedules from the user's side: functions that run on their own, once per due time, as ordinary jobs.

What must never happen: a due time fired twice (two controllers racing, a restart right after a firing),
a grid that was down firing once per missed due time, a run started on top of one still going when the
schedule says skip, another owner seeing or touching a schedule, a bad cron or zone accepted silently.
"""

from __future__ import annotations

import shutil
import threading
import time
import types
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

import nanogrid
from nanogrid import cli
from nanogrid_backend.config import GridConfig
from nanogrid_backend.embedded import EmbeddedGrid
from nanogrid_backend.keys import OwnerPolicy, create_key
from nanogrid_backend.models import FiringRecord, FunctionRecord, ScheduleRecord
from nanogrid_backend.queue.local import LocalQueue
from nanogrid_backend.registry.base import Registry
from nanogrid_backend.registry.sqlite import FIRINGS_KEPT, SQLiteRegistry
from nanogrid_backend.schedules import Scheduler, due_times_between, next_due_after, schedule_id_for
from tests.aws_cluster import Cluster
from tests.conftest import require, start_grid
from tests.test_notify import Receiver, verify
from tests.test_registry import dynamodb_table  # noqa: F401 (the moto server's table, a fixture)

WAIT_S = 60.0  # how long a test waits for firings before it fails (never a measure of lateness)


def wait_until(found: Callable[[], object], what: str, timeout: float = WAIT_S) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = found()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"gave up waiting for {what}")


# --- mistakes, refused where they are written --------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: nanogrid.Cron("61 * * * *"), "Bad minute"),
        (lambda: nanogrid.Cron("* * * *"), "Wrong number of fields"),
        (
            lambda: nanogrid.Cron("0 * * * *", timezone="Mars/Olympus"),
            "unknown time zone 'Mars/Olympus'",
        ),
        (lambda: nanogrid.Period(seconds=0.2), "at least 1 s"),
        (lambda: nanogrid.Period(seconds=float("inf")), "at most 366 days"),
        (lambda: nanogrid.Cron("0 * * * *", timezone="Europe"), "unknown time zone 'Europe'"),
        (lambda: nanogrid.Period(minutes=-5), "at least 0"),
        (lambda: nanogrid.Period(minutes=5, overlap="sometimes"), "'skip'"),
        (lambda: nanogrid.remote(schedule=42), "cron string"),  # type: ignore[call-overload]
    ],
)
def test_a_bad_schedule_is_refused_with_what_is_wrong(make, words):
    """A schedule that could never fire as meant must never be accepted: the error names the wrong part."""
    with pytest.raises(nanogrid.InvalidArgument, match=words) as raised:
        make()
    assert isinstance(raised.value, ValueError) and isinstance(raised.value, nanogrid.NanoGridError)


def test_a_scheduled_function_that_needs_arguments_is_refused_at_decoration():
    """Runs are called with no arguments: a function that needs some must fail here, not at every firing."""
    with pytest.raises(nanogrid.InvalidArgument, match=r"no arguments.*\(x\).*defaults"):

        @nanogrid.remote(schedule="0 * * * *")
        def needs(x):
            return x

    @nanogrid.remote(schedule=nanogrid.Period(hours=1))
    def defaults(x=1):
        return x

    assert defaults.schedule.seconds == 3600


def test_cron_due_times_are_read_in_the_schedule_time_zone_across_daylight_saving():
    """'0 9 * * *' in Oslo is 08:00 UTC in winter and 07:00 UTC in summer: never a fixed UTC hour."""
    daily = ScheduleRecord("s", "o", "n", "f", cron="0 9 * * *", timezone="Europe/Oslo")
    winter = next_due_after(daily, datetime(2026, 1, 10, 12, tzinfo=UTC).timestamp())
    summer = next_due_after(daily, datetime(2026, 7, 10, 12, tzinfo=UTC).timestamp())
    assert datetime.fromtimestamp(winter, UTC) == datetime(2026, 1, 11, 8, tzinfo=UTC)
    assert datetime.fromtimestamp(summer, UTC) == datetime(2026, 7, 11, 7, tzinfo=UTC)


def test_a_grid_down_for_a_week_counts_the_missed_cron_due_times_in_one_catch_up():
    """The catch-up firing says how many due times it stands for: an hourly cron missed for a week is 168."""
    hourly = ScheduleRecord("s", "o", "n", "f", cron="0 * * * *", timezone="Europe/Oslo")
    first = datetime(2026, 3, 23, 10, tzinfo=UTC).timestamp()
    assert due_times_between(hourly, first, first + 7 * 86400 - 1) == 168
    assert due_times_between(hourly, first, first + 10) == 1


# --- two schedulers racing on one registry -----------------------------------------------------------------------


def controller_on(registry: Registry, data_dir: Path) -> types.SimpleNamespace:
    """What a scheduler uses of its controller: the registry (here, its own connection) and a queue to put runs on."""
    config = GridConfig.load(data_dir=data_dir)
    return types.SimpleNamespace(
        registry=registry,
        owners=OwnerPolicy(registry, config),
        queue=LocalQueue(limit=lambda owner: 4, load_payload=lambda job_id: b""),
    )


def race(registries: list[Registry], data_dir: Path, rounds: int = 30) -> Registry:
    """Two schedulers fire the same due times at the same instant, ``rounds`` times; returns the first registry."""
    registry = registries[0]
    registry.put_function(
        FunctionRecord(
            "fn-raced", "raced", "python3.11", "h", "pickle", 128, 10.0, 1, "3.11", owner="racer"
        )
    )
    schedule = ScheduleRecord(
        schedule_id_for("racer", "raced"),
        "racer",
        "raced",
        "fn-raced",
        period_s=60.0,
        payload=b"args",
        anchor=1000.0,
        next_due=1060.0,
    )
    registry.put_schedule(schedule)
    schedulers = [Scheduler(controller_on(r, data_dir)) for r in registries]  # type: ignore[arg-type]
    for n in range(rounds):
        moment = 1060.0 + 60 * n + 0.5
        start = threading.Barrier(len(schedulers))

        def tick(
            scheduler: Scheduler, moment: float = moment, start: threading.Barrier = start
        ) -> None:
            start.wait()
            scheduler.tick(now=moment)

        threads = [threading.Thread(target=tick, args=(s,)) for s in schedulers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        last = registry.get_schedule(schedule.schedule_id)
        assert last is not None and last.last_job_id is not None
        job = registry.get_job(last.last_job_id)
        assert job is not None
        # the run ended, so the next due time starts a run rather than skipping
        job.status, job.started_at, job.finished_at = "completed", moment, moment + 1
        registry.finish_job(job)
    return registry


def check_fired_once_each(registry: Registry, rounds: int = 30) -> None:
    firings = registry.list_firings(schedule_id_for("racer", "raced"), limit=1000)
    assert sorted(f.due_time for f in firings) == [1060.0 + 60 * n for n in range(rounds)]
    jobs = [j for j in registry.list_jobs(limit=-1, owner="racer") if j.trigger == "schedule"]
    assert len(jobs) == rounds and {f.job_id for f in firings} == {j.job_id for j in jobs}


def test_two_schedulers_on_one_sqlite_file_fire_each_due_time_once(tmp_path):
    """Two controllers' schedulers on one registry file, ticking at the same instant: never two runs of one due
    time (the (schedule, due time) row is the claim, written with the run's job in one transaction)."""
    path = tmp_path / "registry.sqlite3"
    registries = [SQLiteRegistry(path), SQLiteRegistry(path)]
    try:
        check_fired_once_each(race(registries, tmp_path))
    finally:
        for registry in registries:
            registry.close()


def test_a_schedule_keeps_its_newest_firings_only(tmp_path):
    """A schedule that fires every second for months must not grow the registry without end: the newest
    FIRINGS_KEPT firings stay, and a due time already passed is still never claimed twice."""
    registry = SQLiteRegistry(tmp_path / "registry.sqlite3")
    try:
        schedule = ScheduleRecord(
            "sch-many", "o", "many", "fn", period_s=1.0, anchor=0.0, next_due=1.0
        )
        registry.put_schedule(schedule)
        for due in range(1, FIRINGS_KEPT + 21):
            assert registry.claim_firing(
                FiringRecord("sch-many", float(due), due + 0.1, "skipped"), due + 1.0, None
            )
        kept = registry.list_firings("sch-many", limit=2 * FIRINGS_KEPT)
        assert len(kept) == FIRINGS_KEPT and kept[0].due_time == FIRINGS_KEPT + 20
        assert not registry.claim_firing(FiringRecord("sch-many", 5.0, 9e9, "started"), 6.0, None)
    finally:
        registry.close()


@pytest.mark.integration
def test_two_schedulers_on_one_dynamodb_table_fire_each_due_time_once(dynamodb_table, tmp_path):  # noqa: F811
    """The same race on DynamoDB (the moto server): a conditional put claims each due time."""
    from nanogrid_backend.registry.dynamodb import DynamoDBRegistry

    registries = [DynamoDBRegistry(dynamodb_table), DynamoDBRegistry(dynamodb_table)]
    check_fired_once_each(race(registries, tmp_path))


@pytest.mark.integration
def test_a_dynamodb_claim_left_half_done_is_moved_past_once_it_is_stale(dynamodb_table):  # noqa: F811
    """A controller that stopped between claiming a due time and moving its schedule on must not stop the schedule
    for good: a minute later the next scheduler moves it past that due time, and never fires it again."""
    import boto3

    from nanogrid_backend.registry.dynamodb import STALE_CLAIM_S, DynamoDBRegistry

    registry = DynamoDBRegistry(dynamodb_table)
    schedule = ScheduleRecord(
        "sch-stuck", "o", "stuck", "fn", period_s=60.0, anchor=0.0, next_due=60.0
    )
    registry.put_schedule(schedule)
    boto3.resource("dynamodb").Table(dynamodb_table).put_item(
        Item={  # the claim of a controller that then stopped
            "pk": "firing#sch-stuck#60.0",
            "kind": "firing",
            "schedule_id": "sch-stuck",
            "due_time": 60,
            "fired_at": 61,
            "outcome": "started",
        }
    )
    assert not registry.claim_firing(FiringRecord("sch-stuck", 60.0, 62.0, "started"), 120.0, None)
    stuck = registry.get_schedule("sch-stuck")
    assert (
        stuck is not None and stuck.next_due == 60.0
    )  # a claim this fresh is another scheduler's, racing
    late = 61 + STALE_CLAIM_S + 1
    assert not registry.claim_firing(FiringRecord("sch-stuck", 60.0, late, "started"), 180.0, None)
    moved = registry.get_schedule("sch-stuck")
    assert moved is not None and moved.next_due == 180.0
    assert [f.fired_at for f in registry.list_firings("sch-stuck")] == [61.0]


# --- on a grid ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedGrid]:
    """A grid whose operator lets failure webhooks reach loopback, where a test's receiver listens."""
    embedded = start_grid(
        tmp_path_factory.mktemp("schedules"),
        webhook_allow_networks=["127.0.0.0/8"],
        stem_cells=1,
        workers=3,
    )
    yield embedded
    embedded.stop()


@pytest.fixture()
def client(grid: EmbeddedGrid, monkeypatch: pytest.MonkeyPatch) -> Iterator[nanogrid.Client]:
    """A fresh owner on the module's grid (its key also the CLI's), so schedules of one test never show in
    another's."""
    key, _ = create_key(grid.grid.registry, "scheduler-" + uuid.uuid4().hex[:6])
    monkeypatch.setenv("NANOGRID_API_KEY", key)
    client = nanogrid.connect(grid.url)
    yield client
    for schedule in nanogrid.schedules(client):
        schedule.remove()


def firings(fn: nanogrid.RemoteFunction, outcome: str | None = None) -> list[dict]:
    info = fn.schedule_info()
    assert info is not None
    return [f for f in info.refresh().firings if outcome is None or f["outcome"] == outcome]


@pytest.mark.integration
def test_a_period_schedule_runs_its_function_as_ordinary_jobs_marked_schedule(client):
    """Each firing is a job in history with trigger 'schedule' and the function's result; a direct call stays
    'call'; the schedule's view says when it fired."""

    @nanogrid.remote(schedule=nanogrid.Period(seconds=1))
    def heartbeat():
        return "beat"

    heartbeat.deploy()
    started = wait_until(lambda: firings(heartbeat, "started")[1:], "two firings")
    job = nanogrid.Job.from_id(started[-1]["job_id"], client=client)
    assert job.result(timeout=30) == "beat"
    assert client.status(job.job_id)["trigger"] == "schedule"
    called = heartbeat.spawn()
    called.result(timeout=30)
    assert client.status(called.job_id)["trigger"] == "call"
    triggers = {item["job_id"]: item["trigger"] for item in heartbeat.history()}
    assert triggers[job.job_id] == "schedule" and triggers[called.job_id] == "call"
    assert all(not f["catch_up"] and f["missed"] == 1 for f in started)
    assert [s.name for s in nanogrid.schedules(client)] == ["heartbeat"]


@pytest.mark.integration
def test_deploying_a_new_version_points_the_schedule_at_it_and_keeps_its_timing(client):
    """Changed code is a new version: deploying it moves the schedule to that version, without a new due time."""
    label = "v1"

    @nanogrid.remote(schedule=nanogrid.Period(hours=1))
    def versioned():
        return label

    first_id = versioned.deploy()
    before = versioned.schedule_info()
    label = "v2"
    second_id = versioned.deploy()
    after = versioned.schedule_info()
    assert before is not None and after is not None and first_id != second_id
    assert (before.function_id, after.function_id) == (
        first_id,
        second_id,
    ) and after.next_due == before.next_due


@pytest.mark.integration
def test_a_run_still_going_makes_the_next_firing_skip_and_say_so(client):
    """overlap='skip': a due time that comes while the last run goes on starts nothing, and its firing says why;
    never two runs of the schedule at once."""

    @nanogrid.remote(schedule=nanogrid.Period(seconds=1))
    def slow():
        import time

        time.sleep(3)

    slow.deploy()
    skipped = wait_until(lambda: firings(slow, "skipped"), "a skipped firing")
    assert "still going" in skipped[0]["detail"] and skipped[0]["job_id"] is None
    runs = [client.status(f["job_id"]) for f in firings(slow, "started")]
    spans = sorted((r["created_at"], r["finished_at"] or float("inf")) for r in runs)
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:], strict=False))


@pytest.mark.integration
def test_overlap_queue_runs_the_next_firing_after_the_one_still_going(client):
    """overlap='queue': the firing waits for the run going on, then runs, after it, never beside it."""

    @nanogrid.remote(schedule=nanogrid.Period(seconds=1, overlap="queue"))
    def queued():
        import time

        time.sleep(2)

    queued.deploy()
    waited = wait_until(
        lambda: [f for f in firings(queued, "started") if "waits for" in f["detail"]],
        "a queued firing that started",
    )
    first, second = (
        client.status(job_id) for job_id in (waited[0]["detail"].split()[-1], waited[0]["job_id"])
    )
    second = client.status(second["job_id"], wait=30)
    assert second["trigger"] == "schedule" and second["started_at"] >= first["finished_at"]


@pytest.mark.integration
def test_pause_resume_and_remove_from_the_client_and_the_cli(client, grid, capsys):
    """A paused schedule starts nothing until resumed; a removed one is gone, its jobs stay in history."""

    @nanogrid.remote(schedule=nanogrid.Period(seconds=1))
    def paused():
        return 1

    paused.deploy()
    wait_until(lambda: firings(paused, "started"), "a first firing")
    assert cli.main(["schedules", "pause", "paused", "--url", grid.url]) == 0
    assert "paused" in capsys.readouterr().out
    before = len(firings(paused))
    time.sleep(2.5)  # more than two periods: a paused schedule must not fire in them
    info = paused.schedule_info()
    assert (
        info is not None and info.paused and info.next_due is None and len(info.firings) == before
    )
    info.resume()
    wait_until(lambda: len(firings(paused)) > before, "a firing after resuming")
    assert cli.main(["schedules", "list", "--url", grid.url]) == 0
    assert "paused" in capsys.readouterr().out  # the name, listed as active
    job_id = firings(paused, "started")[0]["job_id"]
    assert cli.main(["schedules", "remove", "paused", "--url", grid.url]) == 0
    assert paused.schedule_info() is None and nanogrid.schedules(client) == []
    assert client.status(job_id)["trigger"] == "schedule"
    assert cli.main(["schedules", "show", "paused", "--url", grid.url]) == 1
    assert "no schedule 'paused'" in capsys.readouterr().err


@pytest.mark.integration
def test_another_owner_can_never_see_pause_or_remove_a_schedule(client, grid):
    """Bob gets 404 for Alice's schedule by name on every route, sees none in his list, and cannot point a
    schedule of his at her function; hers keeps firing."""

    @nanogrid.remote(schedule=nanogrid.Period(seconds=1))
    def private():
        return "alice's"

    function_id = private.deploy()
    bob_key, _ = create_key(grid.grid.registry, "bob-" + uuid.uuid4().hex[:6])
    with httpx.Client(base_url=f"{grid.url}/v1", headers={"x-api-key": bob_key}, timeout=30) as bob:
        assert bob.get("/schedules").json() == []
        for method, path in (
            ("GET", "/schedules/private"),
            ("POST", "/schedules/private/pause"),
            ("POST", "/schedules/private/resume"),
            ("DELETE", "/schedules/private"),
        ):
            assert bob.request(method, path).status_code == 404
        taken = bob.put(
            "/schedules/private",
            json={"function_id": function_id, "period_s": 1, "args_pickle": ""},
        )
        assert taken.status_code == 404
    info = private.schedule_info()
    assert info is not None and not info.paused
    count = len(info.firings)
    wait_until(lambda: len(firings(private)) > count, "alice's schedule firing on")


@pytest.mark.integration
def test_a_failing_scheduled_run_is_retried_by_its_policy_and_reported_to_failure_webhooks(
    client, grid
):
    """A scheduled run is an ordinary call: its failure is tried again as ``retries=`` says, and the final failure
    reaches the owner's webhook with the scheduled job's id."""
    receiver = Receiver()
    try:
        hook = client.request(
            "POST", "/webhooks", json={"url": receiver.url, "events": ["failure"]}
        ).json()

        @nanogrid.remote(
            schedule=nanogrid.Period(hours=1), retries=1, retry_on=[RuntimeError], backoff=0
        )
        def nightly():
            raise RuntimeError("scheduled failure")

        nightly.deploy()
        registry = grid.grid.registry
        schedule = next(s for s in registry.list_schedules() if s.name == "nightly")
        registry.set_schedule_paused(
            schedule.schedule_id, False, time.time()
        )  # due now rather than in an hour
        body = verify(receiver.next(timeout=WAIT_S), hook["secret"])
        job = registry.get_job(body["nanogrid"]["job_id"])
        assert (
            job is not None
            and job.trigger == "schedule"
            and job.status == "failed"
            and job.attempt == 2
        )
        assert "scheduled failure" in body["text"]
    finally:
        receiver.close()


@pytest.mark.integration
def test_a_handler_function_is_scheduled_over_http_with_its_json_event(grid):
    """The HTTP API: a handler function's runs get the schedule's JSON event; a timing that cannot work is 422."""
    key, _ = create_key(grid.grid.registry, "http-" + uuid.uuid4().hex[:6])
    source = b"def handler(event, context):\n    return {'got': event}\n"
    with httpx.Client(base_url=f"{grid.url}/v1", headers={"x-api-key": key}, timeout=60) as http:
        function_id = http.post(
            "/upload",
            files={"file": ("report.py", source)},
            data={"handler": "report.handler", "function_name": "report"},
        ).json()["function_id"]
        for wrong, words in (
            ({"cron": "0 25 * * *"}, "Bad hour"),
            ({"cron": "0 * * * *", "period_s": 60}, "either"),
            ({"period_s": 0.1}, "at least 1 s"),
            ({"period_s": 5, "timezone": "Nowhere/City"}, "zone"),
            ({"period_s": 5, "args_pickle": "gAN9cQAu"}, "handler function"),
        ):
            refused = http.put("/schedules/report", json={"function_id": function_id, **wrong})
            assert refused.status_code == 422 and words in refused.json()["detail"], refused.text
        made = http.put(
            "/schedules/report",
            json={"function_id": function_id, "period_s": 1, "payload": {"tag": "t1"}},
        )
        assert made.status_code == 200, made.text
        fired = wait_until(
            lambda: [f for f in http.get("/schedules/report").json()["firings"] if f["job_id"]],
            "a firing",
        )
        job = http.get(f"/status/{fired[0]['job_id']}", params={"wait": 30}).json()
        assert job["trigger"] == "schedule" and job["result"] == {"got": {"tag": "t1"}}
        assert http.delete("/schedules/report").status_code == 200


# --- across a restart ---------------------------------------------------------------------------------------------


def every_second() -> nanogrid.RemoteFunction:
    @nanogrid.remote(schedule=nanogrid.Period(seconds=1))
    def restarted():
        return "ran"

    return restarted


@pytest.mark.integration
def test_a_restart_right_after_a_firing_never_fires_that_due_time_again(tmp_path):
    """Stop the grid just after a firing, start it again on the same data dir: every due time has one firing and
    one job, and the first firing after the restart is a catch-up for all the due times missed while down."""
    first = start_grid(tmp_path / "data")
    try:
        nanogrid.connect(first.url, api_key=first.api_key)
        fn = every_second()
        fn.deploy()
        fired = wait_until(lambda: firings(fn, "started"), "a firing")
    finally:
        first.stop()  # right after it
    time.sleep(3.5)  # down for three due times or more
    second = start_grid(tmp_path / "data")
    try:
        nanogrid.connect(second.url, api_key=second.api_key)
        fn = every_second()
        after = wait_until(
            lambda: [f for f in firings(fn) if f["due_time"] > fired[0]["due_time"]][1:],
            "two firings after the restart",
        )
        everything = firings(fn)
        dues = [f["due_time"] for f in everything]
        assert len(dues) == len(set(dues))
        catch_up = min(after, key=lambda f: f["due_time"])
        assert catch_up["catch_up"] and catch_up["missed"] >= 3 and "catch-up" in catch_up["detail"]
        scheduled = [j for j in second.grid.registry.list_jobs(limit=-1) if j.trigger == "schedule"]
        assert sorted(j.job_id for j in scheduled) == sorted(
            f["job_id"] for f in everything if f["job_id"]
        )
    finally:
        second.stop()


@pytest.mark.integration
def test_two_controllers_on_the_aws_adapters_start_one_run_per_due_time(tmp_path):
    """Two controllers (each with its scheduler) over SQS, DynamoDB and Redis on loopback: every due time of a
    schedule is one firing and one job, whichever controller claimed it; both show the same schedule."""
    require(
        shutil.which("redis-server") is not None,
        "redis-server is not installed (apt-get install redis-server)",
    )
    cluster = Cluster(tmp_path, workers=1)
    try:
        client = nanogrid.connect(cluster.url, api_key=cluster.key)
        fn = every_second()
        fn.deploy()
        wait_until(lambda: len(firings(fn, "started")) >= 6, "six firings")
        info = fn.schedule_info()
        assert info is not None
        info.pause()  # then the jobs and the firings settle, and must agree one to one

        def shown(url: str) -> list[dict]:
            return (
                nanogrid.Client(url, api_key=cluster.key)
                .request("GET", "/schedules/restarted", params={"limit": 1000})
                .json()["firings"]
            )

        def agreeing() -> list[dict] | None:
            every = shown(cluster.url2)
            scheduled = {j["job_id"] for j in client.jobs(limit=1000) if j["trigger"] == "schedule"}
            return every if scheduled == {f["job_id"] for f in every if f["job_id"]} else None

        every = wait_until(agreeing, "the scheduled jobs and the firings to agree")
        dues = [f["due_time"] for f in every]
        assert len(dues) == len(set(dues)) and len(dues) >= 6 and shown(cluster.url) == every
    finally:
        cluster.stop()
