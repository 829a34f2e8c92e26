"""The scheduler: starts each schedule's runs as ordinary jobs (``trigger: "schedule"``) when they are due.

Every controller runs one. A firing is claimed in the registry before anything runs: a row unique per
(schedule, due time), written in the same transaction as the run's job (DynamoDB: a conditional put), so
two controllers racing for one due time start one run, and a controller restarted after a firing never
fires it again. A grid that was down fires once for all the due times it missed (a catch-up), never once each.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from datetime import datetime
from typing import TYPE_CHECKING

from nanogrid_backend.models import FiringRecord, JobMessage, JobRecord, ScheduleRecord, new_job_id

if TYPE_CHECKING:
    from nanogrid_backend.grid import Grid

log = logging.getLogger(__name__)

POLL_S = 0.5  # the longest sleep between looks at the schedules known here
LIST_EVERY_S = 5.0  # all schedules are listed again this often (a DynamoDB scan): those another controller made
CATCH_UP_AFTER_S = (
    60.0  # a firing this late (or standing for several due times) is marked a catch-up
)
MISSED_COUNTED = (
    10_000  # due times counted one by one when a cron schedule missed many; more reads as this many
)
ERROR_PAUSE_S = 2.0  # after a registry failure, before trying again


def schedule_id_for(owner: str, name: str) -> str:
    """One schedule per (owner, name): the id says nothing of either."""
    return "sch-" + hashlib.sha256(f"{owner}\0{name}".encode()).hexdigest()[:32]


def next_due_after(schedule: ScheduleRecord, moment: float) -> float:
    """The schedule's first due time strictly after ``moment``."""
    if not schedule.cron:
        steps = math.floor((moment - schedule.anchor) / schedule.period_s) + 1
        return schedule.anchor + max(steps, 1) * schedule.period_s
    from zoneinfo import ZoneInfo

    from cronsim import CronSim

    return next(
        CronSim(schedule.cron, datetime.fromtimestamp(moment, ZoneInfo(schedule.timezone)))
    ).timestamp()


def due_times_between(schedule: ScheduleRecord, first: float, until: float) -> int:
    """How many due times from ``first`` (itself one) to ``until``."""
    if not schedule.cron:
        return int((until - first) // schedule.period_s) + 1
    from zoneinfo import ZoneInfo

    from cronsim import CronSim

    count = 1
    for due in CronSim(schedule.cron, datetime.fromtimestamp(first, ZoneInfo(schedule.timezone))):
        if count >= MISSED_COUNTED or due.timestamp() > until:
            break
        count += 1
    return count


class Scheduler:
    """One thread that sleeps until the earliest due time (or ``poll_s``) and fires what is due."""

    def __init__(
        self, grid: Grid, poll_s: float = POLL_S, list_every_s: float = LIST_EVERY_S
    ) -> None:
        self.grid = grid
        self.poll_s = poll_s
        self.list_every_s = list_every_s
        # as last read: what is due is read again before it fires
        self._known: dict[str, ScheduleRecord] = {}
        self._listed_at = -math.inf
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stopped.clear()
        self._thread = threading.Thread(target=self._run, name="nanogrid-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def wake(self) -> None:
        """A schedule was made or changed here: list them again now rather than at the next listing."""
        self._listed_at = -math.inf
        self._wake.set()

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                wait = self.tick()
            except Exception:
                log.exception("the scheduler could not look at the schedules; trying again")
                wait = ERROR_PAUSE_S
            self._wake.wait(wait)
            self._wake.clear()

    def tick(self, now: float | None = None) -> float:
        """Fire every schedule that is due; the seconds until the next look. A due schedule is read again first:
        another controller may have fired, paused or removed it since it was listed."""
        registry = self.grid.registry
        if time.monotonic() - self._listed_at >= self.list_every_s:
            self._listed_at = time.monotonic()
            self._known = {s.schedule_id: s for s in registry.list_schedules()}
        wait = self.poll_s
        for schedule_id, known in list(self._known.items()):
            moment = time.time() if now is None else now
            if self._stopped.is_set() or known.paused:
                continue
            if known.waiting_due is None and known.next_due > moment:
                wait = min(wait, known.next_due - moment)
                continue
            schedule = registry.get_schedule(schedule_id)
            if schedule is not None and not schedule.paused:
                if schedule.waiting_due is not None:
                    self._start_waiting(schedule)
                if schedule.next_due <= moment:
                    self._fire(schedule, moment)
                schedule = registry.get_schedule(schedule_id)
            if schedule is None:
                del self._known[schedule_id]
            else:
                self._known[schedule_id] = schedule
                wait = min(wait, max(schedule.next_due - moment, 0.0))
        return max(wait, 0.0)

    def _fire(self, schedule: ScheduleRecord, now: float) -> None:
        registry = self.grid.registry
        missed = due_times_between(schedule, schedule.next_due, now)
        firing = FiringRecord(
            schedule.schedule_id,
            schedule.next_due,
            now,
            "started",
            missed=missed,
            catch_up=missed > 1 or now - schedule.next_due > CATCH_UP_AFTER_S,
        )
        if firing.catch_up:
            firing.detail = (
                f"catch-up: one run for {missed} due time{'s' if missed > 1 else ''} missed"
            )
        running = self._running(schedule)
        function = registry.get_function(schedule.function_id)
        job = None
        if function is None:
            firing.outcome, firing.detail = (
                "failed",
                f"function {schedule.function_id} was deleted; deploy it again",
            )
        elif running is not None and schedule.overlap == "skip":
            firing.outcome, firing.detail = "skipped", f"the previous run {running} was still going"
        elif running is not None and schedule.waiting_due is not None:
            firing.outcome = "skipped"
            firing.detail = (
                f"the previous run {running} was still going and another run already waits for it"
            )
        elif running is not None:
            firing.outcome, firing.detail = "queued", f"waits for the previous run {running}"
        else:
            job = self._job(schedule)
            firing.job_id = job.job_id
        if (
            registry.claim_firing(firing, next_due_after(schedule, now), job)
            and job is not None
            and function
        ):
            self._queue(function.timeout_s, function.memory_mib, job)
            log.info("schedule %s fired %s", schedule.name, job.job_id)

    def _start_waiting(self, schedule: ScheduleRecord) -> None:
        """A firing queued behind a run (overlap="queue") starts once that run has ended."""
        if self._running(schedule) is not None or schedule.waiting_due is None:
            return
        function = self.grid.registry.get_function(schedule.function_id)
        if function is None:
            return
        job = self._job(schedule)
        if self.grid.registry.start_waiting_firing(schedule.schedule_id, schedule.waiting_due, job):
            schedule.last_job_id, schedule.waiting_due = job.job_id, None
            self._queue(function.timeout_s, function.memory_mib, job)

    def _running(self, schedule: ScheduleRecord) -> str | None:
        """The schedule's last run, while it is still queued or running (retries included)."""
        if not schedule.last_job_id:
            return None
        job = self.grid.registry.get_job(schedule.last_job_id)
        return job.job_id if job is not None and not job.finished else None

    def _job(self, schedule: ScheduleRecord) -> JobRecord:
        return JobRecord(
            new_job_id(),
            schedule.function_id,
            payload_format=schedule.payload_format,
            payload=schedule.payload,
            owner=schedule.owner,
            trigger="schedule",
        )

    def _queue(self, timeout_s: float, memory_mib: int, job: JobRecord) -> None:
        """Queue a run whose job is recorded (as ``controller.jobs.submit`` does): a restart requeues it if needed."""
        timeout_s = min(timeout_s, self.grid.owners.max_timeout(job.owner))
        self.grid.queue.put(
            [
                JobMessage(
                    job.job_id,
                    job.function_id,
                    job.payload_format,
                    job.payload,
                    timeout_s,
                    memory_mib,
                    owner=job.owner,
                    trigger=job.trigger,
                    created_at=job.created_at,
                )
            ]
        )
