"""Direct uploads: on S3, blob arguments go from the client straight to the bucket through presigned URLs.

Written from the side of what must never happen: a value lost on the way (the direct path fails, the store
refuses, the client cannot reach the store), wrong bytes at a presigned URL reaching a function, an owner getting
a URL that writes into another owner's blobs, or a URL for more than the grid takes. Real components: the moto
server for S3 (and SQS, DynamoDB), a real redis-server, controllers and a worker as processes (tests/aws_cluster.py).

moto checks neither presigned signatures, expiry nor checksums: it stores whatever body a presigned URL is sent.
So these tests show the grid's own refusal (the worker hashes each blob it fetches); real S3 refuses such a body
at upload already, because the URL signs its length and SHA-256 (asserted on the URL itself).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import time
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import boto3
import cloudpickle
import httpx
import pytest

import nanogrid
from nanogrid_backend.store.blobs import key_for
from tests.aws_cluster import Cluster, free_port
from tests.conftest import require

pytestmark = pytest.mark.integration

MiB = 1 << 20
PUT_ROUTE = ("PUT", "/v1/blobs/{sha256}")
OFFER_ROUTE = ("POST", "/v1/blobs/{sha256}/upload")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two controllers and one worker on SQS, S3, DynamoDB and Redis, all on loopback; the owner tester."""
    require(
        shutil.which("redis-server") is not None,
        "redis-server is not installed (apt-get install redis-server)",
    )
    running = Cluster(tmp_path_factory.mktemp("s3-direct"), workers=1, slots=1)
    try:
        client = nanogrid.Client(running.url, api_key=running.key)
        deadline = time.monotonic() + 60
        while not client.system_status()["workers"] and time.monotonic() < deadline:
            time.sleep(0.2)
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def other_key(cluster: Cluster) -> str:
    """The key of a second owner, other."""
    return cluster.cli("keys", "create", "other").strip()


@pytest.fixture(autouse=True)
def direct_uploads_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NANOGRID_DIRECT_UPLOADS", raising=False)


def s3_of(cluster: Cluster):  # noqa: ANN201 (boto3 clients are untyped)
    env = cluster.env
    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        region_name=env["AWS_DEFAULT_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )


def requests_to(url: str, route: tuple[str, str]) -> int:
    """How many requests this controller has answered on a route (its /metrics request histogram)."""
    method, path = route
    text = httpx.get(f"{url}/metrics").text
    pattern = re.compile(r"^http_request_duration_seconds_count\{(.*)\} (\S+)$", re.M)
    return sum(
        int(float(count))
        for labels, count in pattern.findall(text)
        if f'method="{method}"' in labels and f'route="{path}"' in labels
    )


def offer(url: str, key: str, sha256: str, size: int) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/blobs/{sha256}/upload", params={"size": size}, headers={"x-api-key": key}
    )


@nanogrid.remote(timeout=60, memory=512)
def lengths(values):
    print("ran")
    return [len(v) for v in values]


def test_a_blob_argument_goes_straight_to_s3_and_not_through_the_controller(cluster):
    nanogrid.connect(cluster.url, api_key=cluster.key)
    s3, bucket = s3_of(cluster), cluster.env["S3_USER_DATA_BUCKET"]
    puts, offers = requests_to(cluster.url, PUT_ROUTE), requests_to(cluster.url, OFFER_ROUTE)
    value, argument = os.urandom(3 * MiB), os.urandom(2 * MiB)
    ref = nanogrid.put(value)
    assert lengths.remote([ref, argument]) == [
        3 * MiB,
        2 * MiB,
    ]  # a Ref and a plain argument over the threshold
    assert requests_to(cluster.url, PUT_ROUTE) == puts  # neither went through the controller...
    assert requests_to(cluster.url, OFFER_ROUTE) >= offers + 2  # ...both were offered a URL
    stored = s3.head_object(
        Bucket=bucket, Key=key_for("tester", ref.sha256), ChecksumMode="ENABLED"
    )
    assert stored["ContentLength"] == ref.size  # in the owner's own scope, whole
    assert stored.get("ChecksumSHA256") in (
        None,
        base64.b64encode(bytes.fromhex(ref.sha256)).decode(),
    )
    got = s3.get_object(Bucket=bucket, Key=key_for("tester", ref.sha256))["Body"].read()
    assert hashlib.sha256(got).hexdigest() == ref.sha256 and cloudpickle.loads(got) == value
    # Stored already: the grid says so and offers no URL; the client sends nothing again.
    answer = offer(cluster.url, cluster.key, ref.sha256, ref.size).json()
    assert answer["stored"] is True and answer["url"] is None
    assert nanogrid.put(value) == ref and requests_to(cluster.url, PUT_ROUTE) == puts


def test_the_upload_url_is_short_lived_and_bound_to_the_owners_key_the_size_and_the_hash(cluster):
    data = os.urandom(MiB)
    sha = hashlib.sha256(data).hexdigest()
    answer = offer(cluster.url, cluster.key, sha, len(data))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    url = urlsplit(body["url"])
    query = {name: values[0] for name, values in parse_qs(url.query).items()}
    assert url.path.endswith("/" + key_for("tester", sha))
    assert 0 < body["expires_in"] <= 900 and query["X-Amz-Expires"] == str(body["expires_in"])
    assert (
        query["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
    )  # SigV4: the headers below are part of the signature
    assert {"content-length", "x-amz-checksum-sha256", "host"} <= set(
        query["X-Amz-SignedHeaders"].split(";")
    )
    assert body["headers"] == {
        "content-length": str(len(data)),
        "x-amz-checksum-sha256": base64.b64encode(hashlib.sha256(data).digest()).decode(),
    }
    # Over the grid's limit per value (2 GiB here), a negative size, a malformed hash, no key: refused.
    too_big = offer(cluster.url, cluster.key, sha, 2048 * MiB + 1)
    assert too_big.status_code == 413 and "limit per value" in too_big.json()["detail"]
    assert offer(cluster.url, cluster.key, sha, -1).status_code == 422
    assert offer(cluster.url, cluster.key, sha.upper(), 1).status_code == 400
    assert httpx.post(f"{cluster.url}/v1/blobs/{sha}/upload", params={"size": 1}).status_code == 401
    # The client refuses the same way, before sending any bytes.
    client = nanogrid.Client(cluster.url, api_key=cluster.key)
    with pytest.raises(nanogrid.APIError) as info:
        client._upload_offer(nanogrid.Ref(sha, 2048 * MiB + 1))
    assert info.value.status == 413


def test_wrong_bytes_sent_to_an_upload_url_never_reach_the_function(cluster):
    """moto stores the wrong body (real S3 would answer BadDigest); the worker hashes it and refuses it."""
    client = nanogrid.connect(cluster.url, api_key=cluster.key)
    s3, bucket = s3_of(cluster), cluster.env["S3_USER_DATA_BUCKET"]
    good = cloudpickle.dumps(os.urandom(2 * MiB))
    sha = hashlib.sha256(good).hexdigest()
    body = offer(cluster.url, cluster.key, sha, len(good)).json()
    forged = os.urandom(len(good))
    assert httpx.put(body["url"], content=forged, headers=body["headers"]).status_code == 200
    assert s3.get_object(Bucket=bucket, Key=key_for("tester", sha))["Body"].read() == forged
    job = lengths.spawn([nanogrid.Ref(sha, len(good))])
    with pytest.raises(nanogrid.JobFailed, match=f"blob {sha[:12]}… is damaged"):
        job.result()
    assert "ran" not in job.logs()["stdout"]
    with pytest.raises(
        s3.exceptions.ClientError
    ):  # deleted, so that the next upload stores the bytes again
        s3.head_object(Bucket=bucket, Key=key_for("tester", sha))
    client._known_blobs.clear()
    assert (
        nanogrid.put(cloudpickle.loads(good)).sha256 == sha
    )  # the right bytes, uploaded again directly
    assert lengths.remote([nanogrid.Ref(sha, len(good))]) == [2 * MiB]


def test_another_owner_gets_urls_for_its_own_scope_only(cluster, other_key):
    s3, bucket = s3_of(cluster), cluster.env["S3_USER_DATA_BUCKET"]
    nanogrid.connect(cluster.url, api_key=cluster.key)
    value = os.urandom(2 * MiB)
    ref = nanogrid.put(value)
    theirs = offer(cluster.url, other_key, ref.sha256, ref.size).json()
    assert theirs["stored"] is False  # tester's blob does not exist for them...
    assert urlsplit(theirs["url"]).path.endswith(
        "/" + key_for("other", ref.sha256)
    )  # ...and their URL is theirs
    assert key_for("tester", ref.sha256) not in theirs["url"]
    assert (
        httpx.put(theirs["url"], content=b"x" * ref.size, headers=theirs["headers"]).status_code
        == 200
    )
    mine = s3.get_object(Bucket=bucket, Key=key_for("tester", ref.sha256))["Body"].read()
    assert hashlib.sha256(mine).hexdigest() == ref.sha256  # untouched
    assert lengths.remote([ref]) == [2 * MiB]


def test_when_the_store_refuses_or_cannot_be_reached_the_value_goes_through_the_controller(cluster):
    """A refused direct upload (as S3 answers an expired URL) or an unreachable store loses nothing."""
    client = nanogrid.connect(cluster.url, api_key=cluster.key)

    def expired(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            403,
            text="<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>",
        )

    client._direct_http = httpx.Client(transport=httpx.MockTransport(expired))
    puts = requests_to(cluster.url, PUT_ROUTE)
    value = os.urandom(2 * MiB)
    assert lengths.remote([value]) == [2 * MiB]
    assert (
        requests_to(cluster.url, PUT_ROUTE) == puts + 1 and client.direct_uploads
    )  # this blob only

    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    client._direct_http = httpx.Client(transport=httpx.MockTransport(unreachable))
    with pytest.warns(
        RuntimeWarning, match="cannot reach the grid's store for direct blob uploads"
    ):
        assert lengths.remote([os.urandom(2 * MiB)]) == [2 * MiB]
    assert requests_to(cluster.url, PUT_ROUTE) == puts + 2 and not client.direct_uploads
    offers = requests_to(cluster.url, OFFER_ROUTE)
    assert lengths.remote([os.urandom(2 * MiB)]) == [
        2 * MiB
    ]  # later blobs: straight through the controller
    assert (
        requests_to(cluster.url, PUT_ROUTE) == puts + 3
        and requests_to(cluster.url, OFFER_ROUTE) == offers
    )


def test_with_direct_uploads_off_blobs_go_through_the_controller(cluster, monkeypatch):
    # Off in the client: it asks for no URL.
    monkeypatch.setenv("NANOGRID_DIRECT_UPLOADS", "0")
    client = nanogrid.connect(cluster.url, api_key=cluster.key)
    assert client.direct_uploads is False
    puts, offers = requests_to(cluster.url, PUT_ROUTE), requests_to(cluster.url, OFFER_ROUTE)
    assert lengths.remote([os.urandom(2 * MiB)]) == [2 * MiB]
    assert (
        requests_to(cluster.url, PUT_ROUTE) == puts + 1
        and requests_to(cluster.url, OFFER_ROUTE) == offers
    )
    monkeypatch.setenv("NANOGRID_DIRECT_UPLOADS", "maybe")
    with pytest.raises(nanogrid.ConfigError, match="NANOGRID_DIRECT_UPLOADS is on or off"):
        nanogrid.Client(cluster.url, api_key=cluster.key)
    monkeypatch.delenv("NANOGRID_DIRECT_UPLOADS")
    # Off on the grid (direct_uploads = false): it offers no URL, and the client sends the value through it.
    port = free_port()
    cluster.env["NANOGRID_DIRECT_UPLOADS"] = "0"
    try:
        cluster.start_controller("controller-no-direct", port)
    finally:
        del cluster.env["NANOGRID_DIRECT_UPLOADS"]
    url = f"http://127.0.0.1:{port}"
    data = os.urandom(MiB)
    assert offer(url, cluster.key, hashlib.sha256(data).hexdigest(), len(data)).json() == {
        "stored": False,
        "url": None,
        "headers": {},
        "expires_in": None,
    }
    client = nanogrid.connect(url, api_key=cluster.key)
    assert client.direct_uploads is True
    puts = requests_to(url, PUT_ROUTE)
    assert lengths.remote([os.urandom(2 * MiB)]) == [2 * MiB]
    assert requests_to(url, PUT_ROUTE) == puts + 1
