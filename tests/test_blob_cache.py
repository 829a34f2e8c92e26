"""The per-sandbox blob cache: a warm sandbox keeps the argument blobs it received, so a later call of the same
function that references one is not sent it again.

Written from the faulty world's side: a sandbox whose function tampered with the bootstrap's cache claims a blob
it was never sent, asks for one the call does not have, or claims one it dropped; a call changes its argument in
place; blobs outgrow the cache's bound. What the host sent is read from the worker's own counters
(``blob_bytes_sent``, ``blobs_kept``), never from timing. Real grids (process and Docker sandboxes), real HTTP.

When the sandbox's answer can be refuted (a blob it was never sent, an index the call does not have), the call
fails with a protocol error and the sandbox is discarded: the next call gets a fresh one and is sent everything.
A claim the host cannot refute (a blob it did send, since dropped) fails that owner's own call, in the sandbox.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import pytest

import nanogrid
from nanogrid_backend.sandbox.protocol import ProtocolViolation, check_need
from tests.conftest import require_docker, start_grid

pytestmark = pytest.mark.integration

MiB = 1 << 20


@pytest.fixture(scope="module", params=["process", "docker"])
def cached(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict]:
    """A grid with one worker slot, so a function's calls run one after another in the same warm sandbox."""
    if request.param == "docker":
        require_docker()
    grid = start_grid(
        tmp_path_factory.mktemp(f"blob-cache-{request.param}"),
        sandbox=request.param,
        workers=1,
        pool_cap=4,
        stem_cells=1,
        kill_grace_s=0.5,
    )
    nanogrid.connect(grid.url, api_key=grid.api_key)
    try:
        yield {"grid": grid, "worker": grid.grid.worker}
    finally:
        grid.stop()


def sent(env: dict) -> tuple[int, int]:
    """(bytes of argument blobs the worker has streamed into sandboxes, blobs the sandboxes still kept)."""
    stats = env["worker"].stats
    return stats["blob_bytes_sent"], stats["blobs_kept"]


def blob_size(value: bytes) -> int:
    """What a bytes argument's blob weighs (its cloudpickle, protocol 5): a few bytes over the value."""
    import cloudpickle

    return len(cloudpickle.dumps(value, protocol=5))


def test_a_warm_sandbox_is_sent_a_shared_argument_once(cached):
    """What must never happen: a blob the sandbox already keeps is streamed into it again."""
    data = os.urandom(3 * MiB)
    expected = hashlib.sha256(data).hexdigest()

    @nanogrid.remote(timeout=60, memory=512)
    def digest(blob, salt):
        import hashlib

        return hashlib.sha256(blob).hexdigest() + salt

    before = sent(cached)
    first = digest.spawn(data, "a")
    assert first.result() == expected + "a"
    after_first = sent(cached)
    assert after_first[0] - before[0] == blob_size(data)  # the first call is sent the blob ...
    assert digest.remote(data, "b") == expected + "b"
    assert sent(cached) == (
        after_first[0],
        after_first[1] + 1,
    )  # ... the second is not: the sandbox kept it
    assert list(digest.map([data] * 5, "cdefg")) == [expected + s for s in "cdefg"]
    assert sent(cached) == (after_first[0], after_first[1] + 6)  # nor any call of a .map() over it


def test_each_call_unpickles_its_own_objects_from_a_kept_blob(cached):
    """What must never happen: a call sees what an earlier call did to its argument in place."""
    items = list(range(400_000))  # over the 1 MiB threshold: a blob

    @nanogrid.remote(timeout=60, memory=512)
    def spoil(values):
        seen = (values[0], len(values))
        values[0] = -1
        values.append("spoiled")
        return seen

    before = sent(cached)
    assert [spoil.remote(items) for _ in range(3)] == [(0, 400_000)] * 3
    assert (
        sent(cached)[1] - before[1] == 2
    )  # the blob was kept, and still every call got the original


def test_the_cache_stays_within_its_bound_and_results_stay_right_after_eviction(cached):
    """What must never happen: the cache grows past its share of the function's memory, or a call after an
    eviction gets the wrong blob (or none)."""
    # memory=256: the sandbox keeps at most 64 MiB of blobs; two 24 MiB blobs fit, a third evicts the oldest.
    a, b, c = (os.urandom(24 * MiB) for _ in range(3))
    size = blob_size(a)

    @nanogrid.remote(timeout=120, memory=256)
    def digest(blob):
        import hashlib

        return hashlib.sha256(blob).hexdigest()

    def call(value: bytes) -> int:
        """Bytes the call was sent, after checking its result."""
        before = sent(cached)[0]
        assert digest.remote(value) == hashlib.sha256(value).hexdigest()
        return sent(cached)[0] - before

    assert [call(a), call(b), call(a)] == [size, size, 0]  # a and b both kept, a used last
    assert call(c) == size  # 72 MiB would be over the bound: b, the least recently used, made room
    assert [call(a), call(c)] == [0, 0]
    assert call(b) == size  # evicted, so sent again (and a, now the least recently used, made room)
    assert call(a) == size

    # A value over the bound is never kept: sent with every call. With memory=512 the bound is 128 MiB; the sandbox
    # holds such a value about three times while it arrives and is unpickled, so it gets the room for that.
    big = os.urandom(130 * MiB)

    @nanogrid.remote(timeout=120, memory=512)
    def digest_large(blob):
        import hashlib

        return hashlib.sha256(blob).hexdigest()

    def call_large(value: bytes) -> int:
        before = sent(cached)[0]
        assert digest_large.remote(value) == hashlib.sha256(value).hexdigest()
        return sent(cached)[0] - before

    assert [call_large(big), call_large(big)] == [blob_size(big)] * 2


def test_a_sandbox_that_claims_a_blob_it_was_never_sent_is_discarded(cached):
    """What must never happen: the host takes the sandbox's word that it holds a blob the host never sent it."""

    @nanogrid.remote(timeout=60, memory=512)
    def probe(mode, blob=None):
        import hashlib
        import sys

        cache = sys.modules["__main__"].BLOB_CACHE
        if mode == "claim everything":
            cache.needed = lambda ids, sizes: []
        return hashlib.sha256(blob).hexdigest() if blob is not None else cache.total

    data = os.urandom(2 * MiB)
    spoiled = probe.spawn("claim everything")
    spoiled.result()
    with pytest.raises(
        nanogrid.JobFailed,
        match=r"claims to keep blob [0-9a-f]{12}…, which it was never sent.*"
        r"discarded",
    ) as failed:
        probe.remote("read", data)
    assert failed.value.kind == "protocol"
    again = probe.spawn("read", data)  # a fresh sandbox, sent the blob
    assert again.result() == hashlib.sha256(data).hexdigest()
    assert again.sandbox_id != spoiled.sandbox_id


def test_a_sandbox_that_asks_for_a_blob_the_call_does_not_have_is_discarded(cached):
    """What must never happen: the sandbox chooses which blobs it is sent (another call's, another owner's)."""

    @nanogrid.remote(timeout=60, memory=512)
    def probe(mode, blob=None):
        import hashlib
        import sys

        boot = sys.modules["__main__"]
        if mode == "ask for more":  # the next call's answer names a blob past the call's own

            def receive(fd, reply_fd, ids, sizes, limit):
                boot.write_frame(reply_fd, {"op": "need", "blobs": list(range(len(ids) + 1))})
                return boot.read_blobs(fd, sizes + [1])

            boot.BLOB_CACHE.receive = receive
        return hashlib.sha256(blob).hexdigest() if blob is not None else 0

    data = os.urandom(2 * MiB)
    probe.remote("ask for more")
    with pytest.raises(
        nanogrid.JobFailed, match="asking for blobs the call does not have.*discarded"
    ):
        probe.remote("read", data)
    assert probe.remote("read", data) == hashlib.sha256(data).hexdigest()


def test_a_sandbox_that_dropped_a_blob_it_claims_fails_only_its_own_call_clearly(cached):
    """What must never happen: a sandbox whose cache was tampered with crashes its worker or gets other data.
    The host cannot refute a claim to a blob it did send, so the call fails in the sandbox, saying why."""

    @nanogrid.remote(timeout=60, memory=512)
    def probe(mode, blob=None):
        import hashlib
        import sys

        cache = sys.modules["__main__"].BLOB_CACHE
        if mode == "forget":
            cache.kept.clear()
            cache.total = 0
            cache.needed = lambda ids, sizes: []
        return hashlib.sha256(blob).hexdigest() if blob is not None else 0

    data = os.urandom(2 * MiB)
    assert probe.remote("read", data) == hashlib.sha256(data).hexdigest()
    probe.remote("forget")
    with pytest.raises(LookupError, match="neither in the sandbox's blob cache nor was it sent"):
        probe.remote("read", data)

    @nanogrid.remote(timeout=60, memory=512)
    def other(blob):
        return len(blob)

    assert other.remote(data) == len(
        data
    )  # the grid serves on; another function's sandbox is untouched


@pytest.mark.parametrize(
    "frame, body",
    [
        ({"op": "need", "blobs": [2]}, b""),  # not in the call
        ({"op": "need", "blobs": [-1]}, b""),
        ({"op": "need", "blobs": [1, 1]}, b""),  # twice
        ({"op": "need", "blobs": [1, 0]}, b""),  # out of order
        ({"op": "need", "blobs": [True]}, b""),
        ({"op": "need", "blobs": ["0"]}, b""),
        ({"op": "need", "blobs": 0}, b""),
        ({"op": "need", "blobs": [0], "extra": 1}, b""),
        ({"op": "need", "blobs": [0]}, b"x"),  # a body
        ({"op": "log", "stream": "stdout"}, b"hi"),  # anything else where the answer is due
        ({"ok": True, "result_format": "pickle"}, b""),
    ],
)
def test_a_need_frame_is_checked_strictly(frame, body):
    """What must never happen: a malformed 'need' frame is taken as an answer."""
    with pytest.raises(ProtocolViolation):
        check_need(frame, body, 2)
    assert check_need({"op": "need", "blobs": [0, 1]}, b"", 2) == [0, 1]
    assert check_need({"blobs": [], "op": "need"}, b"", 2) == []


class RemoteStore:
    """A store with no local files (as S3): every blob read is a download, counted."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.downloads: list[str] = []

    def blob_path(self, key: str) -> None:
        return None

    def blob_size(self, key: str, touch: bool = False) -> int | None:
        data = self.blobs.get(key)
        return None if data is None else len(data)

    def open_blob(self, key: str) -> Iterator[bytes]:
        self.downloads.append(key)
        return iter([self.blobs[key]])


def test_a_blob_from_a_remote_store_is_fetched_only_when_the_sandbox_lacks_it(tmp_path):
    """What must never happen: every call downloads from S3 a blob its sandbox already keeps."""
    from types import SimpleNamespace

    import cloudpickle

    from nanogrid.packaging import package_function
    from nanogrid.transfer import ArgsEncoder
    from nanogrid_backend.sandbox.process import ProcessSandboxFactory
    from nanogrid_backend.store.blobs import Blobs, key_for
    from nanogrid_backend.worker.agent import Worker

    store = RemoteStore()

    class Uploader:  # what the client would upload, put straight into the store
        def limits(self) -> dict:
            return {"max_payload_bytes": 64 * MiB, "blob_threshold_bytes": MiB}

        def upload_blob(self, data: bytes) -> nanogrid.Ref:
            ref = nanogrid.Ref(hashlib.sha256(data).hexdigest(), len(data))
            store.blobs[key_for("alice", ref.sha256)] = data
            return ref

    data = os.urandom(2 * MiB)
    args, refs = ArgsEncoder(Uploader()).encode((data,), {})  # type: ignore[arg-type]
    worker = SimpleNamespace(
        store=store, _blobs=Blobs(store, tmp_path / "spool")
    )  # what _call_blobs uses

    def digest(blob):
        import hashlib

        return hashlib.sha256(blob).hexdigest()

    sandbox = ProcessSandboxFactory(
        tmp_path / "sandboxes", tmp_path, bubblewrap="off", cgroups="off"
    ).start()
    try:
        package = package_function(digest, name="digest")
        sandbox.load(package.function_id, package.data, 256)
        for n in range(3):
            with Worker._call_blobs(worker, "alice", refs) as blobs:  # type: ignore[arg-type]
                result = sandbox.call(f"job-{n}", args, 30, blobs=blobs)
            assert cloudpickle.loads(result.body) == hashlib.sha256(data).hexdigest()
            assert (result.blob_bytes_sent > 0, result.blobs_kept) == (
                (True, 0) if n == 0 else (False, 1)
            )
        assert store.downloads == [key_for("alice", refs[0])]  # once, for the first call
    finally:
        sandbox.close()
