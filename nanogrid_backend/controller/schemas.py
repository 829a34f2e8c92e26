"""Request and response bodies of the HTTP API (they make the OpenAPI schema complete)."""

from __future__ import annotations

import base64
import json
from typing import Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, Field

from nanogrid_backend.controller.links import LinkSigner
from nanogrid_backend.models import JobRecord
from nanogrid_backend.store.blobs import RESULT_FORMAT


class ErrorDetail(BaseModel):
    """Every error answer has this shape (nanogrid_backend/controller/errors.py)."""

    detail: str = Field(description="what was wrong and what to do")
    error: str = Field(
        description="a stable code: bad_request, unauthorized, not_found, method_not_allowed, conflict, "
        "too_large, invalid, rate_limited, internal, unavailable"
    )
    request_id: str | None = Field(
        None, description="500 only: quote it to the grid's operator; the log has it"
    )


class RunRequest(BaseModel):
    function_id: str = Field(min_length=1, max_length=64)
    payload: Any = Field(None, description="JSON event for handler(event, context) functions")
    args_pickle: str | None = Field(
        None, description="base64 cloudpickle of (args, kwargs), from the Python client"
    )
    blobs: list[str] | None = Field(
        None,
        max_length=256,
        description="SHA-256 of each blob the args pickle references "
        "(uploaded with PUT /v1/blobs/{sha256}; nanogrid/transfer.py)",
    )
    model: str | None = Field(
        None, max_length=200, description="the AI node's model for this call (LLM_MODEL)"
    )


class MapRequest(BaseModel):
    function_id: str = Field(min_length=1, max_length=64)
    payloads: list[Any] | None = Field(None, description="one JSON event per call")
    args_pickle: list[str] | None = Field(
        None, description="one base64 cloudpickle of (args, kwargs) per call"
    )
    blobs: list[list[str]] | None = Field(
        None, description="per call, the blobs its args pickle references"
    )
    model: str | None = Field(
        None, max_length=200, description="the AI node's model for these calls"
    )


class OutputFile(BaseModel):
    name: str
    size: int
    url: str


class JobView(BaseModel):
    job_id: str
    function_id: str
    function_name: str | None = Field(None, description="the function's name (in job lists)")
    status: str = Field(description="pending, running, completed, failed or cancelled")
    result: Any = None
    result_pickle: str | None = None
    result_blob: dict[str, Any] | None = Field(
        None,
        description="a result over the grid's blob threshold: "
        "{sha256, size, format}, read with GET /v1/blobs/{sha256}",
    )
    error: dict[str, Any] | None = None
    stdout: str = ""
    stderr: str = ""
    output_files: list[OutputFile] = []
    execution_time_ms: float | None = None
    peak_memory_bytes: int | None = None
    cold: bool | None = None
    memory_limit_mib: int | None = None
    baseline_memory_bytes: int | None = Field(
        None, description="the sandbox's usage as the call began"
    )
    ai_usage: dict[str, Any] | None = Field(
        None, description="calls and tokens used on the AI node"
    )
    worker_id: str | None = None
    sandbox_id: str | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    trigger: str = Field(
        "call", description="what started it: 'call' (a client, the API) or 'schedule'"
    )

    @classmethod
    def of(
        cls,
        job: JobRecord,
        base_url: str = "",
        with_result: bool = True,
        links: LinkSigner | None = None,
        **extra: Any,
    ) -> JobView:
        """The job as the API shows it; ``with_result=False`` leaves out the result (another owner's, for an admin);
        ``links``: output URLs signed for a browser; ``extra``: fields only some answers carry (``function_name``)."""
        return cls(**cls._fields(job, base_url, with_result, links, **extra))

    @classmethod
    def plain(
        cls,
        job: JobRecord,
        base_url: str = "",
        with_result: bool = True,
        links: LinkSigner | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """``of(...).body()`` without the model in between, for the answers that are most of the traffic (a warm
        ``/v1/run``, each line of ``/v1/map``): the same fields from the same record, in the types the model
        gives them (an output file's name, size and URL; the float fields as floats), at a third of the cost.
        tests/test_fast_run.py checks both agree on every kind of job."""
        fields = cls._fields(job, base_url, with_result, links, **extra)
        fields["output_files"] = [
            {"name": str(f["name"]), "size": int(f["size"]), "url": f["url"]}
            for f in fields["output_files"]
        ]
        for name in _FLOATS:
            if fields.get(name) is not None:
                fields[name] = float(fields[name])
        return fields

    @staticmethod
    def _fields(
        job: JobRecord,
        base_url: str,
        with_result: bool,
        links: LinkSigner | None,
        **extra: Any,
    ) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "job_id": job.job_id,
            "function_id": job.function_id,
            "status": job.status,
            "result": None,
            "result_pickle": None,
            "error": job.error,
            "stdout": job.stdout,
            "stderr": job.stderr,
            "execution_time_ms": job.execution_time_ms,
            "peak_memory_bytes": job.peak_memory_bytes,
            "cold": job.cold,
            "memory_limit_mib": job.memory_limit_mib,
            "baseline_memory_bytes": job.baseline_memory_bytes,
            "ai_usage": job.ai_usage,
            "worker_id": job.worker_id,
            "sandbox_id": job.sandbox_id,
            "created_at": job.created_at,
            "started_at": job.started_at,
            "finished_at": job.finished_at,
            "trigger": job.trigger,
            "output_files": [
                {
                    **f,
                    "url": f"{base_url}/v1/jobs/{job.job_id}/outputs/{quote(f['name'])}"
                    + (f"?{links.query(job.job_id, f['name'], job.owner)}" if links else ""),
                }
                for f in job.output_files
            ],
            **extra,
        }
        if job.result is not None and with_result:
            # stored as a blob: the client downloads it, streamed
            if job.result_format == RESULT_FORMAT:
                fields["result_blob"] = json.loads(job.result)
            elif job.result_format == "json":
                fields["result"] = json.loads(job.result)
            else:
                fields["result_pickle"] = base64.b64encode(job.result).decode()
        return fields

    def body(self) -> dict[str, Any]:
        """As JSON, with only the fields this view was given (a ``result_blob`` only where there is one)."""
        return self.model_dump(mode="json", exclude_unset=True)


_FLOATS = ("execution_time_ms", "created_at", "started_at", "finished_at")


class FunctionView(BaseModel):
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
    source: str = ""
    description: str = ""
    stable_id: str = Field(
        "", description="the id kept across updates through the seed contract's PUT /functions/:id"
    )


class Health(BaseModel):
    status: str = Field(
        description="healthy, or degraded: calls fail now for the reasons in problems"
    )
    problems: list[str] = Field(
        [], description="why calls fail now (a full disk, sandboxes that cannot start)"
    )
    version: str
    runtimes: dict[str, str] = Field(description="runtime name -> Python version it runs")
    sandbox: str
    max_payload_bytes: int | None = Field(
        None, description="the largest argument (pickled) a call may take"
    )
    max_result_bytes: int | None = Field(
        None, description="the largest result (pickled) a call may return"
    )
    blob_threshold_bytes: int | None = Field(
        None, description="values above this travel as blobs (/v1/blobs)"
    )


class Deleted(BaseModel):
    function_id: str
    deleted: bool


class Models(BaseModel):
    endpoint: str
    default: str | None = Field(
        None, description="the model a call gets unless it names one (LLM_MODEL)"
    )
    models: list[str]


class SystemStatus(BaseModel):
    queue_depth: int
    workers: list[dict[str, Any]]
    jobs: dict[str, int]
    blobs: dict[str, int] | None = Field(
        None, description="count and bytes of the caller's stored blobs (an admin: every owner's)"
    )


class CancelRequest(BaseModel):
    job_ids: list[str] = Field(max_length=10_000)


class Cancelled(BaseModel):
    cancelled: int


class LogChunkView(BaseModel):
    stream: Literal["stdout", "stderr"]
    text: str


class LiveLog(BaseModel):
    chunks: list[LogChunkView] = Field(
        description="what the job printed since the cursor given, in order"
    )
    cursor: str = Field(description="pass it as `after` to get what comes next")
    ended: bool = Field(description="the job finished: its record has the whole stdout and stderr")


# What every route may answer besides its own responses (the app's, in the OpenAPI schema)
ERROR_RESPONSES: dict[int | str, dict] = {
    400: {"model": ErrorDetail, "description": "a malformed input (a broken zip, a bad payload)"},
    401: {"model": ErrorDetail, "description": "missing, wrong or revoked API key"},
    404: {
        "model": ErrorDetail,
        "description": "no such function, job or file (for this key's owner)",
    },
    409: {"model": ErrorDetail, "description": "a function pickled by another Python version"},
    413: {"model": ErrorDetail, "description": "too large: body, package, payload or batch"},
    422: {
        "model": ErrorDetail,
        "description": "a request that does not fit the schema, or settings out of range",
    },
    429: {
        "model": ErrorDetail,
        "description": "rate limit: see Retry-After",
        "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}},
    },
}
