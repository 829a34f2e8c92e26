"""Job state transitions through the Registry interface, on a real SQLite registry in a temporary data dir.

What must never happen: a job run twice because two workers both took it, a cancelled job started
anyway, a finished job reopened or its result replaced by a late duplicate, or a failed delivery
that loses the job.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nanogrid_backend.config import GridConfig
from nanogrid_backend.grid import make_registry
from nanogrid_backend.models import (
    CANCELLED,
    COMPLETED,
    FAILED,
    PENDING,
    RUNNING,
    JobRecord,
    new_job_id,
)
from nanogrid_backend.registry.base import Registry


@pytest.fixture()
def registry(tmp_path: Path) -> Iterator[Registry]:
    registry = make_registry(GridConfig.load(data_dir=tmp_path, dynamodb_table=""))
    yield registry
    close = getattr(registry, "close", None)
    if close is not None:
        close()


def new_job(registry: Registry, owner: str = "alice") -> JobRecord:
    job = JobRecord(new_job_id(), "fn-1", payload=b'{"x": 1}', owner=owner)
    registry.create_jobs([job])
    return job


def finish(registry: Registry, job_id: str, status: str, result: bytes = b"1") -> bool:
    job = registry.get_job(job_id)
    assert job is not None
    job.status, job.result, job.result_format, job.finished_at = status, result, "json", time.time()
    return registry.finish_job(job)


def status_of(registry: Registry, job_id: str) -> str:
    job = registry.get_job(job_id)
    assert job is not None
    return job.status


def test_a_new_job_is_pending_and_only_one_worker_may_take_it(registry):
    job = new_job(registry)
    assert status_of(registry, job.job_id) == PENDING
    assert registry.mark_running(job.job_id, "worker-a", time.time()) is True
    assert registry.mark_running(job.job_id, "worker-b", time.time()) is False
    taken = registry.get_job(job.job_id)
    assert taken is not None and taken.status == RUNNING and taken.worker_id == "worker-a"


def test_a_redelivered_job_may_be_taken_over_from_a_dead_worker(registry):
    job = new_job(registry)
    registry.mark_running(job.job_id, "worker-a", time.time())
    assert registry.mark_running(job.job_id, "worker-b", time.time(), retry=True) is True
    taken = registry.get_job(job.job_id)
    assert taken is not None and taken.worker_id == "worker-b"


def test_the_first_result_wins_and_a_duplicate_changes_nothing(registry):
    job = new_job(registry)
    registry.mark_running(job.job_id, "worker-a", time.time())
    assert finish(registry, job.job_id, COMPLETED, b"first") is True
    assert finish(registry, job.job_id, FAILED, b"second") is False
    done = registry.get_job(job.job_id)
    assert done is not None and done.status == COMPLETED and done.result == b"first"


@pytest.mark.parametrize("final", [COMPLETED, FAILED, CANCELLED])
def test_a_finished_job_is_never_started_again(registry, final):
    job = new_job(registry)
    assert finish(registry, job.job_id, final) is True
    assert registry.mark_running(job.job_id, "worker-a", time.time()) is False
    assert registry.mark_running(job.job_id, "worker-a", time.time(), retry=True) is False
    assert status_of(registry, job.job_id) == final


def test_a_cancelled_pending_job_never_runs(registry):
    job = new_job(registry)
    assert finish(registry, job.job_id, CANCELLED, b"") is True
    assert registry.mark_running(job.job_id, "worker-a", time.time()) is False
    assert [j.job_id for j in registry.list_jobs(status=CANCELLED)] == [job.job_id]
    assert registry.list_jobs(status=PENDING) == []


def test_a_failed_delivery_is_noted_and_the_job_stays_to_be_delivered_again(registry):
    job = new_job(registry)
    registry.mark_running(job.job_id, "worker-a", time.time())
    registry.note_attempt(job.job_id, {"kind": "crash", "message": "the sandbox died"})
    noted = registry.get_job(job.job_id)
    assert (
        noted is not None
        and noted.status == RUNNING
        and noted.error == {"kind": "crash", "message": "the sandbox died"}
    )
    assert registry.mark_running(job.job_id, "worker-b", time.time(), retry=True) is True
    assert finish(registry, job.job_id, COMPLETED) is True


def test_states_are_listed_per_owner(registry):
    mine, theirs = new_job(registry, "alice"), new_job(registry, "bob")
    registry.mark_running(mine.job_id, "worker-a", time.time())
    assert [j.job_id for j in registry.list_jobs(status=RUNNING, owner="alice")] == [mine.job_id]
    assert [j.job_id for j in registry.list_jobs(status=PENDING, owner="bob")] == [theirs.job_id]
    assert registry.list_jobs(status=RUNNING, owner="bob") == []
