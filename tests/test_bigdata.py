"""Big data: limits the grid owns, content-addressed blobs for arguments and results, and the channel's checks.

Written from the faulty world's side: a forged or broken upload, another owner, an oversized value,
a sandbox that lies about a streamed result. Real grids (process and Docker sandboxes), real HTTP.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import cloudpickle
import httpx
import pytest

import nanogrid
from nanogrid.transfer import ArgsEncoder, ArgsUnpickler
from nanogrid_backend.keys import create_key
from nanogrid_backend.store.blobs import key_for
from tests.aws_cluster import Cluster
from tests.conftest import require, require_docker, start_grid, tmpfs

pytestmark = pytest.mark.integration

MiB = 1 << 20


@pytest.fixture(scope="module", params=["process", "docker"])
def bigrid(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict]:
    """A grid with a 4 MiB cap per argument and 3 MiB per result, two owners."""
    if request.param == "docker":
        require_docker()
    data_dir = tmp_path_factory.mktemp(f"bigdata-{request.param}")
    grid = start_grid(
        data_dir,
        sandbox=request.param,
        workers=2,
        pool_cap=3,
        stem_cells=1,
        kill_grace_s=0.5,
        max_payload_bytes=4 * MiB,
        max_result_bytes=3 * MiB,
    )
    alice, _ = create_key(grid.grid.registry, "alice")
    bob, _ = create_key(grid.grid.registry, "bob")
    try:
        yield {"grid": grid, "alice": alice, "bob": bob, "data_dir": data_dir}
    finally:
        grid.stop()


def as_owner(env: dict, who: str) -> nanogrid.Client:
    return nanogrid.connect(env["grid"].url, api_key=env[who])


def blob_files(env: dict) -> list[Path]:
    root = env["data_dir"] / "store" / "blobs"
    return [p for p in root.rglob("*") if p.is_file()]


def test_the_client_learns_the_limits_from_the_grid_and_names_the_argument_over_them(bigrid):
    """What must never happen: a value over the grid's limit is uploaded, or refused without saying which it is."""
    client = as_owner(bigrid, "alice")
    assert (
        client.limits()["max_payload_bytes"] == 4 * MiB
        and client.limits()["blob_threshold_bytes"] == MiB
    )

    @nanogrid.remote(timeout=30)
    def takes(small, big=None):
        return 1

    before = blob_files(bigrid)
    with pytest.raises(
        nanogrid.InvalidArgument,
        match=r"argument 'big' pickles to 5\.0 MiB, over the grid's 4\.0 MiB",
    ):
        takes.remote(b"x" * (2 * MiB), big=b"y" * (5 * MiB))
    assert blob_files(bigrid) == before  # not even the argument under the limit was uploaded


def test_large_arguments_travel_once_as_blobs_and_results_come_back_whole(bigrid):
    """What must never happen: a shared argument is uploaded once per call, or a value arrives changed."""
    as_owner(bigrid, "alice")
    data = os.urandom(2 * MiB)

    @nanogrid.remote(timeout=60, memory=512)
    def digest(blob, salt):
        import hashlib

        return hashlib.sha256(blob).hexdigest() + salt

    @nanogrid.remote(timeout=60, memory=512)
    def grow(blob):
        return blob + blob[: MiB // 2]

    expected = hashlib.sha256(data).hexdigest()
    before = set(blob_files(bigrid))
    assert list(digest.map([data] * 6, [str(i) for i in range(6)])) == [
        expected + str(i) for i in range(6)
    ]
    assert len(set(blob_files(bigrid)) - before) == 1  # one blob for the six calls
    ref = nanogrid.put(data)
    assert digest.remote(ref, "r") == expected + "r"
    assert grow.remote(data) == data + data[: MiB // 2]  # a 2.5 MiB result, streamed through a blob


def test_a_result_over_the_grids_limit_fails_clearly_and_the_grid_serves_on(bigrid):
    """What must never happen: an oversized result is stored, or its sandbox serves another call."""
    as_owner(bigrid, "alice")

    @nanogrid.remote(timeout=60, memory=512)
    def huge(n):
        return b"z" * n

    with pytest.raises(nanogrid.JobFailed, match="over the grid's 3 MiB limit"):
        huge.remote(4 * MiB)
    assert len(huge.remote(2 * MiB)) == 2 * MiB


def test_another_owners_blob_does_not_exist_for_you(bigrid):
    """What must never happen: knowing a blob's hash is enough to read or use another owner's data."""
    client = as_owner(bigrid, "alice")
    ref = nanogrid.put(b"alice's secret " * 100_000)
    http = httpx.Client(base_url=bigrid["grid"].url, headers={"x-api-key": bigrid["bob"]})
    assert http.head(f"/v1/blobs/{ref.sha256}").status_code == 404
    assert http.get(f"/v1/blobs/{ref.sha256}").status_code == 404
    assert (
        cloudpickle.loads(client.download_blob(ref.sha256, ref.size))
        == b"alice's secret " * 100_000
    )

    as_owner(bigrid, "bob")

    @nanogrid.remote(timeout=30)
    def peek(value):
        return value

    with pytest.raises(nanogrid.APIError, match="no blob"):
        peek.remote(ref)


def test_an_upload_that_does_not_hash_to_its_name_or_breaks_off_is_never_a_blob(bigrid):
    """What must never happen: a corrupted or partial upload is stored under the name of the data it claims."""
    headers = {"x-api-key": bigrid["alice"]}
    good = os.urandom(3 * MiB)
    name = hashlib.sha256(good).hexdigest()
    http = httpx.Client(base_url=bigrid["grid"].url, headers=headers)
    forged_bytes = good[:-1] + bytes([good[-1] ^ 1])  # its last byte differs, whatever it was
    forged = http.put(f"/v1/blobs/{name}", content=forged_bytes)
    assert forged.status_code == 400 and "does not hash" in forged.json()["detail"]
    assert http.head(f"/v1/blobs/{name}").status_code == 404
    assert http.put("/v1/blobs/../../etc", content=b"x").status_code in (400, 404)
    assert http.put(f"/v1/blobs/{'A' * 64}", content=b"x").status_code == 400

    # A client that announces 3 MiB, sends half and disconnects.
    host, port = httpx.URL(bigrid["grid"].url).host, httpx.URL(bigrid["grid"].url).port
    with socket.create_connection((host, port)) as sock:
        sock.sendall(
            f"PUT /v1/blobs/{name} HTTP/1.1\r\nHost: x\r\nx-api-key: {bigrid['alice']}\r\n"
            f"Content-Length: {len(good)}\r\n\r\n".encode()
            + good[: len(good) // 2]
        )
    assert http.head(f"/v1/blobs/{name}").status_code == 404
    spool = bigrid["data_dir"] / "store" / "blob-spool"
    assert (
        http.put(f"/v1/blobs/{name}", content=good).status_code == 201
    )  # a whole upload afterwards is taken
    assert not [p for p in spool.iterdir() if p.suffix == ".part"]
    assert http.get(f"/v1/blobs/{name}").content == good
    assert http.put(f"/v1/blobs/{name}", content=os.urandom(5 * MiB)).status_code == 413


def test_a_sandbox_lying_about_its_streamed_result_is_discarded(bigrid):
    """What must never happen: a forged result stream is stored, or makes the host read past its caps."""
    as_owner(bigrid, "alice")

    @nanogrid.remote(timeout=30)
    def liar(kind):
        import json
        import os
        import sys

        boot = sys.modules["__main__"]
        reply = {
            "ok": True,
            "result_format": "pickle",
            "result_size": 2 << 20,
            "stdout": "",
            "stderr": "",
        }
        if kind == "over":
            reply["result_size"] = 1 << 40
        header = json.dumps(reply).encode()
        for n in [int(n) for n in os.listdir("/proc/self/fd") if int(n) > 2]:
            try:
                os.write(n, boot.struct.pack(">II", len(header), 0) + header)
                if kind == "more":  # a piece larger than what was announced
                    piece = json.dumps({"op": "result_data"}).encode()
                    os.write(
                        n, boot.struct.pack(">II", len(piece), 3 << 20) + piece + b"x" * (3 << 20)
                    )
            except OSError:
                pass
        os._exit(0)

    for kind in ("over", "more", "short"):
        with pytest.raises(nanogrid.JobFailed):
            liar.remote(kind)
    spooled = list((bigrid["data_dir"]).rglob("*.result"))
    assert not spooled


def test_the_args_codec_pickles_each_argument_once_and_resolves_refs():
    """What must never happen: a value shared by many calls of one encoder is uploaded more than once."""

    class Recorder:
        def __init__(self) -> None:
            self.uploads: list[bytes] = []

        def limits(self) -> dict:
            return {"max_payload_bytes": 64 * MiB, "blob_threshold_bytes": MiB}

        def upload_blob(self, data: bytes) -> nanogrid.Ref:
            self.uploads.append(data)
            return nanogrid.Ref(hashlib.sha256(data).hexdigest(), len(data))

    client = Recorder()
    encoder = ArgsEncoder(client)  # type: ignore[arg-type]
    shared = list(range(400_000))
    calls = [encoder.encode((shared, i), {"flag": shared}) for i in range(50)]
    assert len(client.uploads) == 1 and all(blobs == calls[0][1] for _, blobs in calls)
    args, kwargs = ArgsUnpickler(calls[7][0], client.uploads).load()
    assert args == [shared, 7] and kwargs == {"flag": shared}
    assert key_for("alice", calls[0][1][0]) != key_for("bob", calls[0][1][0])


# --- results as Refs, and Refs anywhere inside an argument -------------------------------------------------


def no_data_through_this_machine(client: nanogrid.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on the client may neither download nor upload a blob: what moves must move on the grid."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a blob's data went through the client")

    monkeypatch.setattr(client, "download_blob", refuse)
    monkeypatch.setattr(client, "upload_blob", refuse)


def test_a_jobs_result_goes_to_the_next_call_as_a_ref_without_coming_back(bigrid, monkeypatch):
    """What must never happen: a result passed on is downloaded and uploaded again, arrives changed, or two uses of
    one Ref become two copies in the sandbox."""
    client = as_owner(bigrid, "alice")

    @nanogrid.remote(timeout=60, memory=512)
    def make(n, fill):
        return fill * n

    @nanogrid.remote(timeout=60, memory=512)
    def describe(values, table=None):
        import hashlib

        same = values[0] is values[2]
        return (
            [hashlib.sha256(v).hexdigest()[:16] for v in values],
            same,
            {k: len(v) for k, v in (table or {}).items()},
        )

    big_job, small_job = (
        make.spawn(2 * MiB, b"b"),
        make.spawn(1000, b"s"),
    )  # a blob result and an inline one
    big, small = big_job.ref(), small_job.ref()
    assert big.size > 2 * MiB and small.size < MiB
    no_data_through_this_machine(client, monkeypatch)
    short = [
        hashlib.sha256(b"b" * 2 * MiB).hexdigest()[:16],
        hashlib.sha256(b"s" * 1000).hexdigest()[:16],
    ]
    assert describe.remote([big, small, big], table={"a": small, "b": big}) == (
        [short[0], short[1], short[0]],
        True,
        {"a": 1000, "b": 2 * MiB},
    )
    monkeypatch.undo()
    # A Ref inside an argument that is itself large enough to travel as a blob still resolves.
    padded = {"pad": os.urandom(2 * MiB), "refs": [small, big, small]}
    assert describe.remote(padded["refs"] + [padded["pad"]])[0][:3] == [
        short[1],
        short[0],
        short[1],
    ]

    @nanogrid.remote(timeout=60)
    def unpack(arg):
        return len(arg["pad"]), [len(v) for v in arg["refs"]]

    assert unpack.remote(padded) == (2 * MiB, [1000, 2 * MiB, 1000])
    assert small_job.ref() == small  # asked again: the same blob, nothing copied twice


def test_refs_that_are_not_the_callers_are_refused_at_submit_naming_them(bigrid):
    """What must never happen: another owner's result or an invented hash reaches a sandbox, or a refusal that
    does not say which blob."""
    as_owner(bigrid, "alice")

    @nanogrid.remote(timeout=30)
    def secret():
        return b"alice's result " * 10

    @nanogrid.remote(timeout=30)
    def peek(values):
        return values

    job = secret.spawn()
    ref = job.ref()
    bob = httpx.Client(base_url=bigrid["grid"].url, headers={"x-api-key": bigrid["bob"]})
    assert (
        bob.post(f"/v1/jobs/{job.job_id}/ref").status_code == 404
    )  # her job does not exist for him
    assert bob.head(f"/v1/blobs/{ref.sha256}").status_code == 404

    as_owner(bigrid, "bob")
    with pytest.raises(nanogrid.APIError, match=f"no blob {ref.sha256[:12]}") as refused:
        peek.remote({"stolen": [ref]})
    assert refused.value.status == 404
    invented = nanogrid.Ref("0" * 64, 10)
    with pytest.raises(nanogrid.APIError, match="no blob 000000000000"):
        peek.remote([invented])


def test_what_has_no_value_to_pass_on_is_refused_clearly(bigrid):
    """What must never happen: a Ref to a failed job's nothing, to JSON data, or a Job pickled as an argument."""
    client = as_owner(bigrid, "alice")

    @nanogrid.remote(timeout=30)
    def fails():
        return 1 / 0

    @nanogrid.remote(timeout=30, result="json")
    def data():
        return {"a": 1}

    @nanogrid.remote(timeout=30)
    def takes(value):
        return value

    failed = fails.spawn()
    with pytest.raises(nanogrid.JobFailed, match="no result to pass on.*division by zero"):
        failed.ref()
    as_json = data.spawn()
    with pytest.raises(nanogrid.InvalidArgument, match=r"result='json'.*job.result\(\)"):
        as_json.ref()
    as_json.wait()
    with pytest.raises(nanogrid.APIError, match=r"result='json'") as refused:
        client.result_ref(as_json.job_id)
    assert refused.value.status == 422
    with pytest.raises(nanogrid.InvalidArguments, match=r"pass job.ref\(\)"):
        takes.remote(failed)
    ref = takes.spawn(5).ref()
    with pytest.raises(nanogrid.InvalidArguments, match="resolved only inside a call's arguments"):
        nanogrid.put([ref])


# --- blob space, a full disk, a damaged blob ------------------------------------------------------------------


def test_the_grid_counts_each_owners_blobs(bigrid):
    """What must never happen: blob space that misses an upload or a stored result, or shows one owner another's."""
    client = as_owner(bigrid, "alice")
    before = client.system_status()["blobs"]
    bob_before = nanogrid.Client(bigrid["grid"].url, api_key=bigrid["bob"]).system_status()["blobs"]
    ref = nanogrid.put(os.urandom(MiB))

    @nanogrid.remote(timeout=60)
    def result(n):
        return b"q" * n

    result.remote(2 * MiB + 17)  # stored as a blob by the worker
    after = client.system_status()["blobs"]
    assert after["count"] == before["count"] + 2
    assert after["bytes"] >= before["bytes"] + ref.size + 2 * MiB
    assert (
        nanogrid.Client(bigrid["grid"].url, api_key=bigrid["bob"]).system_status()["blobs"]
        == bob_before
    )
    on_disk = [p for p in blob_files(bigrid)]
    assert after["count"] <= len(on_disk) and after["bytes"] <= sum(
        p.stat().st_size for p in on_disk
    )
    env = {**os.environ, "NANOGRID_URL": bigrid["grid"].url, "NANOGRID_API_KEY": bigrid["alice"]}
    shown = subprocess.run(
        [sys.executable, "-m", "nanogrid.cli", "status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert f"blobs     {after['count']} stored, {after['bytes'] / MiB:.1f} MiB" in shown.stdout, (
        shown.stderr
    )


def test_a_blob_damaged_on_disk_never_reaches_the_function(bigrid):
    """What must never happen: bytes changed on disk after the upload are given to a function as the value."""
    client = as_owner(bigrid, "alice")
    value = os.urandom(2 * MiB)

    @nanogrid.remote(timeout=60, memory=512)
    def size_of(values):
        return [len(v) for v in values]

    ref = nanogrid.put(value)
    assert size_of.remote([ref]) == [2 * MiB]
    path = next(p for p in blob_files(bigrid) if p.name == ref.sha256)
    with path.open("r+b") as f:  # one byte flipped in place: the same size, the same name
        f.seek(MiB)
        byte = f.read(1)
        f.seek(MiB)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(
        nanogrid.JobFailed, match=f"blob {ref.sha256[:12]}… is damaged.*not given to the function"
    ):
        size_of.remote([ref])
    with pytest.raises(
        nanogrid.APIError, match="no blob"
    ):  # deleted, so that an upload can heal it
        size_of.remote([ref])
    assert (
        client.upload_blob(cloudpickle.dumps(value, protocol=5)) == ref
    )  # the client asks the grid again
    assert size_of.remote([ref]) == [2 * MiB]


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 20 MiB tmpfs for a grid's data dir."""
    with tmpfs(tmp_path / "small", 20) as mount:
        yield mount


def test_a_blob_upload_onto_a_full_disk_answers_507_and_the_grid_serves_on(small_disk):
    """What must never happen: a half-written blob, a damaged registry, or an internal error instead of 507."""
    grid = start_grid(
        small_disk / "data",
        sandbox="process",
        workers=1,
        stem_cells=1,
        pool_cap=2,
        kill_grace_s=0.5,
    )
    try:
        client = nanogrid.connect(grid.url, api_key=grid.api_key, timeout=30)

        @nanogrid.remote(timeout=30)
        def double(x):
            return 2 * x

        assert double.remote(1) == 2
        space = client.system_status()["blobs"]
        with pytest.raises(nanogrid.APIError, match="disk is full") as full:
            nanogrid.put(os.urandom(24 * MiB))
        assert full.value.status == 507
        spool = small_disk / "data" / "store" / "blob-spool"
        assert not [p for p in spool.iterdir() if p.suffix == ".part"]
        assert client.system_status()["blobs"] == space
        assert double.remote(2) == 4 and list(double.map(range(3))) == [0, 2, 4]
        with sqlite3.connect(f"file:{grid.grid.registry.path}?mode=ro", uri=True) as db:
            assert db.execute("PRAGMA quick_check").fetchone() == ("ok",)
        ref = nanogrid.put(os.urandom(2 * MiB))  # space enough again: taken
        assert double.remote([ref]) is not None
    finally:
        grid.stop()


# --- blobs on S3 (the AWS adapters against the moto server, redis-server) ---------------------------------------


@pytest.fixture(scope="module")
def s3grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two controllers and one worker on SQS, S3, DynamoDB and Redis, all on loopback."""
    require(
        shutil.which("redis-server") is not None,
        "redis-server is not installed (apt-get install redis-server)",
    )
    running = Cluster(tmp_path_factory.mktemp("aws-blobs"), workers=1, slots=1)
    try:
        client = nanogrid.Client(running.url, api_key=running.key)
        deadline = time.monotonic() + 60
        while not client.system_status()["workers"] and time.monotonic() < deadline:
            time.sleep(0.2)
        yield running
    finally:
        running.stop()


def test_blobs_on_s3_carry_arguments_results_and_refs(s3grid):
    """What must never happen: a blob on S3 that cannot be read back whole, a call that loses its blob argument or
    result between controllers and workers, or a damaged S3 object given to a function."""
    client = nanogrid.connect(s3grid.url, api_key=s3grid.key)
    value = os.urandom(3 * MiB)
    ref = nanogrid.put(value)
    http = httpx.Client(
        base_url=s3grid.url2, headers={"x-api-key": s3grid.key}
    )  # the other controller
    head = http.head(f"/v1/blobs/{ref.sha256}")
    assert head.status_code == 200 and int(head.headers["content-length"]) == ref.size
    assert cloudpickle.loads(http.get(f"/v1/blobs/{ref.sha256}").content) == value
    env = s3grid.env
    s3 = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        region_name=env["AWS_DEFAULT_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )
    bucket = env["S3_USER_DATA_BUCKET"]
    stored = [
        item["Key"]
        for item in s3.list_objects_v2(Bucket=bucket, Prefix="data/").get("Contents", [])
    ]
    assert [key for key in stored if key.endswith(ref.sha256)]

    @nanogrid.remote(timeout=60, memory=512)
    def grow(blob):
        return blob + blob[:MiB]

    @nanogrid.remote(timeout=60, memory=512)
    def lengths(values):
        return [len(v) for v in values]

    assert grow.remote(value) == value + value[:MiB]  # a blob argument and a blob result
    job = grow.spawn(ref)
    assert lengths.remote([job.ref(), ref, job.ref()]) == [4 * MiB, 3 * MiB, 4 * MiB]
    space = client.system_status()[
        "blobs"
    ]  # the argument and the result, one blob each however often used
    assert space["count"] >= 2 and space["bytes"] >= ref.size + 4 * MiB

    damaged = nanogrid.put(os.urandom(2 * MiB))
    key = next(
        item["Key"]
        for item in s3.list_objects_v2(Bucket=bucket, Prefix="data/")["Contents"]
        if item["Key"].endswith(damaged.sha256)
    )
    s3.put_object(Bucket=bucket, Key=key, Body=b"not what was uploaded")
    with pytest.raises(nanogrid.JobFailed, match=f"blob {damaged.sha256[:12]}… is damaged"):
        lengths.remote([damaged])
