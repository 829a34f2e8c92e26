"""Exactly once inside batches: a sandbox that dies in the middle of a batch of short calls, at any point.

The witness is the host's, not the grid's own bookkeeping: each call appends its item to a file on the sandbox's
own disk (its working directory, a host directory or the host-mounted scratch disk) with one unbuffered write, so
the line survives any death of the sandbox's process; the test reads that file on the host just before the grid
removes the sandbox. Nothing is sent over the sandbox's channel for it: a message there would change the order in
which replies leave the sandbox, which is what is under test.

What must never happen, however the sandbox dies (``os._exit`` in a call, SIGKILL or SIGSEGV from inside, a kill
from outside after a call returned, while its reply may still be on its way):
- a call that completed recorded as failed, or a failed call blamed on a neighbour that was not running;
- an item run twice when no retry policy asks for it;
- a call of the batch that never started lost, or run more than once elsewhere.
"""

from __future__ import annotations

import collections
import threading
from pathlib import Path

import pytest

import nanogrid
from nanogrid_backend.sandbox.docker import DockerSandbox
from nanogrid_backend.sandbox.process import ProcessSandbox
from tests.conftest import require_docker, start_grid

WITNESS = "executions.log"


@pytest.fixture(params=["process", "docker"])
def witnessed(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A grid of its own (one worker slot, so every call of a map shares its batches) and the executions its
    sandboxes wrote on their own disks, collected as each sandbox is removed."""
    if request.param == "docker":
        require_docker()
    runs: collections.Counter[int] = collections.Counter()
    sequences: list[list[int]] = []  # the items each sandbox ran, in order
    lock = threading.Lock()

    def collect(work_dir: Path | None) -> None:
        if work_dir is None:
            return
        try:  # written by the test's own function: a plain text file of item numbers
            text = (Path(work_dir) / WITNESS).read_text()
        except OSError:
            return
        with lock:
            sequences.append([int(line) for line in text.split()])
            runs.update(sequences[-1])

    for cls, where in (
        (ProcessSandbox, lambda s: s.work_dir),
        (DockerSandbox, lambda s: s.scratch.work_dir if s.scratch is not None else None),
    ):
        original = cls.close

        def close(self, original=original, where=where) -> None:
            if not getattr(self, "_witness_read", False):
                self._witness_read = True
                collect(where(self))
            original(self)

        monkeypatch.setattr(cls, "close", close)
    embedded = start_grid(tmp_path / "grid", sandbox=request.param, workers=1, kill_grace_s=0.5)
    client = nanogrid.connect(embedded.url, api_key=embedded.api_key)
    try:
        yield client, embedded, runs, sequences
    finally:
        embedded.stop()


def _outcomes(results: list) -> tuple[dict[int, object], dict[int, BaseException]]:
    done = {x: r for x, r in enumerate(results) if not isinstance(r, BaseException)}
    failed = {x: r for x, r in enumerate(results) if isinstance(r, BaseException)}
    return done, failed


@pytest.mark.integration
@pytest.mark.parametrize("death", ["exit", "sigkill", "segfault"])
def test_a_sandbox_dying_inside_a_batch_fails_only_the_dying_call(witnessed, death):
    """Every 50th call of a 600-call map ends its sandbox from inside (as a segfault, the OOM killer or
    ``os._exit`` would), at the first, a middle or the last place of whatever batch it is in. Never: a completed
    call blamed, a call run twice, a call lost."""
    client, embedded, runs, sequences = witnessed

    @nanogrid.remote(timeout=30)
    def fragile(x, how):
        import os
        import signal

        log = os.path.join(os.environ["NANOGRID_WORK_DIR"], "executions.log")
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.write(fd, f"{x}\n".encode())
        os.close(fd)
        if x % 50 == 49:
            if how == "exit":
                os._exit(3)
            if how == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            import ctypes

            ctypes.string_at(0)  # a segfault
        return x * 2

    assert (
        fragile.remote(0, death) == 0
    )  # timed once: its calls are short, so the map is taken in batches
    batched = embedded.grid.worker.stats["batched_calls"]
    results = list(
        fragile.map(range(1, 601), [death] * 600, return_exceptions=True, progress=False)
    )
    embedded.stop()  # every sandbox is removed, so every witness file has been read
    assert embedded.grid.worker.stats["batched_calls"] - batched >= 100, (
        "the map was not taken in batches"
    )
    done, failed = _outcomes(results)
    dying = {x - 1 for x in range(1, 601) if x % 50 == 49}
    assert sorted(failed) == sorted(dying), {x: repr(failed[x])[:200] for x in sorted(failed)}
    for exc in failed.values():
        assert isinstance(exc, nanogrid.SandboxCrashed), repr(exc)
    assert done == {x: (x + 1) * 2 for x in range(600) if x not in dying}
    twice = {x: n for x, n in runs.items() if n > 1}
    assert not twice, f"items run more than once: {twice}"
    assert set(runs) == set(range(0, 601)), "an item never ran"


@pytest.mark.integration
def test_a_sandbox_killed_just_after_a_call_returned_loses_nothing_and_reruns_nothing(witnessed):
    """A call arms a kill of its own sandbox a moment after it returns, so the sandbox dies while that call's reply
    leaves it or while a later call runs. Never: more calls blamed than kills armed, a call blamed before any kill
    was armed, an item run twice, a call of the batch that never started lost."""
    client, embedded, runs, sequences = witnessed

    @nanogrid.remote(timeout=30)
    def returns_then_dies(x):
        import os
        import signal
        import threading

        log = os.path.join(os.environ["NANOGRID_WORK_DIR"], "executions.log")
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.write(fd, f"{x}\n".encode())
        os.close(fd)
        if x % 40 == 20:
            threading.Timer(0.0003, os.kill, (os.getpid(), signal.SIGKILL)).start()
        return x

    assert returns_then_dies.remote(0) == 0
    results = list(returns_then_dies.map(range(1, 401), return_exceptions=True, progress=False))
    embedded.stop()
    done, failed = _outcomes(results)
    armed = {x for x in range(1, 401) if x % 40 == 20}
    after_armed = {
        x
        for sequence in sequences
        for n, x in enumerate(sequence)
        if armed & set(sequence[: n + 1])
    }
    for index, exc in failed.items():
        assert isinstance(exc, nanogrid.SandboxCrashed), repr(exc)
        # Blamed: the armed call (its reply had not left yet), or a call its sandbox ran (or was about to) after it.
        assert index + 1 in after_armed or runs[index + 1] == 0, (
            f"item {index + 1} failed, but its sandbox had armed no kill before it: {exc!r}"
        )
    assert len(failed) <= len(armed)
    assert done == {x: x + 1 for x in done}
    assert set(runs) >= set(range(401)) - {x + 1 for x in failed}, (
        "an item never ran (or completed unrun)"
    )
    twice = {x: n for x, n in runs.items() if n > 1}
    assert not twice, f"items run more than once: {twice}"
