"""The records every adapter stores and passes around: functions and jobs."""

from __future__ import annotations

import base64
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

# A job's states are part of the contract with the client (nanogrid_contract/views.py)
from nanogrid_contract.views import CANCELLED as CANCELLED
from nanogrid_contract.views import COMPLETED as COMPLETED
from nanogrid_contract.views import FAILED as FAILED
from nanogrid_contract.views import FINAL_STATES as FINAL_STATES
from nanogrid_contract.views import PENDING as PENDING
from nanogrid_contract.views import RUNNING as RUNNING


def new_job_id() -> str:
    """``job-`` and 32 hex digits: the time in milliseconds (12), then 80 random bits (20), as a UUIDv7 orders
    them (RFC 9562). A later job's id sorts after an earlier one's, so each new row of the registry's index on
    job ids lands at its right-hand edge: with wholly random ids, every insert touched a page anywhere in that
    index, and a call's three registry writes took 50 µs of CPU in a registry's first 10,000 jobs but 66 µs
    by its 100,000th (ordered: 57 and 54; ``benchmarks/bench_registry_ids.py``). Not a secret: a job is reached
    with its owner's key, or a signed link."""
    return "job-" + format(time.time_ns() // 1_000_000, "012x")[-12:] + os.urandom(10).hex()


@dataclass
class FunctionRecord:
    function_id: str
    function_name: str
    runtime: str
    handler: str
    kind: str  # "pickle" (a cloudpickled callable) or "handler" (module.function(event, context))
    memory_mib: int
    timeout_s: float
    package_size: int
    python: str
    source: str = ""
    created_at: float = field(default_factory=time.time)
    owner: str = ""  # the name of the API key that uploaded it
    description: str = ""
    stable_id: str = ""  # the id a function keeps across updates (the seed contract's PUT /functions/:id); "" if none

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class JobRecord:
    job_id: str
    function_id: str
    status: str = PENDING
    payload_format: str = "json"  # "json" or "pickle"
    payload: bytes = b""
    result_format: str | None = None
    result: bytes | None = None
    error: dict[str, Any] | None = None
    stdout: str = ""
    stderr: str = ""
    output_files: list[dict[str, Any]] = field(default_factory=list)
    execution_time_ms: float | None = None
    peak_memory_bytes: int | None = None
    cold: bool | None = None
    memory_limit_mib: int | None = None
    baseline_memory_bytes: int | None = None
    ai_usage: dict[str, Any] | None = None  # calls and tokens the function used on the AI node
    worker_id: str | None = None
    sandbox_id: str | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    owner: str = ""
    attempt: int = 1  # which try this record is (``@remote(retries=N)`` makes more)
    retry_of: str | None = None  # on an earlier failed try's own record: the job it was a try of
    # what started it: "call" (a client or the HTTP API) or "schedule" (nanogrid_backend/schedules.py)
    trigger: str = "call"

    @property
    def finished(self) -> bool:
        return self.status in FINAL_STATES


def job_to_json(job: JobRecord) -> str:
    values = asdict(job)
    for name in ("payload", "result"):
        values[name] = None if values[name] is None else base64.b64encode(values[name]).decode()
    return json.dumps(values)


def job_from_json(text: str | bytes) -> JobRecord:
    values = json.loads(text)
    for name in ("payload", "result"):
        values[name] = None if values[name] is None else base64.b64decode(values[name])
    return JobRecord(**values)


@dataclass
class ApiKey:
    """An API key as stored: never the key itself, only its SHA-256."""

    key_id: str
    name: str  # the owner: functions and jobs made with any of a name's keys belong to that name
    key_hash: str
    created_at: float = field(default_factory=time.time)
    revoked_at: float | None = None
    rate_limit: float | None = None  # requests per second; None: the grid's default
    rate_burst: int | None = None
    admin: bool = (
        False  # sees every owner's jobs and workers in /system/status and /jobs?all_owners=true
    )
    max_timeout_s: float | None = None  # lower than the grid's max_timeout_s; None: the grid's
    max_concurrency: int | None = (
        None  # this owner's calls running at once; None: the grid's owner_max_concurrency
    )
    disk_quota_bytes: int | None = (
        None  # this owner's stored outputs; None: the grid's owner_disk_quota_bytes
    )


@dataclass
class SecretRecord:
    """A named set of environment variables, encrypted at rest (nanogrid_backend/secretbox.py);
    only its variable names are ever shown."""

    owner: str
    name: str
    ciphertext: bytes
    variables: list[str] = field(default_factory=list)  # the names, never the values
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)


@dataclass
class JobMessage:
    """What travels on the queue: everything a worker needs to run the call without a lookup."""

    job_id: str
    function_id: str
    payload_format: str
    payload: bytes
    timeout_s: float
    memory_mib: int
    model: str | None = None  # the AI node's model for this call (else the grid's LLM_MODEL)
    receipt: str | None = None  # the queue's handle for this delivery (SQS receipt handle)
    receive_count: int = 1  # more than 1: delivered again after a worker died or stalled
    owner: str = (
        ""  # the job's owner: the queue serves owners in turn and caps each one's running calls
    )
    trigger: str = "call"  # the job's trigger, kept on the record the worker publishes
    created_at: float | None = (
        None  # when the job was recorded, kept on that record too (None: not known)
    )


@dataclass
class ScheduleRecord:
    """A function that runs on its own: by a cron expression in a time zone, or every ``period_s`` seconds.

    One per (owner, name); deploying a new version of the function points it at that version."""

    schedule_id: str
    owner: str
    name: str  # the function's name: the schedule's name for its owner
    function_id: str  # the version it runs
    cron: str = ""  # a five-field cron expression, or "" for a period
    period_s: float = 0.0
    timezone: str = "UTC"  # the zone the cron expression's hours and days are read in
    overlap: str = (
        "skip"  # a run still going when the next is due: "skip" that firing, or "queue" it behind
    )
    payload_format: str = "pickle"
    payload: bytes = b""  # the arguments of every run (no arguments: an empty call)
    paused: bool = False
    anchor: float = 0.0  # a period's due times are anchor + k * period_s
    next_due: float = 0.0  # the next due time not yet claimed by a firing
    last_job_id: str | None = None  # the latest run's job
    waiting_due: float | None = (
        None  # a firing queued behind a run still going (overlap="queue"), by its due time
    )
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)


@dataclass
class FiringRecord:
    """One due time of a schedule, claimed by exactly one scheduler (unique per (schedule_id, due_time))."""

    schedule_id: str
    due_time: float
    fired_at: float
    outcome: str  # "started" (a job), "skipped" (a run was still going), "queued" (waits for it), "failed"
    job_id: str | None = None
    missed: int = (
        1  # due times this firing stands for: more than 1 after the grid was down (a catch-up)
    )
    catch_up: bool = False
    detail: str = ""
