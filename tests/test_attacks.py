"""A hostile tenant against the sandbox channel, from the attacker's side.

The function runs inside the bootstrap's own interpreter (``sys.modules["__main__"]``), so it can
replace the code that answers the host and write any frames it likes. Whatever it sends, these
must never happen: a file written outside the call's output directory, a host path in an error, a
result or output larger than the grid's caps, a forged duration or token count stored, a pool
place lost (so that another owner's call waits), a tampered package loaded, or a sandbox reaching
anything but the AI node's inference routes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import nanogrid
from nanogrid_backend.keys import create_key
from tests.conftest import require_docker, start_grid
from tests.fake_ollama import FakeOllama

pytestmark = pytest.mark.integration

MiB = 1 << 20


@pytest.fixture(scope="module", params=["process", "docker"])
def arena(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict]:
    """One grid with small caps, two owners (mallory attacks, victim must keep being served) and an AI node."""
    if request.param == "docker":
        require_docker()
    with FakeOllama() as node:
        data_dir = tmp_path_factory.mktemp(f"arena-{request.param}")
        grid = start_grid(
            data_dir,
            sandbox=request.param,
            workers=2,
            pool_cap=3,
            stem_cells=1,
            kill_grace_s=0.5,
            max_result_bytes=2 * MiB,
            max_output_bytes=8 * MiB,
            max_output_files=50,
            ai_endpoint=node.url,
            ai_model="tiny",
        )
        mallory, _ = create_key(grid.grid.registry, "mallory")
        victim, _ = create_key(grid.grid.registry, "victim")
        try:
            yield {
                "grid": grid,
                "mallory": mallory,
                "victim": victim,
                "node": node,
                "data_dir": data_dir,
                "kind": request.param,
            }
        finally:
            grid.stop()


def as_owner(arena: dict, who: str) -> nanogrid.Client:
    return nanogrid.connect(arena["grid"].url, api_key=arena[who])


def victim_is_served(arena: dict) -> None:
    """Another owner's call still runs, and the pool has not lost a place."""
    as_owner(arena, "victim")

    @nanogrid.remote(timeout=30)
    def still_fine(x):
        return x + 1

    assert still_fine.remote(41) == 42
    pool = arena["grid"].grid.pool.snapshot()
    assert pool["busy"] == 0 and pool["specialised"] <= pool["cap"]


def assert_no_host_path(arena: dict, text: str) -> None:
    assert str(arena["data_dir"]) not in text and "/root" not in text and "/tmp/pytest" not in text


# Frames a forged send_outputs writes instead of the real records (fd: the reply channel).
FORGED_OUTPUTS = {
    "parent escape": [
        ({"op": "file", "name": "../../../../escaped.txt", "size": 5}, b""),
        ({"op": "data"}, b"owned"),
    ],
    "absolute path": [
        ({"op": "file", "name": "/tmp/escaped.txt", "size": 5}, b""),
        ({"op": "data"}, b"owned"),
    ],
    "dot segments": [({"op": "file", "name": "a/./../../escaped.txt", "size": 1}, b"")],
    "same file twice": [
        ({"op": "file", "name": "x.txt", "size": 1}, b""),
        ({"op": "data"}, b"1"),
        ({"op": "file", "name": "x.txt", "size": 1}, b""),
        ({"op": "data"}, b"2"),
    ],
    "file then dir through it": [
        ({"op": "file", "name": "d", "size": 0}, b""),
        ({"op": "file", "name": "d/inner.txt", "size": 1}, b""),
    ],
    "more data than announced": [
        ({"op": "file", "name": "x.txt", "size": 1}, b""),
        ({"op": "data"}, b"12345"),
    ],
    "less data than announced": [
        ({"op": "file", "name": "x.txt", "size": 10}, b""),
        ({"op": "data"}, b"1"),
        ({"op": "done", "ok": True}, b""),
    ],
    "negative size": [({"op": "file", "name": "x.txt", "size": -1}, b"")],
    "size past the cap": [({"op": "file", "name": "x.txt", "size": 3 << 30}, b"")],
    "a reply among the files": [({"ok": True, "result_format": "json"}, b"1")],
    "header not an object": [("just a string", b"")],
    "nul in a name": [({"op": "file", "name": "a\x00b", "size": 0}, b"")],
}


@pytest.mark.parametrize("attack", sorted(FORGED_OUTPUTS))
def test_forged_output_records_write_nothing_outside_and_discard_the_sandbox(arena, attack):
    """Where output files come over the channel (the process sandbox; the Docker sandbox's host reads them from the
    sandbox's own disk instead: test_hostile_output_trees_are_read_without_following_anything)."""
    frames = FORGED_OUTPUTS[attack]
    as_owner(arena, "mallory")
    if arena["kind"] == "docker":
        assert arena["grid"].grid.factory.scratch_problem == "", (
            "the Docker sandbox has no disk of its own here"
        )

        @nanogrid.remote(timeout=30)
        def forge_unasked(frames):
            import json
            import os
            import struct
            import sys

            fd = sys.modules[
                "__nanogrid_channel__"
            ].request.__self__.reply_fd  # the real channel to the host
            for header, body in frames:  # records the host never asked for, mid-call
                data = json.dumps(header).encode()
                os.write(fd, struct.pack(">II", len(data), len(body)) + data + body)
            return "sent"

        try:  # its own call's outcome is the attacker's to spoil (a forged reply may even pass for it) ...
            forge_unasked.remote(frames)
        except nanogrid.JobFailed as exc:
            assert_no_host_path(arena, str(exc))
        # ... but nothing is written outside, and nobody else is affected
        assert (
            not list(arena["data_dir"].parent.rglob("escaped.txt"))
            and not Path("/tmp/escaped.txt").exists()
        )
        victim_is_served(arena)
        return

    @nanogrid.remote(timeout=30)
    def forge(frames):
        import json
        import os
        import struct
        import sys

        boot = sys.modules["__main__"]

        def forged(fd, limit):
            for header, body in frames:
                data = json.dumps(header).encode()
                os.write(fd, struct.pack(">II", len(data), len(body)) + data + body)
            os.write(fd, b"")  # and then whatever the host makes of it

        boot.send_outputs = forged
        with open(os.path.join(nanogrid.output_dir(), "bait.txt"), "w") as f:
            f.write("so that the host asks for the outputs")
        return "sent"

    with pytest.raises(nanogrid.JobFailed) as info:
        forge.remote(frames)
    message = str(info.value)
    assert "protocol violation" in message or "over the" in message or "more than" in message
    assert_no_host_path(arena, message)
    data_dir: Path = arena["data_dir"]
    assert not list(data_dir.parent.rglob("escaped.txt")) and not Path("/tmp/escaped.txt").exists()
    victim_is_served(arena)


def test_a_forged_reply_cannot_set_its_own_metrics(arena):
    """Durations and token counts are the host's: a reply that carries its own is refused outright."""
    as_owner(arena, "mallory")

    @nanogrid.remote(timeout=30)
    def forge_reply(fields):
        import sys

        boot = sys.modules["__main__"]
        boot.FORGED = fields  # what this very call's reply will carry
        if not hasattr(boot, "real_call"):
            boot.real_call = boot.Runtime.call

            def lying(self, *args, **kwargs):
                reply, result = boot.real_call(self, *args, **kwargs)
                reply.update(boot.FORGED)
                return reply, result

            boot.Runtime.call = lying
        return "patched"

    # The patch takes effect from the call after the one that installs it (a discarded sandbox starts clean).
    assert forge_reply.remote({}) == "patched"
    job = forge_reply.spawn({"duration_ms": -5.0})
    assert job.result(timeout=30) == "patched" and job.duration >= 0
    job = forge_reply.spawn({"duration_ms": 1e12})
    assert job.result(timeout=30) == "patched"
    assert 0 <= job.duration < 30  # the host's clock, not the sandbox's 10^12 ms
    with pytest.raises(nanogrid.JobFailed, match="protocol violation"):
        forge_reply.remote(
            {"ai_usage": {"calls": 1, "prompt_tokens": 10**12, "completion_tokens": -1}}
        )
    assert forge_reply.remote({}) == "patched"
    with pytest.raises(nanogrid.JobFailed, match="protocol violation"):
        forge_reply.remote({"stdout": 123})
    response = httpx.get(f"{arena['grid'].url}/v1/jobs", headers={"x-api-key": arena["mallory"]})
    assert response.status_code == 200  # nothing stored made the owner's job list unreadable
    victim_is_served(arena)


def test_results_and_frames_over_the_cap_are_refused_before_they_are_read(arena):
    as_owner(arena, "mallory")

    @nanogrid.remote(timeout=30, memory=128)
    def big(n):
        return b"x" * n

    assert len(big.remote(MiB)) == MiB
    with pytest.raises(nanogrid.JobFailed, match="over the grid's 2 MiB limit"):
        big.remote(3 * MiB)

    @nanogrid.remote(timeout=30)
    def claims_a_huge_frame():
        import json
        import os
        import sys

        boot = sys.modules["__main__"]
        header = json.dumps({"ok": True, "result_format": "pickle"}).encode()
        fd = [int(n) for n in os.listdir("/proc/self/fd") if int(n) > 2]
        for n in fd:  # the reply channel is one of these; the host reads the length and stops there
            try:
                os.write(n, boot.struct.pack(">II", len(header), 3 << 30) + header)
            except OSError:
                pass
        return "unreachable"

    with pytest.raises(nanogrid.JobFailed):
        claims_a_huge_frame.remote()
    victim_is_served(arena)


def test_outputs_are_capped_at_their_apparent_size_and_links_are_never_followed(arena):
    as_owner(arena, "mallory")

    @nanogrid.remote(timeout=60)
    def sparse():
        import os

        for n in range(
            3
        ):  # each under the per-file size limit, 15 MiB in all, costing the sandbox nothing
            with open(os.path.join(nanogrid.output_dir(), f"sparse{n}.bin"), "wb") as f:
                f.truncate(5 << 20)
        return "written"

    with pytest.raises(nanogrid.JobFailed, match="over the 8 MiB limit"):
        sparse.remote()

    @nanogrid.remote(timeout=30)
    def links():
        import os

        out = nanogrid.output_dir()
        os.symlink("/etc/passwd", os.path.join(out, "passwd"))
        os.symlink("/", os.path.join(out, "root"))
        with open(os.path.join(out, "real.txt"), "w") as f:
            f.write("kept")
        return "done"

    job = links.spawn()
    assert job.result(timeout=30) == "done"
    assert [f.name for f in job.outputs] == ["real.txt"]
    victim_is_served(arena)


def test_a_pool_full_of_failing_calls_still_serves_another_owner(arena):
    """What must never happen: one owner's broken calls leave the pool busy, so everyone else queues forever."""
    as_owner(arena, "mallory")

    @nanogrid.remote(timeout=30)
    def wedge(n):
        import sys

        sys.modules["__main__"].send_outputs = lambda fd, limit: (_ for _ in ()).throw(
            ValueError("not a SandboxError")
        )
        for i in range(
            60
        ):  # over the arena's 50 files: fails where the host reads the files itself, too
            with open(nanogrid.output_dir() / f"f{n}-{i}.txt", "w") as f:
                f.write("x")
        return n

    results = list(wedge.map(range(8), return_exceptions=True))
    assert all(isinstance(r, Exception) for r in results)
    victim_is_served(arena)


def test_a_package_changed_in_the_store_is_never_loaded(arena):
    as_owner(arena, "victim")

    @nanogrid.remote(timeout=30)
    def honest(x):
        return f"honest {x}"

    function_id = honest.deploy()
    path = arena["data_dir"] / "store" / "packages" / f"{function_id}.zip"
    assert path.exists()
    from nanogrid.packaging import package_function

    def evil(x):
        return f"attacker's code saw {x}"

    path.write_bytes(
        package_function(evil, name="honest").data
    )  # as if written through some other hole
    with pytest.raises(nanogrid.JobFailed, match="does not match its content hash"):
        honest.remote("the victim's input")


def test_ai_requests_reach_only_the_inference_routes_and_tokens_are_counted_by_the_host(arena):
    as_owner(arena, "mallory")

    @nanogrid.remote(ai=True, timeout=30)
    def ai_attacker():
        import os
        import sys

        import nanogrid.ai

        answer = nanogrid.ai.generate("hello there").response
        channel = sys.modules["__nanogrid_channel__"]
        admin = [
            channel.request({"op": "ai", "method": method, "path": path}, b'{"model": "tiny"}')[0][
                "status"
            ]
            for method, path in [
                ("DELETE", "/api/delete"),
                ("POST", "/api/pull"),
                ("POST", "/api/create"),
                ("POST", "/api/generate/../delete"),
                ("GET", "/api/ps"),
            ]
        ]
        nanogrid.ai._usage["prompt_tokens"] += (
            10**9
        )  # the function's own count is not what the job records
        interfaces = sorted(os.listdir("/sys/class/net"))
        return answer, admin, interfaces

    job = ai_attacker.spawn()
    answer, admin, interfaces = job.result(timeout=30)
    assert answer.startswith("[tiny] summary")
    assert admin == [403] * 5
    assert job.ai_usage == {
        "calls": 1,
        "prompt_tokens": 2,
        "completion_tokens": 4,
    }  # the node's own counts
    if arena["kind"] == "docker":
        assert interfaces == [
            "lo"
        ]  # no network at all: not the host, not another sandbox, not the node
    assert ("DELETE", "/api/delete") not in arena["node"].seen and (
        "POST",
        "/api/pull",
    ) not in arena["node"].seen

    @nanogrid.remote(timeout=30)
    def no_ai_asked():
        import sys

        return sys.modules["__nanogrid_channel__"].request(
            {"op": "ai", "method": "POST", "path": "/api/generate"},
            b'{"model": "tiny", "prompt": "x"}',
        )[0]["status"]

    assert no_ai_asked.remote() == 403
    victim_is_served(arena)


def test_a_manifest_boolean_must_be_a_boolean(arena):
    from nanogrid.packaging import build_zip

    manifest = b'{"name": "sneaky", "kind": "handler", "handler": "main.handler", "ai": "no"}'
    package = build_zip(
        {"manifest.json": manifest, "main.py": b"def handler(event, context):\n    return 1\n"}
    )
    response = httpx.post(
        f"{arena['grid'].url}/v1/upload",
        headers={"x-api-key": arena["mallory"]},
        files={"file": ("sneaky.zip", package)},
    )
    assert response.status_code == 422 and "ai must be true or false" in response.text


def test_data_only_results_are_never_unpickled_by_the_caller(arena, tmp_path):
    """What must never happen: a result="json" function makes its caller run code by sending a pickle."""
    as_owner(arena, "mallory")
    marker = tmp_path / "the caller ran the sandbox's code"

    @nanogrid.remote(timeout=30, result="json")
    def data_only(marker_path):
        import sys

        import cloudpickle

        class Payload:
            def __reduce__(self):
                return (open, (marker_path, "w"))

        boot = sys.modules["__main__"]
        boot.EVIL = cloudpickle.dumps(Payload())
        if not hasattr(boot, "honest_call"):
            boot.honest_call = boot.Runtime.call

            def pickled_instead(self, *args, **kwargs):
                reply, result = boot.honest_call(self, *args, **kwargs)
                reply["result_format"] = "pickle"
                return reply, boot.EVIL

            boot.Runtime.call = pickled_instead
        return {"honest": [1, 2]}

    assert data_only.remote(str(marker)) == {
        "honest": [1, 2]
    }  # the first call installs the forgery
    with pytest.raises(nanogrid.NanoGridError, match="asked for data-only results"):
        data_only.remote(str(marker))
    assert not marker.exists()

    @nanogrid.remote(timeout=30, result="json")
    def fails():
        raise KeyError("the reason")

    with pytest.raises(nanogrid.RemoteError, match="the reason") as info:
        fails.remote()
    assert info.value.type_name == "KeyError" and "raise KeyError" in str(info.value.__cause__)


# Output trees a hostile function leaves on its own disk, for the host to read (the Docker sandbox).
HOSTILE_TREES = {
    "links to the host's files": (
        """
os.symlink("/etc/passwd", out + "/passwd")
os.symlink("/", out + "/root")
os.link(out + "/bait.txt", out + "/hardlink.txt")
""",
        None,
    ),
    "a fifo": ("os.mkfifo(out + '/pipe')", None),
    "a sparse file past the cap": (
        """
with open(out + "/sparse.bin", "wb") as f:
    f.truncate(900 << 20)  # within the disk's file size limit, far over the grid's output cap
""",
        "over the 8 MiB limit",
    ),
    "too many files": (
        """
for i in range(60):
    open(out + f"/f{i}", "w").close()
""",
        "more than 50 output files",
    ),
    "a name with a newline": ("open(out + '/a\\nb', 'w').close()", "protocol violation"),
    "nested too deep": ("os.makedirs(out + '/d' * 20)", "nested too deep"),
    "a file that grows after the call": (
        """
import threading
def grow():
    with open(out + "/growing.bin", "ab") as f:
        while True:
            f.write(b"x" * 65536)
threading.Thread(target=grow, daemon=True).start()
import time; time.sleep(0.2)
""",
        "any",
    ),
}


@pytest.mark.parametrize("attack", sorted(HOSTILE_TREES))
def test_hostile_output_trees_are_read_without_following_anything(arena, attack):
    """Never: a host file read through a link, the host blocked on a fifo, more read than the caps, a host path
    in the error, or a place in the pool lost."""
    if arena["kind"] != "docker":
        assert (
            arena["kind"] == "process"
        )  # the process sandbox sends its files: the forged-records test covers it
        return
    code, expected = HOSTILE_TREES[attack]
    as_owner(arena, "mallory")

    @nanogrid.remote(timeout=30)
    def leave(code):
        import os

        import nanogrid

        out = str(nanogrid.output_dir())
        with open(out + "/bait.txt", "w") as f:
            f.write("bait")
        exec(code, {"os": os, "out": out})
        return "left"

    job = leave.spawn(code)
    if expected is None:
        assert job.result(timeout=60) == "left"
        names = {output.name: output for output in job.outputs}
        assert "bait.txt" in names and not {"passwd", "root", "pipe"} & set(names)
        assert all(output.read() == b"bait" for name, output in names.items() if name != "bait.txt")
    elif expected == "any":
        try:
            job.result(timeout=60)
            assert all(output.size <= 8 * MiB for output in job.outputs)
        except nanogrid.JobFailed as exc:
            assert_no_host_path(arena, str(exc))
    else:
        with pytest.raises(nanogrid.JobFailed, match=expected) as info:
            job.result(timeout=60)
        assert_no_host_path(arena, str(info.value))
    victim_is_served(arena)


FORGED_RESULT_FILES = {
    "a link to a host file": "os.symlink('/etc/shadow', path)",
    "a fifo": "os.mkfifo(path)",
    "shorter than announced": "open(path, 'wb').write(b'x' * 10)",
}


@pytest.mark.parametrize("attack", sorted(FORGED_RESULT_FILES))
def test_a_forged_result_file_is_refused(arena, attack):
    """Where large results are left on the sandbox's disk (Docker), the host never follows a link, never blocks on
    a fifo and never takes a file of another size than announced; elsewhere a sandbox may not claim one at all."""
    as_owner(arena, "mallory")

    @nanogrid.remote(timeout=30)
    def forge_result(code):
        import os
        import sys

        boot = sys.modules["__main__"]

        def forged(result):
            path = os.path.join(boot.WORK_DIR, boot.RESULT_FILE or ".nanogrid-result")
            exec(code, {"os": os, "path": path})
            return True

        boot.result_to_file = forged
        boot.RESULT_FILE = (
            boot.RESULT_FILE or ".nanogrid-result"
        )  # claims a result file even where none is read
        return b"r" * (
            3 << 19
        )  # 1.5 MiB: over the size sent inline, within the arena's 2 MiB result cap

    with pytest.raises(nanogrid.JobFailed, match="protocol violation") as info:
        forge_result.remote(FORGED_RESULT_FILES[attack])
    assert_no_host_path(arena, str(info.value))
    victim_is_served(arena)
