"""The warm pool with stand-in sandboxes: reuse, isolation between functions, the cap, the idle TTL."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from nanogrid_backend.sandbox.base import SandboxError
from nanogrid_backend.worker.pool import FunctionCode, WarmPool

CODE = lambda: FunctionCode(b"package", 64)  # noqa: E731


class FakeSandbox:
    ids = itertools.count()

    def __init__(self) -> None:
        self.id = f"fake-{next(self.ids)}"
        self.function_id: str | None = None
        self.closed = False

    def load(
        self, function_id: str, package: bytes, memory_mib: int, env: dict | None = None
    ) -> None:
        assert self.function_id is None, "a sandbox is specialised once"
        self.function_id = function_id

    @property
    def alive(self) -> bool:
        return not self.closed

    def close(self) -> None:
        self.closed = True


class FakeFactory:
    kind = "fake"
    disk_mib = None  # sandboxes with no disk of their own, as process sandboxes
    disk_room = None

    def __init__(self) -> None:
        self.started: list[FakeSandbox] = []

    def start(self) -> FakeSandbox:
        sandbox = FakeSandbox()
        self.started.append(sandbox)
        return sandbox

    def describe(self) -> str:
        return "fake"


@pytest.fixture()
def factory() -> FakeFactory:
    return FakeFactory()


def test_first_call_is_cold_then_warm_on_the_same_sandbox(factory):
    pool = WarmPool(factory, cap=4, stem_cells=1, idle_ttl_s=60)
    try:
        assert pool.wait_ready(60)
        first, cold = pool.acquire("fn-a", CODE)
        assert cold and first.function_id == "fn-a"
        pool.release(first)
        again, cold = pool.acquire("fn-a", CODE)
        assert again is first and cold is False
        pool.release(again)
    finally:
        pool.close()


def test_a_sandbox_never_serves_another_function(factory):
    pool = WarmPool(factory, cap=4, stem_cells=1, idle_ttl_s=60)
    try:
        a, _ = pool.acquire("fn-a", CODE)
        pool.release(a)
        b, cold = pool.acquire("fn-b", CODE)
        assert b is not a and cold and b.function_id == "fn-b"
        pool.release(b)
    finally:
        pool.close()


def test_at_the_cap_the_longest_idle_sandbox_makes_room(factory):
    pool = WarmPool(factory, cap=2, stem_cells=0, idle_ttl_s=60)
    try:
        a, _ = pool.acquire("fn-a", CODE)
        pool.release(a)
        b, _ = pool.acquire("fn-b", CODE)
        pool.release(b)
        c, _ = pool.acquire("fn-c", CODE)
        assert a.closed and not b.closed
        assert pool.snapshot()["specialised"] == 2
        pool.release(c)
    finally:
        pool.close()


def test_a_sandbox_a_stem_cell_replaces_is_closed_after_the_cold_start_and_never_left_open(factory):
    """At the cap, a cold start on a stem cell leaves the idle sandbox it replaces to the maintenance thread (closing
    a Docker sandbox takes milliseconds of unmounting), which closes it once the cold start is done; what is still
    waiting when the pool closes is closed by the pool. What must never happen: a replaced sandbox left open."""
    closed_during_load: list[bool] = []
    first: list[FakeSandbox] = []

    class Watched(FakeSandbox):
        def load(self, function_id, package, memory_mib, env=None) -> None:
            closed_during_load.append(bool(first) and first[0].closed)
            super().load(function_id, package, memory_mib, env)

    factory.start = lambda: factory.started.append(Watched()) or factory.started[-1]  # type: ignore[method-assign]
    pool = WarmPool(factory, cap=2, stem_cells=1, idle_ttl_s=60)
    try:
        assert pool.wait_ready(60)
        a, _ = pool.acquire("fn-a", CODE)
        first.append(a)
        pool.release(a)
        assert pool.wait_ready(60)
        b, _ = pool.acquire("fn-b", CODE)
        pool.release(b)
        assert pool.wait_ready(60)
        closed_during_load.clear()
        c, cold = pool.acquire("fn-c", CODE)  # on the stem cell; a, the longest idle, makes room
        assert cold and closed_during_load == [False], (
            "the replaced sandbox was closed on the cold start's path"
        )
        deadline = time.monotonic() + 10
        while not a.closed and time.monotonic() < deadline:
            time.sleep(0.01)
        assert a.closed and not b.closed
        pool.release(c)
        # d replaces b, and the pool closes before the maintenance thread may have closed b
        d, _ = pool.acquire("fn-d", CODE)
        pool.release(d)
    finally:
        pool.close()
    assert all(s.closed for s in factory.started), "a sandbox outlived its pool"


def test_when_every_sandbox_is_busy_a_call_waits_instead_of_failing(factory):
    pool = WarmPool(factory, cap=1, stem_cells=0, idle_ttl_s=60)
    try:
        busy, _ = pool.acquire("fn-a", CODE)
        got = []
        waiter = threading.Thread(target=lambda: got.append(pool.acquire("fn-b", CODE)))
        waiter.start()
        time.sleep(0.2)
        assert not got
        pool.release(busy)
        waiter.join(60)
        assert got and got[0][0].function_id == "fn-b" and busy.closed
    finally:
        pool.close()


def test_idle_sandboxes_are_stopped_after_the_ttl(factory):
    pool = WarmPool(factory, cap=4, stem_cells=0, idle_ttl_s=0.2)
    try:
        a, _ = pool.acquire("fn-a", CODE)
        pool.release(a)
        deadline = time.monotonic() + 60  # a bound on the wait on a loaded machine, not a timing
        while not a.closed and time.monotonic() < deadline:
            time.sleep(0.05)
        assert a.closed and pool.snapshot()["idle"] == 0
    finally:
        pool.close()


def test_dead_sandboxes_are_dropped_and_stem_cells_refilled(factory):
    pool = WarmPool(factory, cap=4, stem_cells=2, idle_ttl_s=60)
    try:
        assert pool.wait_ready(60)
        a, _ = pool.acquire("fn-a", CODE)
        a.close()  # it crashed during the call
        pool.release(a)
        assert pool.snapshot()["specialised"] == 0
        assert pool.wait_ready(60) and pool.snapshot()["stem_cells"] == 2
    finally:
        pool.close()


class RefusingFactory(FakeFactory):
    """Cannot start sandboxes (the worker's disk has no room for one, say) until ``refusing`` is cleared."""

    def __init__(self) -> None:
        super().__init__()
        self.refusing = True
        self.attempts = 0

    def start(self) -> FakeSandbox:
        self.attempts += 1
        if self.refusing:
            raise SandboxError("storage", "this worker has no room for a 1024 MiB sandbox disk now")
        return super().start()


def test_stem_cells_that_cannot_start_are_said_once_and_tried_again_quietly(caplog):
    """Never: a traceback logged every few seconds for ever while stem cells cannot start, or a pool that does not
    start them once it can."""
    factory = RefusingFactory()
    pool = WarmPool(factory, cap=4, stem_cells=1, idle_ttl_s=60)
    try:
        deadline = time.monotonic() + 60
        while factory.attempts < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert factory.attempts >= 3
        said = [r for r in caplog.records if "could not start a stem cell" in r.getMessage()]
        assert len(said) == 1 and not said[0].exc_info, said  # once, without a traceback
        assert "no room for a 1024 MiB sandbox disk" in (pool.snapshot()["problem"] or "")
        factory.refusing = False
        assert pool.wait_ready(120)
        assert pool.snapshot()["problem"] is None
    finally:
        pool.close()
