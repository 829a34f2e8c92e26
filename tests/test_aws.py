"""Many processes on the AWS adapters: a controller and three workers over SQS, S3, DynamoDB and Redis.

The services are real protocol servers started here on loopback: the moto server (the AWS wire
protocol over HTTP) and Debian's redis-server. The product talks to them through boto3 and redis-py
exactly as it would to AWS; only the endpoint differs (AWS_ENDPOINT_URL).
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator

import boto3
import httpx
import pytest

import nanogrid
from tests.aws_cluster import VISIBILITY_S, Cluster
from tests.conftest import require

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require(
        shutil.which("redis-server") is not None,
        "redis-server is not installed (apt-get install redis-server)",
    )
    running = Cluster(tmp_path_factory.mktemp("aws"))
    try:
        client = nanogrid.Client(running.url, api_key=running.key)
        deadline = time.monotonic() + 60
        while len(client.system_status()["workers"]) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        yield running
    finally:
        running.stop()


@pytest.fixture()
def client(cluster: Cluster) -> nanogrid.Client:
    return nanogrid.connect(cluster.url, api_key=cluster.key)


@nanogrid.remote(timeout=60)
def triple(x):
    return 3 * x


@nanogrid.remote(timeout=60)
def nap(seconds):
    import time

    time.sleep(seconds)
    return seconds


def test_five_hundred_jobs_from_twenty_clients_each_delivered_once(client, cluster):
    results: dict[int, tuple[str, int]] = {}
    errors: list[BaseException] = []
    # half the clients talk to the second controller, which never saw the first one's jobs
    via_second = nanogrid.RemoteFunction(
        triple.fn, client=nanogrid.Client(cluster.url2, api_key=cluster.key)
    )

    def caller(offset: int) -> None:
        function = triple if offset % 2 else via_second
        try:
            for i in range(offset, 500, 20):
                job = function.spawn(i)
                results[i] = (job.job_id, job.result(timeout=120))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:3]
    assert sorted(results) == list(range(500))
    assert all(value == 3 * i for i, (_, value) in results.items())
    job_ids = [job_id for job_id, _ in results.values()]
    assert len(set(job_ids)) == 500
    records = [
        j for j in client.jobs(limit=1000) if j["job_id"] in set(job_ids)
    ]  # read through controller 1
    assert len(records) == 500 and {r["status"] for r in records} == {"completed"}
    assert len({r["worker_id"] for r in records}) >= 2  # the work spread over the workers
    status = client.system_status()
    assert len(status["workers"]) == 3
    metrics = httpx.get(f"{cluster.url}/metrics").text
    assert "nanogrid_backlog_per_worker" in metrics and "nanogrid_workers 3.0" in metrics
    cloudwatch = boto3.client(
        "cloudwatch",
        endpoint_url=cluster.env["AWS_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    published = cloudwatch.list_metrics(Namespace="NanoGrid")["Metrics"]
    assert any(m["MetricName"] == "BacklogPerInstance" for m in published)


def test_a_killed_worker_leaves_its_job_to_another(client, cluster):
    job = nap.spawn(3)
    deadline = time.monotonic() + 30
    while job.status != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    victim = job.worker_id
    pid = int(victim.split("-")[-2])  # worker ids are host-pid-suffix
    os.kill(pid, signal.SIGKILL)
    started = time.monotonic()
    assert job.result(timeout=90) == 3
    assert job.worker_id != victim
    assert (
        time.monotonic() - started >= VISIBILITY_S - 1
    )  # it waited out the dead worker's visibility
    name = next(n for n, p in cluster.procs.items() if p.pid == pid)
    cluster.start_worker(int(name.removeprefix("worker")))


def test_async_results_survive_a_controller_restart(client, cluster):
    jobs = [nap.spawn(1) for _ in range(4)]
    cluster.procs["controller"].terminate()
    cluster.procs["controller"].wait(15)
    cluster.start_controller()
    assert [job.result(timeout=60) for job in jobs] == [1, 1, 1, 1]


def test_grid_carries_on_after_redis_restarts(client, cluster):
    assert triple.remote(1) == 3
    cluster.redis.stop()
    time.sleep(0.5)
    cluster.redis.start()
    deadline = time.monotonic() + 30
    while True:
        try:
            assert triple.remote(2) == 6
            break
        except (nanogrid.APIError, nanogrid.NotConnected):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    assert [triple.remote(i) for i in range(5)] == [0, 3, 6, 9, 12]


def test_a_job_that_always_crashes_its_sandbox_ends_in_the_dead_letter_queue(client, cluster):
    @nanogrid.remote(timeout=30)
    def crash():
        import os

        os._exit(3)

    job = crash.spawn()
    with pytest.raises(nanogrid.JobFailed) as info:
        job.result(timeout=120)
    assert info.value.kind == "dead_letter"
    assert "dead-letter queue" in str(info.value) and "exit code 3" in str(info.value)
    assert triple.remote(7) == 21  # and the grid carries on


def test_a_volume_is_one_volume_for_every_worker(
    client: nanogrid.Client, cluster: Cluster, tmp_path
) -> None:
    """A volume lives in S3 and each worker syncs its copy around calls: never a call, on whichever worker, missing
    what the client put or what an earlier call on another worker wrote; never a file a call removed coming back."""
    vol = nanogrid.Volume("shared", size_mib=32, client=client)
    source = tmp_path / "train.csv"
    source.write_bytes(b"a,b\n1,2\n" * 100)
    vol.put(source, "raw/train.csv")

    @nanogrid.remote(timeout=60, volumes={"/data": vol})
    def note(n: int) -> int:
        import time

        with open(f"/data/notes/{n}.txt", "w") as f:
            f.write(f"call {n}")
        time.sleep(0.3)  # the calls overlap, so they spread over the workers
        return len(open("/data/raw/train.csv", "rb").read())

    (tmp_path / "empty").write_bytes(b"")
    vol.put(tmp_path / "empty", "notes/.keep")  # a put makes the directories above the file
    jobs = [note.spawn(n) for n in range(12)]
    assert {job.result() for job in jobs} == {source.stat().st_size}
    assert len({job.worker_id for job in jobs}) >= 2, (
        "the calls all ran on one worker: nothing was shared"
    )

    @nanogrid.remote(timeout=60, volumes={"/data": vol})
    def read_notes(_: int) -> list[str]:
        import os

        return sorted(
            open(f"/data/notes/{name}").read()
            for name in os.listdir("/data/notes")
            if name != ".keep"
        )

    expected = sorted(f"call {n}" for n in range(12))
    readers = [read_notes.spawn(n) for n in range(6)]
    assert all(job.result() == expected for job in readers)
    assert len({job.worker_id for job in readers}) >= 2
    assert sorted(e["name"] for e in vol.listdir("notes")) == sorted(
        [".keep"] + [f"{n}.txt" for n in range(12)]
    )

    @nanogrid.remote(timeout=60, volumes={"/data": vol})
    def tidy(_: int) -> None:
        import contextlib
        import os

        with contextlib.suppress(FileNotFoundError):
            os.remove("/data/notes/0.txt")

    list(tidy.map(range(3)))
    assert all(len(seen) == 11 for seen in read_notes.map(range(6)))
    assert vol.read("raw/train.csv") == source.read_bytes()
