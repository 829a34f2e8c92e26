"""Big data: limits the grid owns, content-addressed blobs for arguments and results, and the channel's checks.

Written from the faulty world's side: a forged or broken upload, another owner, an oversized value,
a sandbox that lies about a streamed result. Real grids (process and Docker sandboxes), real HTTP.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import httpx
import pytest

import nanogrid
from nanogrid.data import ArgsEncoder, ArgsUnpickler
from nanogrid_backend.blobs import key_for
from nanogrid_backend.keys import create_key
from tests.conftest import require_docker, start_grid

pytestmark = pytest.mark.integration

MiB = 1 << 20


@pytest.fixture(scope="module", params=["process", "docker"])
def bigrid(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A grid with a 4 MiB cap per argument and 3 MiB per result, two owners."""
    if request.param == "docker":
        require_docker()
    data_dir = tmp_path_factory.mktemp(f"bigdata-{request.param}")
    grid = start_grid(data_dir, sandbox=request.param, workers=2, pool_cap=3, stem_cells=1, kill_grace_s=0.5,
                      max_payload_bytes=4 * MiB, max_result_bytes=3 * MiB)
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
    assert client.limits()["max_payload_bytes"] == 4 * MiB and client.limits()["blob_threshold_bytes"] == MiB

    @nanogrid.remote(timeout=30)
    def takes(small, big=None):
        return 1

    before = blob_files(bigrid)
    with pytest.raises(nanogrid.InvalidArgument, match=r"argument 'big' pickles to 5\.0 MiB, over the grid's 4\.0 MiB"):
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
        return blob + blob[:MiB // 2]

    expected = hashlib.sha256(data).hexdigest()
    before = set(blob_files(bigrid))
    assert list(digest.map([data] * 6, [str(i) for i in range(6)])) == [expected + str(i) for i in range(6)]
    assert len(set(blob_files(bigrid)) - before) == 1  # one blob for the six calls
    ref = nanogrid.put(data)
    assert digest.remote(ref, "r") == expected + "r"
    assert grow.remote(data) == data + data[:MiB // 2]  # a 2.5 MiB result, streamed through a blob


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
    assert cloudpickle.loads(client.download_blob(ref.sha256, ref.size)) == b"alice's secret " * 100_000

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
    forged = http.put(f"/v1/blobs/{name}", content=good[:-1] + b"!")
    assert forged.status_code == 400 and "does not hash" in forged.json()["detail"]
    assert http.head(f"/v1/blobs/{name}").status_code == 404
    assert http.put("/v1/blobs/../../etc", content=b"x").status_code in (400, 404)
    assert http.put(f"/v1/blobs/{'A' * 64}", content=b"x").status_code == 400

    # A client that announces 3 MiB, sends half and disconnects.
    host, port = httpx.URL(bigrid["grid"].url).host, httpx.URL(bigrid["grid"].url).port
    with socket.create_connection((host, port)) as sock:
        sock.sendall(f"PUT /v1/blobs/{name} HTTP/1.1\r\nHost: x\r\nx-api-key: {bigrid['alice']}\r\n"
                     f"Content-Length: {len(good)}\r\n\r\n".encode() + good[:len(good) // 2])
    assert http.head(f"/v1/blobs/{name}").status_code == 404
    spool = bigrid["data_dir"] / "store" / "blob-spool"
    assert http.put(f"/v1/blobs/{name}", content=good).status_code == 201  # a whole upload afterwards is taken
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
        reply = {"ok": True, "result_format": "pickle", "result_size": 2 << 20, "stdout": "", "stderr": ""}
        if kind == "over":
            reply["result_size"] = 1 << 40
        header = json.dumps(reply).encode()
        for n in [int(n) for n in os.listdir("/proc/self/fd") if int(n) > 2]:
            try:
                os.write(n, boot.struct.pack(">II", len(header), 0) + header)
                if kind == "more":  # a piece larger than what was announced
                    piece = json.dumps({"op": "result_data"}).encode()
                    os.write(n, boot.struct.pack(">II", len(piece), 3 << 20) + piece + b"x" * (3 << 20))
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
