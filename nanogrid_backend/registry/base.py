"""The registry's interface: one small protocol per concern (functions, jobs, history, ...) and their union."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from nanogrid_backend.models import (
    PENDING,
    ApiKey,
    FiringRecord,
    FunctionRecord,
    JobRecord,
    ScheduleRecord,
    SecretRecord,
)
from nanogrid_contract.errors import NanoGridError


class RegistryError(NanoGridError):
    """The registry cannot be used as it stands (damaged, too new, held by another grid); the
    message says what to do."""


class RegistryBusy(RegistryError):
    """Another process held the registry's write lock for longer than a write may wait; nothing was written."""


@dataclass
class FunctionStats:
    """Finished jobs of one function in one final status: what /metrics and the seed's function list show."""

    function_id: str
    status: str
    count: int
    total_ms: float  # the worker's whole turn (started -> finished), summed
    handler_ms: float  # the function's own run time (execution_time_ms), summed
    handler_count: int  # jobs that have one
    # jobs whose total time is <= each bucket bound (cumulative, as Prometheus counts)
    total_buckets: list[int]
    handler_buckets: list[int]


@dataclass
class HistoryEntry:
    """A call in a history page: its record with stdout/stderr cut to the page's cap, and their full sizes."""

    job: JobRecord
    stdout_size: int
    stderr_size: int


class FunctionRegistry(Protocol):
    """Deployed functions: one record per function id (its latest version)."""

    @abstractmethod
    def put_function(self, function: FunctionRecord) -> None: ...

    @abstractmethod
    def get_function(self, function_id: str) -> FunctionRecord | None: ...

    @abstractmethod
    def list_functions(self, owner: str | None = None) -> list[FunctionRecord]: ...

    @abstractmethod
    def delete_function(self, function_id: str) -> bool: ...


class JobRegistry(Protocol):
    """Calls from creation to their final state: what workers, result buses and the queue's recovery read and write."""

    @abstractmethod
    def create_jobs(self, jobs: list[JobRecord]) -> None: ...

    def create_jobs_now(self, jobs: list[JobRecord]) -> bool:
        """``create_jobs`` only if it takes no waiting (the event loop calls it, and must never wait); False, and
        nothing written, when it would: a network round trip, a lock held. Only a local registry can say yes."""
        return False

    @abstractmethod
    def mark_running(
        self, job_id: str, worker_id: str, started_at: float, retry: bool = False
    ) -> bool:
        """Pending -> running; False if the job is no longer pending (cancelled, or run elsewhere).

        ``retry``: a redelivered message, whose first worker died, may also take over a running job.
        """

    @abstractmethod
    def finish_job(self, job: JobRecord) -> bool:
        """Store a final state; False (and nothing written) if the job already had one."""

    def mark_running_many(self, job_ids: list[str], worker_id: str, started_at: float) -> set[str]:
        """``mark_running`` for a worker's batch of calls; the ids that were pending. A registry with transactions
        does it in one."""
        return {job_id for job_id in job_ids if self.mark_running(job_id, worker_id, started_at)}

    def finish_jobs(self, jobs: list[JobRecord]) -> list[bool]:
        """``finish_job`` for a batch of outcomes; a registry with transactions records them in one (group commit)."""
        return [self.finish_job(job) for job in jobs]

    @abstractmethod
    def note_attempt(self, job_id: str, error: dict) -> None:
        """Record why a delivery failed, leaving the job to be delivered again."""

    @abstractmethod
    def record_attempt(self, attempt: JobRecord) -> None:
        """Keep a failed try of a call that is being tried again, as its own finished record (counted in windows)."""

    @abstractmethod
    def get_job(self, job_id: str) -> JobRecord | None: ...

    @abstractmethod
    def list_jobs(
        self, limit: int = 50, status: str | None = None, owner: str | None = None
    ) -> list[JobRecord]: ...

    def pending_jobs(self, batch: int = 1000) -> Iterator[JobRecord]:
        """Pending jobs, oldest first, without their payloads (``get_job`` has them): a restart's backlog."""
        for job in reversed(self.list_jobs(limit=-1, status=PENDING)):
            job.payload = b""
            yield job

    @abstractmethod
    def count_jobs(self, owner: str | None = None) -> dict[str, int]:
        """How many jobs are in each status (all of them, not a page), counted where they are stored."""


class HistoryRegistry(Protocol):
    """Finished calls looked back on: history pages, per-function figures and metrics, and their pruning."""

    @abstractmethod
    def function_stats(
        self, owner: str | None = None, buckets_ms: tuple[float, ...] = ()
    ) -> list[FunctionStats]:
        """Finished jobs per (function, status): counts, summed times and cumulative counts per bucket bound."""

    @abstractmethod
    def list_history(
        self,
        owner: str,
        function_id: str | None = None,
        status: str | None = None,
        limit: int = 50,
        before: tuple[float, str] | None = None,
        text_cap: int = 2048,
    ) -> list[HistoryEntry]:
        """An owner's calls (of one function), newest first, older than ``before`` = (created_at, job_id)."""

    @abstractmethod
    def function_windows(
        self, function_id: str, now: float | None = None, names: tuple[str, ...] | None = None
    ) -> dict[str, dict[str, Any]]:
        """The 1h/24h/7d/30d figures of a function (nanogrid_backend/registry/windows.py), summed where they are stored;
        ``names``: only these windows."""

    @abstractmethod
    def function_timeline(
        self, function_id: str, window: str, now: float | None = None
    ) -> list[tuple[int, int, int]]:
        """(slot start, calls, failed calls) per slot of a window that had calls, oldest first, from the same counters
        as ``function_windows`` (minutes for 1h, hours for the others)."""

    @abstractmethod
    def prune_history(self, before: float) -> int:
        """Delete finished calls created before ``before``; how many."""


class SecretRegistry(Protocol):
    """Owners' secrets, stored sealed (nanogrid_backend/secretbox.py)."""

    @abstractmethod
    def put_secret(self, secret: SecretRecord) -> None: ...

    @abstractmethod
    def get_secret(self, owner: str, name: str) -> SecretRecord | None: ...

    @abstractmethod
    def list_secrets(self, owner: str) -> list[SecretRecord]: ...

    @abstractmethod
    def delete_secret(self, owner: str, name: str) -> bool: ...


class WebhookRegistry(Protocol):
    """Owners' webhooks (nanogrid_backend/notify.py)."""

    @abstractmethod
    def put_webhook(self, hook: dict[str, Any]) -> None: ...

    @abstractmethod
    def list_webhooks(self, owner: str | None = None) -> list[dict[str, Any]]: ...

    @abstractmethod
    def delete_webhook(self, owner: str, hook_id: str) -> bool: ...


class KeyRegistry(Protocol):
    """API keys and the owners they name (nanogrid_backend/keys.py)."""

    @abstractmethod
    def put_key(self, key: ApiKey) -> None: ...

    @abstractmethod
    def get_key(self, key_id: str) -> ApiKey | None: ...

    @abstractmethod
    def list_keys(self) -> list[ApiKey]: ...


class ScheduleRegistry(Protocol):
    """Schedules and their firings (nanogrid_backend/schedules.py)."""

    @abstractmethod
    def put_schedule(self, schedule: ScheduleRecord) -> None: ...

    @abstractmethod
    def get_schedule(self, schedule_id: str) -> ScheduleRecord | None: ...

    @abstractmethod
    def list_schedules(self, owner: str | None = None) -> list[ScheduleRecord]: ...

    @abstractmethod
    def delete_schedule(self, schedule_id: str) -> bool:
        """The schedule and its firings; the jobs it ran stay."""

    @abstractmethod
    def set_schedule_paused(self, schedule_id: str, paused: bool, next_due: float) -> bool: ...

    @abstractmethod
    def claim_firing(self, firing: FiringRecord, next_due: float, job: JobRecord | None) -> bool:
        """Claim the due time ``firing.due_time`` (the schedule's ``next_due`` as read) for this scheduler: record the
        firing and its run's job and move the schedule on to ``next_due``, all or nothing. False when another
        scheduler claimed that due time first (then nothing of this firing is written)."""

    @abstractmethod
    def start_waiting_firing(self, schedule_id: str, due_time: float, job: JobRecord) -> bool:
        """Start the run of a firing that was queued behind another (overlap="queue"); False if already started."""

    @abstractmethod
    def list_firings(self, schedule_id: str, limit: int = 20) -> list[FiringRecord]:
        """The schedule's firings, newest due time first."""


@runtime_checkable
class VolumeRegistry(Protocol):
    """Owners' volume records (nanogrid_backend/volumes.py, volume_sync.py): name, size, when made."""

    @abstractmethod
    def put_volume(self, volume: dict[str, Any]) -> None: ...

    @abstractmethod
    def get_volume(self, owner: str, name: str) -> dict[str, Any] | None: ...

    @abstractmethod
    def list_volumes(self, owner: str) -> list[dict[str, Any]]: ...

    @abstractmethod
    def delete_volume(self, owner: str, name: str) -> bool: ...


class Registry(
    FunctionRegistry,
    JobRegistry,
    HistoryRegistry,
    SecretRegistry,
    WebhookRegistry,
    KeyRegistry,
    ScheduleRegistry,
    ABC,
):
    """Where functions and jobs are recorded, so a controller restart loses nothing: every concern above, in one store.

    Code that needs one concern takes its protocol (a ``JobRegistry``, a ``KeyRegistry``); the grid hands it this."""

    def disk_full(self) -> bool:
        """True while the registry's disk has no room to grow, so no call can be recorded (a local file's concern)."""
        return False

    def close(self) -> None:
        """Let go of connections and files (nothing to let go of by default)."""
        return None
