"""The embedded grid's queue: one FIFO per owner, served in turn, each owner's takes within its cap."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from nanogrid_backend.models import JobMessage
from nanogrid_backend.queue.base import JobQueue

log = logging.getLogger(__name__)

# queued payloads held in memory; the rest stay on disk until their job is taken
MEMORY_BUDGET_BYTES = 32 << 20


class LocalQueue(JobQueue):
    """The embedded grid's queue: in memory, in the process that runs controller and worker.

    Fair between owners: each owner has its own FIFO, and owners are served in turn, so one owner's
    backlog of a thousand calls delays another owner's single call by at most one take per slot (a take is
    one call, or a batch of one function's short calls: ``get_batch``).
    ``limit(owner)`` caps how many of an owner's takes may be out at once (taken and not all acked): a batch runs
    its calls one after the other in one slot, so it counts as one, like a single call. An owner at its cap is
    parked out of the turn until one of its takes is done, so finding the next owner to serve never walks past
    owners who cannot be served. Durability comes from the registry: pending jobs are stored there and put back
    on start.

    Memory stays bounded whatever the backlog: once the payloads held reach ``memory_budget_bytes``, further
    messages are kept without theirs, and ``load_payload(job_id)`` reads it back (from the registry, where
    every pending job's payload already is) when a worker takes the job.
    """

    acks_in_memory = True

    def __init__(
        self,
        limit: Callable[[str], int | None] | None = None,
        load_payload: Callable[[str], bytes | None] | None = None,
        memory_budget_bytes: int = MEMORY_BUDGET_BYTES,
    ) -> None:
        self._limit = limit or (lambda owner: None)
        self._load_payload = load_payload
        # None: everything in memory
        self._budget = memory_budget_bytes if load_payload is not None else None
        self._held_bytes = 0  # payload bytes held in memory
        self._on_disk: set[str] = set()  # job ids queued without their payload
        # owner -> its FIFO; next to serve first
        self._waiting: OrderedDict[str, deque[JobMessage]] = OrderedDict()
        # owners at their cap -> their FIFO, back in turn at an ack
        self._parked: dict[str, deque[JobMessage]] = {}
        # owner -> takes (a call, or a batch) out with workers, not yet acked
        self._out: dict[str, int] = {}
        # job id -> (owner, calls of its take not yet acked)
        self._out_owner: dict[str, tuple[str, list[int]]] = {}
        self._count = 0
        self._changed = threading.Condition()

    def put(self, messages: list[JobMessage], stored: bool = False) -> None:
        """Queue these jobs; ``stored``: the messages carry no payload, it is on disk (a restart's backlog)."""
        with self._changed:
            for message in messages:
                message = self._hold(message, stored)
                fifo = self._waiting.get(message.owner)
                if fifo is None:
                    fifo = self._parked.get(message.owner)
                if fifo is None:
                    # a new owner joins the end of the turn
                    fifo = self._waiting[message.owner] = deque()
                fifo.append(message)
            self._count += len(messages)
            self._changed.notify(len(messages))  # a call wakes one idle slot, not all of them

    def _hold(self, message: JobMessage, stored: bool) -> JobMessage:
        """The message as kept in memory: without its payload when it is on disk or over the budget."""
        if stored or (
            self._budget is not None and self._held_bytes + len(message.payload) > self._budget
        ):
            self._on_disk.add(message.job_id)
            return dataclasses.replace(message, payload=b"") if message.payload else message
        self._held_bytes += len(message.payload)
        return message

    def held_bytes(self) -> int:
        """Payload bytes of queued jobs held in memory (at most the budget when payloads can be read back)."""
        with self._changed:
            return self._held_bytes

    def get(self, timeout: float, want: int = 1) -> JobMessage | None:
        taken = self.get_batch(timeout)
        return taken[0] if taken else None

    def get_batch(
        self,
        timeout: float,
        most: Callable[[JobMessage, int], int] | None = None,
        *,
        want: int = 1,
        max_bytes: int = 1 << 20,
    ) -> list[JobMessage]:
        """The next owner's next job, and with it up to ``most(first, queued) - 1`` more of that owner's queued calls
        of the same function right behind it (``queued``: how many the owner still has waiting); [] after
        ``timeout`` seconds without one. The batch's payloads add up to at most ``max_bytes`` beyond the first's (they
        travel to the sandbox in one frame).

        A batch is one take: one turn of the owner, one place of its cap (its calls run one after the other in one
        slot). The worker sizes ``most`` from how long the function's calls take and leaves the other slots their
        share of the backlog."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while (message := self._next()) is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._changed.wait(left)
            taken = [message]
            if most is not None and message.job_id not in self._on_disk:
                fifo = self._waiting.get(message.owner) or self._parked.get(message.owner)
                taken += self._more_like(
                    message, most(message, len(fifo) if fifo else 0) - 1, max_bytes
                )
            for held in taken:
                if held.job_id not in self._on_disk:
                    self._held_bytes -= len(held.payload)
            if message.job_id not in self._on_disk:
                return taken
        loaded = self._with_payload(message)
        return [loaded] if loaded is not None else []

    def _more_like(self, first: JobMessage, extra: int, max_bytes: int) -> list[JobMessage]:
        """Up to ``extra`` more queued calls of ``first``'s owner and function, from the head of its FIFO, joining
        ``first``'s take; payloads kept on disk end the batch (each is read back on its own). Call
        with the lock held."""
        owner = first.owner
        fifo = self._waiting.get(owner) or self._parked.get(owner)
        if extra <= 0 or not fifo:
            return []
        more: list[JobMessage] = []
        size = 0
        while (
            len(more) < extra
            and fifo
            and fifo[0].function_id == first.function_id
            and fifo[0].job_id not in self._on_disk
            and size + len(fifo[0].payload) <= max_bytes
        ):
            size += len(fifo[0].payload)
            more.append(fifo.popleft())
        if more:
            self._count -= len(more)
            # the batch is one take, done when its last call is acked
            take = self._out_owner[first.job_id][1]
            take[0] += len(more)
            for message in more:
                self._out_owner[message.job_id] = (owner, take)
            if not fifo:
                self._waiting.pop(owner, None)
                self._parked.pop(owner, None)
        return more

    def _with_payload(self, message: JobMessage) -> JobMessage | None:
        """Read a taken job's payload back from disk; if that fails the job goes back to the head of its turn."""
        # messages are only left without payloads when it can be read back
        assert self._load_payload is not None
        try:
            payload = self._load_payload(message.job_id)
        except Exception:
            log.exception(
                "job %s: could not read its arguments back; it stays queued", message.job_id
            )
            with self._changed:
                fifo = (
                    self._parked.pop(message.owner, None)
                    or self._waiting.pop(message.owner, None)
                    or deque()
                )
                fifo.appendleft(message)
                self._waiting[message.owner] = fifo
                self._waiting.move_to_end(message.owner, last=False)
                self._count += 1
                self._forget_out(message.job_id)
            time.sleep(0.5)  # a registry that cannot be read now is not retried in a tight loop
            return None
        with self._changed:
            self._on_disk.discard(message.job_id)
        # None: the job is gone (cancelled and finished while queued); the worker finds it is no longer pending
        return dataclasses.replace(message, payload=payload or b"")

    def _next(self) -> JobMessage | None:
        """The head of the first owner in turn who is under its cap; that owner goes to the end of the turn.
        Owners found at their cap are parked (``_forget_out`` brings them back), so each is passed over once."""
        while self._waiting:
            owner, fifo = self._waiting.popitem(last=False)
            cap = self._limit(owner)
            if cap is not None and self._out.get(owner, 0) >= cap:
                self._parked[owner] = fifo
                continue
            message = fifo.popleft()
            if fifo:
                self._waiting[owner] = fifo  # re-inserted: last in turn
            self._count -= 1
            self._out[owner] = self._out.get(owner, 0) + 1
            self._out_owner[message.job_id] = (owner, [1])
            return message
        return None

    def depth(self) -> int:
        return self._count

    def depth_of(self, owner: str) -> int | None:
        with self._changed:
            return len(self._waiting.get(owner) or self._parked.get(owner) or ())

    def running_of(self, owner: str) -> int:
        """The owner's takes (single calls or batches) out with workers and not yet all acked."""
        with self._changed:
            return self._out.get(owner, 0)

    def discard(self, job_ids: set[str]) -> None:
        """Cancelled jobs leave their owner's FIFO at once: the owner's queue depth says so, and no worker
        spends a turn of the owner's cap taking them only to find them cancelled."""
        with self._changed:
            for fifos in (self._waiting, self._parked):
                for owner, fifo in list(fifos.items()):
                    gone = [message for message in fifo if message.job_id in job_ids]
                    if not gone:
                        continue
                    for message in gone:
                        self._held_bytes -= len(message.payload)  # b"" for those kept on disk
                        self._on_disk.discard(message.job_id)
                    self._count -= len(gone)
                    kept = deque(message for message in fifo if message.job_id not in job_ids)
                    if kept:
                        fifos[owner] = (
                            kept  # an existing key: the owner keeps its place in the turn
                        )
                    else:
                        del fifos[owner]

    def ack(self, message: JobMessage) -> None:
        """The job is done: its owner's share of the slots is free again."""
        with self._changed:
            self._forget_out(message.job_id)

    def _forget_out(self, job_id: str) -> None:
        """The job is no longer out with a worker (call with the lock held)."""
        out = self._out_owner.pop(job_id, None)
        if out is None:
            return
        owner, take = out
        take[0] -= 1
        if take[0]:
            return  # more calls of its batch are still out
        left = self._out[owner] - 1
        if left:
            self._out[owner] = left
        else:
            del self._out[owner]
        parked = self._parked.pop(owner, None)
        if parked is not None:
            self._waiting[owner] = parked  # under its cap again: back at the end of the turn
        if self._count:  # with nothing queued, no waiting slot could take anything: none is woken
            self._changed.notify_all()

    def extend(self, message: JobMessage, seconds: float) -> None:
        pass  # nothing else can take it
