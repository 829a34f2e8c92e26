"""What the grid's HTTP API returns for a job and a function, as both sides read it (JSON objects, by key).

The grid builds these with its pydantic models (``nanogrid_backend/controller/schemas.py``), whose fields must be
exactly these keys (a test checks); the client reads them through these types, so a misspelt key is a type error.
"""

from __future__ import annotations

from typing import Any, TypedDict

PENDING, RUNNING, COMPLETED, FAILED, CANCELLED = (
    "pending",
    "running",
    "completed",
    "failed",
    "cancelled",
)
FINAL_STATES = frozenset({COMPLETED, FAILED, CANCELLED})


class OutputFileView(TypedDict):
    name: str
    size: int
    url: str


class ErrorView(TypedDict, total=False):
    """Why a job failed: ``kind`` (exception, timeout, oom, disk, crashed, cancelled, ...), the exception's
    ``type`` and ``message``, and the remote ``traceback``."""

    kind: str
    type: str
    message: str
    traceback: str


class ResultBlobView(TypedDict, total=False):
    """A result over the grid's blob threshold, read with GET /v1/blobs/{sha256}."""

    sha256: str
    size: int
    format: str


class JobView(TypedDict, total=False):
    job_id: str
    function_id: str
    function_name: str | None
    status: str  # PENDING, RUNNING, COMPLETED, FAILED or CANCELLED
    result: Any
    result_pickle: str | None
    result_blob: ResultBlobView | None
    error: ErrorView | None
    stdout: str
    stderr: str
    output_files: list[OutputFileView]
    execution_time_ms: float | None
    peak_memory_bytes: int | None
    cold: bool | None
    memory_limit_mib: int | None
    baseline_memory_bytes: int | None
    ai_usage: dict[str, Any] | None
    worker_id: str | None
    sandbox_id: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    trigger: str  # "call" (a client, the API) or "schedule"


class FunctionView(TypedDict, total=False):
    function_id: str
    function_name: str
    runtime: str
    handler: str
    kind: str
    memory_mib: int
    timeout_s: float
    package_size: int
    python: str
    created_at: float
    source: str
    description: str
    stable_id: str
