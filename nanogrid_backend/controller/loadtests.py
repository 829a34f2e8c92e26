"""Load tests started from the API or the dashboard (``/v1/loadtests``): the controller calls the function itself,
in-process (its own grid only), within nanogrid_backend.controller.load_runner's bounds, one test
per owner at a time."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import cloudpickle
from fastapi import HTTPException
from pydantic import BaseModel, Field

from nanogrid_backend.controller import jobs
from nanogrid_backend.controller import load_runner as loadtest
from nanogrid_backend.grid import Grid
from nanogrid_backend.models import FunctionRecord
from nanogrid_contract.errors import InvalidArgument

KEPT_PER_OWNER = 20
CALL_WAIT_S = 2.0


class LoadTestRequest(BaseModel):
    function_id: str = Field(max_length=64)
    rps: float = Field(10.0, gt=0, le=loadtest.MAX_RPS)
    duration_s: float = Field(10.0, gt=0, le=loadtest.MAX_DURATION_S)
    payload: Any = Field(None, description="JSON event, for a handler function")
    args: list[Any] = Field([], description="JSON arguments, for a Python function")


class LoadTests:
    """The controller's load tests, newest last per owner."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.tests: dict[str, list[tuple[str, FunctionRecord, loadtest.LoadTest]]] = {}
        self.lock = threading.Lock()

    def start(
        self,
        owner: str,
        function: FunctionRecord,
        body: LoadTestRequest,
        max_timeout_s: float | None,
    ) -> str:
        try:
            loadtest.check_bounds(body.rps, body.duration_s)
        except InvalidArgument as exc:
            raise HTTPException(422, str(exc)) from None
        if function.kind == "pickle":
            payload = ("pickle", cloudpickle.dumps((tuple(body.args), {})))
        else:
            payload = ("json", json.dumps(body.payload).encode())
        with self.lock:
            mine = self.tests.setdefault(owner, [])
            if any(not test.done for _, _, test in mine):
                raise HTTPException(
                    409, "a load test of yours is still running; wait for it to end"
                )
            test_id = "lt-" + uuid.uuid4().hex[:12]
            test = loadtest.LoadTest(body.rps, body.duration_s, 0)
            mine.append((test_id, function, test))
            del mine[:-KEPT_PER_OWNER]

        def call() -> str | None:
            return self.call(function, payload, owner, max_timeout_s)

        def run() -> None:
            finished = loadtest.run(
                call, body.rps, body.duration_s, on_progress=lambda t: self._mirror(t, test)
            )
            self._mirror(finished, test)

        threading.Thread(target=run, name=f"loadtest-{test_id}", daemon=True).start()
        return test_id

    @staticmethod
    def _mirror(source: loadtest.LoadTest, target: loadtest.LoadTest) -> None:
        """The running test's figures into the listed one (the runner makes its own object)."""
        with source.lock:
            values = {
                name: getattr(source, name)
                for name in (
                    "planned",
                    "sent",
                    "completed",
                    "failed",
                    "started_at",
                    "finished_at",
                    "done",
                )
            }
            errors, latencies = dict(source.errors), list(source.latencies_ms)
        with target.lock:
            for name, value in values.items():
                setattr(target, name, value)
            target.errors, target.latencies_ms = errors, latencies

    def call(
        self,
        function: FunctionRecord,
        payload: tuple[str, bytes],
        owner: str,
        max_timeout_s: float | None,
    ) -> str | None:
        """One call through the grid's own submit path; None if it completed, else why not."""
        (job,) = jobs.new_jobs(function, [payload], owner)
        finished = threading.Event()
        unsubscribe = self.grid.bus.subscribe([job.job_id], lambda _: finished.set())
        try:
            jobs.submit(self.grid, function, [job], None, max_timeout_s)
            deadline = time.monotonic() + function.timeout_s + 30
            while not finished.wait(CALL_WAIT_S) and time.monotonic() < deadline:
                record = self.grid.registry.get_job(job.job_id)
                if record is not None and record.finished:
                    break
        finally:
            unsubscribe()
        record = self.grid.registry.get_job(job.job_id)
        if record is None or not record.finished:
            return "no answer"
        return (
            None
            if record.status == "completed"
            else (record.error or {}).get("kind", record.status)
        )

    def listing(self, owner: str) -> list[dict[str, Any]]:
        with self.lock:
            mine = list(self.tests.get(owner, []))
        return [view(test_id, function, test) for test_id, function, test in reversed(mine)]


def view(test_id: str, function: FunctionRecord, test: loadtest.LoadTest) -> dict[str, Any]:
    return {
        "loadtest_id": test_id,
        "function_id": function.function_id,
        "function_name": function.function_name,
        **test.summary(),
    }
