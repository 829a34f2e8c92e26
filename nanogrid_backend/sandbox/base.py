"""What every sandbox shares: the call, its checks, and receiving output files over the channel.

The function runs inside the bootstrap's own interpreter, so anything the sandbox sends may be
forged. The host takes from it only what it checks: a reply header validated field by field,
a result no larger than the grid's cap, output files received as records and written by the
host (``outputs.py``). Duration and peak memory are the host's own measurements (the sandbox's
figure is used only where it is smaller, since the host's clock includes the channel); AI
usage is counted by the host's gateway. Any breach ends the call with a ``protocol`` error and
the sandbox is discarded.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from nanogrid_backend.sandbox.cgroup import MemoryCgroup
from nanogrid_backend.sandbox.outputs import HostWriteFailed, OutputQuotaExceeded, OutputWriter
from nanogrid_backend.sandbox.protocol import (
    CHUNK_BYTES,
    ChannelClosed,
    ChannelTimeout,
    FrameReader,
    FrameTooLarge,
    ProtocolViolation,
    check_need,
    check_reply,
)

if TYPE_CHECKING:
    from nanogrid_backend.volumes import VolumeSet

# argument blobs and streamed results travel in frames of at most this many bytes
BLOB_CHUNK_BYTES = 4 << 20
# a reply's own body; the bootstrap streams results over 1 MiB in pieces
INLINE_RESULT_BYTES = 16 << 20
OUTPUT_TIMEOUT_S = (
    120.0  # to receive one call's output files, however slowly the sandbox sends them
)
MAX_REPORTED_BYTES = 1 << 50  # a peak memory figure above this is nonsense
SPOOL_BUFFERS = (
    3  # pieces of a streamed result held by the host at once (received, being written, spare)
)
BLOB_CACHE_SHARE = (
    4  # a warm sandbox keeps the blobs it received in up to 1/4 of its function's memory
)
SENT_BLOBS_REMEMBERED = (
    1024  # per sandbox; above the bootstrap's own count (BlobCache.MAX_KEPT, 256)
)


class SandboxError(Exception):
    """A call could not finish inside its sandbox; ``kind`` says why (timeout, memory, crash, ...)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass
class Limits:
    """What the host accepts from one call, whatever the sandbox says."""

    capture_bytes: int = 1 << 20  # stdout and stderr each
    result_bytes: int = 64 << 20  # the pickled or JSON result (or exception)
    output_bytes: int = 1 << 30  # all output files of one call
    output_files: int = 10_000


LIVE_FRAME_BYTES = 64 << 10  # the bootstrap sends live output in pieces of at most this size
OutputListener = Callable[[str, bytes], None]


class AISession(Protocol):
    """One call's access to the AI node through the host (nanogrid_backend/worker/ai_gateway.py)."""

    usage: dict[str, int]

    def forward(
        self, header: dict[str, Any], body: bytes, deadline: float
    ) -> tuple[dict[str, Any], bytes]: ...


@dataclass
class CallResult:
    reply: dict[str, Any]  # the validated reply header: ok, error, stdout, stderr, result_format
    body: bytes  # the pickled or JSON-encoded value (or the pickled exception)
    peak_memory_bytes: int | None
    output_dir: (
        Path  # the files the call wrote, received by the host, to be stored before the next call
    )
    baseline_memory_bytes: int | None = (
        None  # the sandbox's own usage when the call began (the peak includes it)
    )
    duration_ms: float = 0.0  # measured by the host
    output_files: list[str] = field(default_factory=list)
    ai_usage: dict[str, int] | None = None  # counted by the host's AI gateway
    result_file: Path | None = (
        None  # a large result, spooled to disk as it arrived (then ``body`` is empty) ...
    )
    result_sha256: str = ""  # ... and its SHA-256, computed by the host as it was written
    blob_bytes_sent: int = 0  # argument blobs streamed into the sandbox for this call ...
    blobs_kept: int = (
        0  # ... and how many of the call's blobs it still kept from earlier calls (not sent again)
    )


@dataclass
class CallBlobs:
    """The blobs a call's args pickle references, in its order: their SHA-256s and sizes, and ``files(indices)``,
    a context manager giving local files of those blobs only. The files of blobs the sandbox still keeps are never
    asked for: not fetched from a remote store, not read, not hashed again."""

    ids: list[str]
    sizes: list[int]
    files: Callable[[list[int]], AbstractContextManager[list[Path]]]

    @classmethod
    def of_files(cls, paths: list[Path], ids: list[str]) -> CallBlobs:
        return cls(
            ids,
            [path.stat().st_size for path in paths],
            lambda indices: nullcontext([paths[n] for n in indices]),
        )


class _Spool:
    """Writes and hashes a streamed result's pieces on a thread of its own (both release the GIL), so the host's
    work on one piece overlaps the channel's delivery of the next; ``SPOOL_BUFFERS`` pieces in memory at most."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("wb")
        self.digest = hashlib.sha256()
        self.error: BaseException | None = None
        self.free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self.full: queue.SimpleQueue[tuple[bytearray, memoryview] | None] = queue.SimpleQueue()
        self.made = 0
        self.thread = threading.Thread(target=self._run, name="result-spool", daemon=True)
        self.thread.start()

    def free_buffer(self) -> bytearray:
        if self.error is not None:
            raise self.error
        if self.made < SPOOL_BUFFERS and self.free.empty():
            self.made += 1
            return bytearray(BLOB_CHUNK_BYTES)
        return self.free.get()

    def write(self, buffer: bytearray, piece: memoryview) -> None:
        self.full.put((buffer, piece))

    def finish(self, abort: bool = False) -> str:
        """The SHA-256 of what was written, once it is all on disk; the writer's error, if it had one."""
        self.full.put(None)
        self.thread.join()
        self.file.close()
        if self.error is not None and not abort:
            raise self.error
        return self.digest.hexdigest()

    def _run(self) -> None:
        while (item := self.full.get()) is not None:
            buffer, piece = item
            try:
                if self.error is None:
                    self.file.write(piece)
                    self.digest.update(piece)
            # raised in the receiving thread at its next piece, or at the end
            except BaseException as exc:
                self.error = exc
            finally:
                piece.release()
                self.free.put(buffer)


def _out_of_memory(reply: dict[str, Any]) -> bool:
    """The call ended in a MemoryError: the bootstrap ends its batch there, and the host discards the sandbox."""
    return not reply["ok"] and reply["error"].get("kind") == "memory"


class Sandbox(ABC):
    """One isolated bootstrap process. Starts unspecialised; ``load`` binds it to one function for life."""

    id: str
    function_id: str | None = None
    python: str = ""
    blob_cache: bool = (
        False  # the bootstrap keeps blobs between calls and says which it needs (its ready frame)
    )
    # sha256 -> size of what this sandbox was sent, least recently used first
    _blobs_sent: OrderedDict[str, int]
    memory_mib: int = 0
    ai_allowed: bool = False  # loaded with the AI node's settings: its AI requests are forwarded
    cgroup: MemoryCgroup | None = (
        None  # where the per-call peak is read; None: the bootstrap reports VmHWM
    )
    volumes: VolumeSet | None = (
        None  # the owner's volumes it binds, from its start (nanogrid_backend/volumes.py)
    )
    output_dir: Path  # written by the host only
    limits: Limits
    reader: FrameReader  # the bootstrap's replies
    # Calls of the running batch that may still be skipped (not answered yet), and those the host asked to skip.
    # Sent from a cancelling thread while the batch runs: one lock for all sandboxes (cancels are rare).
    _skip_lock = threading.Lock()
    _skippable: set[str] = set()  # replaced per batch, never mutated through the class
    _skipped: set[str] = set()

    @abstractmethod
    def load(
        self, function_id: str, package: bytes, memory_mib: int, env: dict[str, str] | None = None
    ) -> None: ...

    def call(
        self,
        job_id: str,
        payload: bytes,
        timeout_s: float,
        model: str | None = None,
        ai: AISession | None = None,
        on_output: OutputListener | None = None,
        blobs: list[Path] | CallBlobs | None = None,
        blob_ids: list[str] | None = None,
    ) -> CallResult:
        """Run one call and receive its output files; raises SandboxError when the sandbox failed (it is then dead).

        ``on_output(stream, data)`` receives what the call prints while it runs (``stdout``/``stderr``,
        every 0.1 s, at most the capture limit in all); the reply still carries the whole capture.
        ``blobs``: files the args pickle references (nanogrid_backend/store/blobs.py), streamed to
        the sandbox after the call frame in ``blob`` frames; the call header lists their sizes. A
        result the bootstrap streams back (``result_size`` in its reply, then ``result_data`` frames)
        is spooled to ``CallResult.result_file``.
        ``blob_ids``: the blobs' SHA-256s; with them a bootstrap that keeps blobs (``blob_cache``) is sent only
        those it says it lacks (``_needed``). ``CallBlobs`` instead of files: the same, and only the files of the
        blobs the sandbox lacks are fetched and read at all.
        """
        if not isinstance(blobs, CallBlobs):
            blobs = CallBlobs.of_files(blobs or [], blob_ids or [])
        call_blobs = blobs
        return self._guarded(
            lambda: self._call(job_id, payload, timeout_s, model, ai, on_output, call_blobs)
        )

    def call_many(
        self,
        calls: list[tuple[str, bytes, float]],
        model: str | None = None,
        on_reply: Callable[[int], None] | None = None,
    ) -> tuple[list[CallResult], SandboxError | None]:
        """Several short calls, (job id, payload, timeout) each, sent in one ``calls`` frame: the bootstrap runs them in
        order and answers each as it finishes, so each keeps its own timeout and checks. The results of the calls
        that ran, in order, and the error of the one that failed (the sandbox is then dead), if any; calls after
        the last result never started. A call that wrote output files, returned a large result (streamed or left in
        the sandbox's working directory) or ran out of memory ends the batch: its files and result are received
        before any other call may write its own, and the rest are left unstarted.
        ``on_reply(n)``: n calls are answered, so call n (from 0) is the one running now.
        No AI node, no live output, no blobs here: such calls go through ``call``."""
        results: list[CallResult] = []

        def run() -> None:
            baseline = None
            if self.cgroup:  # a batch's peak: the highest since the batch began, as each call ends
                self.cgroup.reset_peak()
                baseline = self.cgroup.usage()
            header = {
                "op": "calls",
                "measure_rss": self.cgroup is None,
                "model": model,
                "calls": [
                    {"job_id": job_id, "timeout": timeout_s, "size": len(payload)}
                    for job_id, payload, timeout_s in calls
                ],
            }
            started = time.monotonic()
            try:
                self._send(header, b"".join(payload for _, payload, _ in calls))
            except SandboxError as exc:
                raise (
                    SandboxError(
                        "unstarted", "the sandbox had died before the calls reached it; none ran"
                    )
                    if exc.kind == "crash"
                    else exc
                ) from None
            with Sandbox._skip_lock:
                self._skippable, self._skipped = {job_id for job_id, _, _ in calls}, set()
            for job_id, _, timeout_s in calls:
                result = self._answer(job_id, timeout_s, started, None, None, baseline)
                with Sandbox._skip_lock:
                    self._skippable.discard(job_id)
                if (
                    result.reply.get("error", {}).get("kind") == "cancelled"
                    and job_id not in self._skipped
                ):
                    raise ProtocolViolation(
                        "a call answered as cancelled that the host never cancelled"
                    )
                results.append(result)
                if on_reply is not None:
                    on_reply(len(results))
                if (
                    result.reply.get("output_files")
                    or "result_size" in result.reply
                    or _out_of_memory(result.reply)
                ):
                    return  # the bootstrap ended the batch there (see call_many's docstring)
                # A sandbox that died now may still have answered the calls after this one: their replies left it
                # before the next call started, so they are read, never taken for calls that did not run.
                started = time.monotonic()

        try:
            self._guarded(run)
        except SandboxError as exc:
            return results, exc
        finally:
            self._end_batch()
        return results, None

    def skip(self, job_id: str) -> bool:
        """Ask the bootstrap not to start a call that waits in the batch it runs (the call was cancelled); its reply
        then says so. False when it is too late to ask: the call already started, or is not in a running batch."""
        with Sandbox._skip_lock:
            if job_id not in self._skippable:
                return False
            self._skippable.discard(job_id)
            self._skipped.add(job_id)
            try:
                self._send({"op": "skip", "job_id": job_id})
            except SandboxError:
                return False
            return True

    def _end_batch(self) -> None:
        """No more skips: the host is about to send the sandbox something else (output files), or the batch ended."""
        with Sandbox._skip_lock:
            self._skippable = set()

    def _guarded(self, work: Callable[[], Any]) -> Any:
        """``work()``, with every failure turned into a SandboxError and the sandbox discarded."""
        try:
            return work()
        except SandboxError:
            raise
        except ProtocolViolation as exc:
            self.close()
            raise SandboxError(
                "protocol", f"protocol violation: {exc}; the sandbox was discarded"
            ) from None
        except OutputQuotaExceeded as exc:
            self.close()
            raise SandboxError("output", f"{exc}; none were kept") from None
        except HostWriteFailed as exc:
            self.close()
            raise SandboxError(
                "storage",
                f"the grid could not store this call's output files ({exc}); none were kept",
            ) from None
        except BaseException:
            self.close()  # whatever went wrong, this sandbox never serves again
            raise

    def _call(
        self,
        job_id: str,
        payload: bytes,
        timeout_s: float,
        model: str | None,
        ai: AISession | None,
        on_output: OutputListener | None,
        blobs: CallBlobs,
    ) -> CallResult:
        baseline = None
        if self.cgroup:
            self.cgroup.reset_peak()
            baseline = self.cgroup.usage()
        header = {
            "op": "call",
            "job_id": job_id,
            "timeout": timeout_s,
            "measure_rss": self.cgroup is None,
            "model": model,
            "live": on_output is not None,
        }
        blob_ids, sizes = blobs.ids, blobs.sizes
        ask = bool(sizes) and self.blob_cache and len(blob_ids) == len(sizes)
        if sizes:
            header["blobs"] = sizes
        if ask:
            header["blob_ids"], header["cache_bytes"] = (
                blob_ids,
                (self.memory_mib << 20) // BLOB_CACHE_SHARE,
            )
        started = time.monotonic()
        try:
            self._send(header, payload)
            need = (
                self._needed(blob_ids, sizes, started + timeout_s)
                if ask
                else list(range(len(sizes)))
            )
            if need:
                # BlobError here: the sandbox is discarded, mid-call
                with blobs.files(need) as files:
                    for path in files:
                        self._send_blob(path)
        except SandboxError as exc:
            if exc.kind != "crash":
                raise
            # Nothing of the call reached the bootstrap: not the function's crash, and safe to try again.
            raise SandboxError(
                "unstarted",
                "the sandbox had died before the call reached it; the function did not run",
            ) from None
        if ask:
            self._note_sent(blob_ids, sizes)
        result = self._answer(job_id, timeout_s, started, ai, on_output, baseline)
        # only a call of a batch is ever skipped
        if result.reply.get("error", {}).get("kind") == "cancelled":
            raise ProtocolViolation("a single call answered as cancelled")
        result.blob_bytes_sent = sum(sizes[n] for n in need)
        result.blobs_kept = len(sizes) - len(need)
        return result

    def _send_blob(self, path: Path) -> None:
        """One blob of the call, in pieces: the grid never holds a whole blob in memory."""
        with path.open("rb") as f:
            while chunk := f.read(BLOB_CHUNK_BYTES):
                self._send({"op": "blob"}, chunk)

    def _needed(self, blob_ids: list[str], sizes: list[int], deadline: float) -> list[int]:
        """Which of the call's blobs the bootstrap says it lacks (its ``need`` frame), checked.

        Its answer is only ever a hint to save sending: it may ask only for blobs of this call, and it may
        claim to keep only blobs this host sent it (of the same size). Either lie is a protocol violation:
        the call fails and the sandbox is discarded. A claim the host cannot refute (a blob it did send,
        since dropped) can only fail this owner's own call, in the sandbox (ArgsUnpickler says which blob).
        """
        try:
            frame, body = self._receive(deadline, 0)
        except ChannelTimeout:
            raise ProtocolViolation(
                "the sandbox did not say which of the call's blobs it needs"
            ) from None
        need = check_need(frame, body, len(blob_ids))
        sent = self._blobs_sent
        for n, sha in enumerate(blob_ids):
            if n not in need and sent.get(sha) != sizes[n]:
                raise ProtocolViolation(
                    f"the sandbox claims to keep blob {sha[:12]}…, which it was never sent"
                )
        return need

    def _note_sent(self, blob_ids: list[str], sizes: list[int]) -> None:
        """Remember the call's blobs as sent to (or kept by) this sandbox, most recently used last, boundedly."""
        sent = self._blobs_sent
        for sha, size in zip(blob_ids, sizes, strict=True):
            sent.pop(sha, None)
            sent[sha] = size
        while len(sent) > SENT_BLOBS_REMEMBERED:
            sent.popitem(last=False)

    def _answer(
        self,
        job_id: str,
        timeout_s: float,
        started: float,
        ai: AISession | None,
        on_output: OutputListener | None,
        baseline: int | None,
    ) -> CallResult:
        """Receive and check one call's reply (and its streamed result and output files); the call began at
        ``started`` (monotonic) and may run ``timeout_s``."""
        live_bytes = 0
        deadline = started + timeout_s
        max_body = max(min(self.limits.result_bytes, INLINE_RESULT_BYTES), 1 << 20)
        while True:
            try:
                frame, body = self._receive(deadline, max_body)
            except FrameTooLarge as exc:
                self.close()
                # within the cap, but sent whole: only a forged reply does
                if exc.size <= self.limits.result_bytes:
                    raise ProtocolViolation(
                        f"a reply of {exc.size >> 20} MiB sent whole (at most "
                        f"{INLINE_RESULT_BYTES >> 20} MiB; larger results are streamed)"
                    ) from None
                raise SandboxError(
                    "result",
                    f"the result is {exc.size >> 20} MiB, over the grid's "
                    f"{self.limits.result_bytes >> 20} MiB limit; the sandbox was "
                    "discarded",
                ) from None
            except ChannelTimeout:
                self._stop(graceful=True)
                self.close()
                raise SandboxError(
                    "timeout", f"timed out after {timeout_s:g} s; the sandbox was replaced"
                ) from None
            if frame.get("op") == "ai":
                self._send(*self._forward_ai(ai, frame, body, deadline))
                continue
            if frame.get("op") == "log":
                stream = frame.get("stream")
                live_bytes += len(body)
                if (
                    on_output is None
                    or stream not in ("stdout", "stderr")
                    or len(body) > LIVE_FRAME_BYTES
                    or live_bytes > 2 * self.limits.capture_bytes
                ):
                    raise ProtocolViolation(
                        "live output the host did not ask for, or more than the capture limit"
                    )
                on_output(stream, body)
                continue
            break
        host_ms = (time.monotonic() - started) * 1000
        reply = check_reply(frame, self.limits.capture_bytes)
        if "result_size" in reply and body:
            raise ProtocolViolation("a streamed result whose reply has a body of its own")
        size = len(body) + reply.get("result_size", 0)
        if size > self.limits.result_bytes:
            self.close()
            raise SandboxError(
                "result",
                f"the result is {size >> 20} MiB, over the grid's "
                f"{self.limits.result_bytes >> 20} MiB limit; the sandbox was discarded",
            )
        spooled = (
            self._receive_result(
                job_id, reply["result_size"], deadline, reply.get("result_file", False)
            )
            if "result_size" in reply
            else None
        )
        reported = reply.get("duration_ms")
        duration = (
            min(float(reported), host_ms)
            if isinstance(reported, (int, float)) and reported >= 0
            else host_ms
        )
        if self.cgroup:
            peak = self.cgroup.peak()
        else:
            rss = reply.get("peak_rss_bytes")
            peak = rss if isinstance(rss, int) and 0 <= rss <= MAX_REPORTED_BYTES else None
        if reply.get("output_files"):
            self._end_batch()  # the outputs request is the host's next frame: no skip may interleave with it
        files = self._receive_outputs() if reply.get("output_files") else []
        if _out_of_memory(reply):
            self.close()  # a MemoryError may have left the interpreter in a bad state
        usage = dict(ai.usage) if ai is not None and ai.usage.get("calls") else None
        result = CallResult(reply, body, peak, self.output_dir, baseline, duration, files, usage)
        if spooled is not None:
            result.result_file, result.result_sha256 = spooled
        return result

    def _receive_result(
        self, job_id: str, size: int, deadline: float, in_file: bool = False
    ) -> tuple[Path, str]:
        """A streamed result, written to a spool file as it arrives and hashed; exactly ``size`` bytes, or a
        violation (and no file). Each piece is read into one of a few reused buffers and written and hashed on
        another thread while the next one arrives (``_Spool``). ``in_file``: the sandbox says it left the result
        on its own disk, which only a sandbox whose host reads that disk may say."""
        if in_file:
            raise ProtocolViolation(
                "a result left in a file by a sandbox whose disk the host does not read"
            )
        path = self.output_dir.with_name(f"{self.output_dir.name}.{job_id}.result")
        received = 0
        spool = _Spool(path)
        try:
            while received < size:
                buffer = spool.free_buffer()
                try:
                    header, chunk = self._receive_into(deadline, buffer)
                except ChannelTimeout:
                    raise ProtocolViolation(
                        "the result was not sent within the call's timeout"
                    ) from None
                if (
                    header.get("op") != "result_data"
                    or len(header) != 1
                    or received + len(chunk) > size
                ):
                    raise ProtocolViolation(
                        "a streamed result whose pieces do not add up to its announced size"
                    )
                if not chunk:
                    raise ProtocolViolation("an empty piece of a streamed result")
                received += len(chunk)
                spool.write(buffer, chunk)  # the writer releases ``chunk`` once it is on disk
            return path, spool.finish()
        except BaseException:
            spool.finish(abort=True)
            path.unlink(missing_ok=True)
            raise

    def _receive(self, deadline: float, max_body: int) -> tuple[dict[str, Any], bytes]:
        """One frame by ``deadline`` (ChannelTimeout); SandboxError if the sandbox died; ProtocolViolation if forged."""
        try:
            return self.reader.read(deadline, max_body)
        except (ChannelClosed, OSError):
            raise self._death() from None

    def _receive_into(
        self, deadline: float, buffer: bytearray
    ) -> tuple[dict[str, Any], memoryview]:
        """One frame whose body is read into ``buffer`` (a streamed result's piece), in place."""
        try:
            return self.reader.read_into(deadline, buffer)
        except (ChannelClosed, OSError):
            raise self._death() from None

    def _forward_ai(
        self, ai: AISession | None, frame: dict[str, Any], body: bytes, deadline: float
    ) -> tuple[dict[str, Any], bytes]:
        if ai is None:
            return {
                "op": "ai_reply",
                "status": 403,
            }, b'{"error": "this function did not ask for the AI node: ai=True"}'
        return ai.forward(frame, body, deadline)

    def _receive_outputs(self) -> list[str]:
        """The call's output files, as records the host checks and writes itself."""
        writer = OutputWriter(self.output_dir, self.limits.output_bytes, self.limits.output_files)
        deadline = time.monotonic() + OUTPUT_TIMEOUT_S
        self._send({"op": "outputs", "limit": self.limits.output_bytes})
        try:
            while True:
                try:
                    header, body = self._receive(deadline, CHUNK_BYTES)
                except ChannelTimeout:
                    raise ProtocolViolation(
                        f"output files not sent within {OUTPUT_TIMEOUT_S:g} s"
                    ) from None
                op = header.get("op")
                if op == "file":
                    writer.begin(header.get("name"), header.get("size"))
                elif op == "data":
                    writer.write(body)
                elif op == "done":
                    names = writer.finish()
                    if header.get("ok") is not True:
                        error = header.get("error")
                        said = error.get("message") if isinstance(error, dict) else None
                        raise OutputQuotaExceeded(
                            str(said)[:300] if said else "the output files could not be sent"
                        )
                    return names
                else:
                    raise ProtocolViolation(f"a {str(op)[:40]!r} frame among the output files")
        except BaseException:
            writer.abort()
            raise

    def check_ready(self, frame: dict[str, Any]) -> str:
        """The Python version the bootstrap's first frame names; another language's bootstrap
        (nanogrid_runtimes/node, go, cpp) names its runtime and version instead
        (``{"runtime": "nodejs", "version": "18.19.0"}``)."""
        if frame.get("op") != "ready":
            raise ProtocolViolation("the bootstrap's first frame is not 'ready'")
        python, runtime, version = frame.get("python"), frame.get("runtime"), frame.get("version")
        if (
            python is None
            and isinstance(runtime, str)
            and isinstance(version, str)
            and 0 < len(runtime) <= 8
            and 0 < len(version) <= 16
        ):
            return f"{runtime} {version}"
        if not isinstance(python, str) or len(python) > 8:
            raise ProtocolViolation("the bootstrap's first frame is not 'ready'")
        self.blob_cache, self._blobs_sent = frame.get("blob_cache") is True, OrderedDict()
        return python

    def load_package(
        self,
        function_id: str,
        header: dict[str, Any],
        package: bytes,
        env: dict[str, str] | None,
        timeout_s: float,
    ) -> None:
        """Send the ``load`` frame and bind this sandbox to the function once the bootstrap says it loaded."""
        self._send(header, package)
        try:
            reply, _ = self._receive(time.monotonic() + timeout_s, 0)
        except ChannelTimeout:
            self.close()
            raise SandboxError(
                "load", f"the function did not load within {timeout_s:g} s"
            ) from None
        self.check_loaded(reply)
        self.function_id = function_id
        self.ai_allowed = bool(env and env.get("AI_ENDPOINT"))

    def check_loaded(self, reply: dict[str, Any]) -> None:
        if reply.get("ok") is True:
            return
        error = reply.get("error")
        said = (error.get("traceback") or error.get("message")) if isinstance(error, dict) else None
        self.close()
        raise SandboxError(
            "load", f"the function could not be loaded: {str(said or 'no reason given')[:20000]}"
        )

    @abstractmethod
    def _send(self, header: dict[str, Any], body: bytes = b"") -> None:
        """Send one frame; SandboxError if the sandbox is gone."""

    @abstractmethod
    def _death(self) -> SandboxError:
        """Why the bootstrap went away mid-call (the sandbox is closed): a kill, the OOM killer, or the function."""

    @abstractmethod
    def _stop(self, graceful: bool) -> None:
        """Stop the bootstrap (SIGTERM, a grace period, then SIGKILL when ``graceful``)."""

    @abstractmethod
    def kill(self, reason: str) -> None:
        """Stop the sandbox now (from any thread); a call in progress fails with ``reason``."""

    @abstractmethod
    def close(self) -> None:
        """Stop and clean up; safe to call twice."""

    @property
    @abstractmethod
    def alive(self) -> bool: ...
