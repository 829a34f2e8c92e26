"""Job: a future for one call on the grid, with everything the call left behind."""

from __future__ import annotations

import base64
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import cloudpickle

from nanogrid.client import Client, get_client
from nanogrid.transfer import Ref
from nanogrid_contract.errors import (
    InvalidArgument,
    JobFailed,
    RemoteError,
    RemoteTraceback,
    UntrustedResult,
    WaitTimeout,
    failure_for,
)
from nanogrid_contract.views import FINAL_STATES, ErrorView, JobView

FINAL = FINAL_STATES
POLL_S = 25.0  # long-poll slice; the controller caps a wait at 60 s

R = TypeVar("R")


@dataclass(frozen=True)
class OutputFile:
    """A file the call wrote to its output directory, kept by the grid."""

    name: str
    size: int
    url: str
    client: Client

    def read(self) -> bytes:
        return self.client.download(self.url)

    def save(self, path: str | Path | None = None) -> Path:
        """Download to ``path`` (default: the file's own name in the current directory)."""
        target = Path(path or Path(self.name).name)
        target.write_bytes(self.read())
        return target


def outcome(view: JobView, unpickle: bool = True, client: Client | None = None) -> Any:
    """The call's value, or raise what it raised (remote exceptions as their own type where possible).

    ``unpickle=False`` (functions with ``result="json"``): nothing from the grid is ever unpickled;
    values come as JSON and exceptions as ``RemoteError``. A result stored as a blob (over the grid's
    threshold) is downloaded, streamed, from ``client``.
    """
    status = view["status"]
    blob = view.get("result_blob")
    if status == "completed" and blob:
        if blob.get("format") != "json" and not unpickle:
            raise UntrustedResult(
                f"job {view['job_id']} came back pickled, but its function asked for data-only "
                "results (result='json'); it was not unpickled"
            )
        data = (client or get_client()).download_blob(blob["sha256"], blob["size"])
        return json.loads(data) if blob.get("format") == "json" else cloudpickle.loads(data)
    pickled = view.get("result_pickle")
    if status == "completed":
        if pickled is not None:
            if not unpickle:
                raise UntrustedResult(
                    f"job {view['job_id']} came back pickled, but its function asked for data-only "
                    "results (result='json'); it was not unpickled"
                )
            return cloudpickle.loads(base64.b64decode(pickled))
        return view.get("result")
    error = view.get("error") or {}
    if error.get("kind") != "exception":
        failure = failure_for(
            error.get("kind", status), error.get("message", f"job {status}"), view["job_id"]
        )
        if error.get("traceback"):  # where the function was when it ran out (of memory, of disk)
            raise failure from RemoteTraceback(error["traceback"])
        raise failure
    text = error.get("traceback", "")
    exc: BaseException
    try:
        if not unpickle:
            raise TypeError
        if blob:  # a large exception (a failed cell's state travels in it): stored as a blob
            exc = cloudpickle.loads(
                (client or get_client()).download_blob(blob["sha256"], blob["size"])
            )
        elif pickled is not None:
            exc = cloudpickle.loads(base64.b64decode(pickled))
        else:
            raise TypeError
        if not isinstance(exc, BaseException):
            raise TypeError
    except Exception:
        exc = RemoteError(error.get("type", "Exception"), error.get("message", ""), text)
    exc.__cause__ = RemoteTraceback(text)
    raise exc


class Job(Generic[R]):
    """One call on the grid. ``result()`` waits for it; the other attributes describe what happened.

    ``Job[R]``: ``result()`` returns what the function returns (``R``), as ``spawn()`` types it.
    """

    @classmethod
    def from_id(cls, job_id: str, client: Client | None = None) -> Job[Any]:
        """The job with this id (from ``fn.history()``, a log, the dashboard), as the grid has it now."""
        client = client or get_client()
        return cls(client, client.status(job_id))

    def __init__(
        self, client: Client, view: JobView, function_name: str = "", unpickle: bool = True
    ) -> None:
        self.client = client
        self.function_name = function_name
        self.unpickle = (
            unpickle  # False: a data-only function (result="json"); nothing it sends is unpickled
        )
        self._view = view
        # the result, once read (a large one is downloaded and unpickled once)
        self._value: dict[str, Any] = {}
        self.watched = False  # a sync .remote() waits for it: if this client goes, the grid cancels it while queued

    @property
    def job_id(self) -> str:
        return self._view["job_id"]

    @property
    def done(self) -> bool:
        return self._view["status"] in FINAL

    def refresh(self, wait: float = 0) -> Job[R]:
        if not self.done:
            self._view = self.client.status(self.job_id, wait=wait)
        return self

    @property
    def status(self) -> str:
        """pending, running, completed, failed or cancelled (asks the grid unless already final)."""
        return self.refresh()._view["status"]

    def wait(self, timeout: float | None = None) -> Job[R]:
        """Block until the job finishes (or ``timeout`` seconds pass); returns the job."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            left = POLL_S if deadline is None else min(POLL_S, deadline - time.monotonic())
            if left <= 0:
                break
            self.refresh(wait=left)
        return self

    def result(self, timeout: float | None = None) -> R:
        """The call's return value; re-raises the remote exception. ``WaitTimeout`` (a ``TimeoutError``) if
        not done in time: the job goes on running, and ``result()`` may be asked again."""
        if not self.wait(timeout).done:
            raise WaitTimeout(
                f"job {self.job_id} still {self._view['status']} after {timeout:g} s; it goes on "
                "running: call .result() again to wait longer, or .cancel() to stop it"
            )
        # once: a widget and the caller asking both get the same object
        if "value" not in self._value:
            self._value["value"] = outcome(self._view, self.unpickle, self.client)
        return self._value["value"]

    def ref(self, timeout: float | None = None) -> Ref:
        """The result as a ``Ref`` that stays on the grid (waits for the job): pass it to other calls, alone or inside
        a list or dict (``g.remote(job.ref())``, ``g.remote([j.ref() for j in jobs])``), and the value goes from
        sandbox to sandbox without coming through this machine. A failed job raises ``JobFailed`` (its own error
        as the cause); a function with ``result="json"`` has no Python value to pass on (``InvalidArgument``)."""
        if "ref" in self._value:
            return self._value["ref"]
        if not self.wait(timeout).done:
            raise WaitTimeout(
                f"job {self.job_id} still {self._view['status']} after {timeout:g} s; it goes on "
                "running: call .ref() again to wait longer"
            )
        if not self.unpickle:
            raise InvalidArgument(
                f"job {self.job_id}'s function returns JSON data (result='json'), not a Python "
                "value to pass to another call; pass job.result() instead"
            )
        if self._view["status"] != "completed":
            try:
                self.result()
            except Exception as exc:
                raise JobFailed(
                    f"job {self.job_id} {self._view['status']}, so it has no result to pass on: {exc}",
                    job_id=self.job_id,
                    kind="failed",
                ) from exc
        self._value["ref"] = self.client.result_ref(self.job_id)
        return self._value["ref"]

    def __reduce__(self) -> Any:
        raise TypeError(
            f"a Job cannot be sent to the grid; pass job.ref() to hand its result to another call "
            f"(job {self.job_id})"
        )

    def cancel(self) -> Job[R]:
        """Cancel it: a queued job never starts, a running one has its sandbox stopped."""
        if not self.done:
            self._view = self.client.cancel(self.job_id)
        return self

    def stream(self, poll_s: float = 2.0) -> Iterator[tuple[str, str]]:
        """``(stream, text)`` as the job prints it ("stdout" or "stderr"), live, until it has finished.

        What live output did not carry (past the capture limit of the live log, or printed in the
        last instant) comes at the end from the job's record, so the texts add up to ``logs()``.
        """
        printed = {"stdout": 0, "stderr": 0}
        for name, text in self.live(poll_s):
            printed[name] += len(text)
            yield name, text
        self.wait()
        for name in ("stdout", "stderr"):
            text = str(self._view.get(name) or "")
            if len(text) > printed[name]:
                yield name, text[printed[name] :]

    def live(self, poll_s: float = 2.0) -> Iterator[tuple[str, str]]:
        """Only the live part of ``stream()``: what arrives while the job runs (the record may hold more)."""
        cursor = ""
        while not self.done:
            answer = self.client.logs(self.job_id, cursor, wait=poll_s, watched=self.watched)
            for chunk in answer["chunks"]:
                yield chunk["stream"], chunk["text"]
            cursor = answer["cursor"]
            if answer["ended"]:
                break

    def echo(self) -> Job[R]:
        """Print what the job prints, live, on this process's stdout and stderr; returns once it finished."""
        for name, text in self.stream():
            target = sys.stdout if name == "stdout" else sys.stderr
            target.write(text)
            target.flush()
        return self

    def logs(self) -> dict[str, str]:
        """Everything the job printed (waits for it to finish): ``{"stdout": ..., "stderr": ...}``."""
        self.wait()
        return {"stdout": self._view.get("stdout", ""), "stderr": self._view.get("stderr", "")}

    @property
    def stdout(self) -> str:
        return self.refresh()._view.get("stdout", "")

    @property
    def stderr(self) -> str:
        return self.refresh()._view.get("stderr", "")

    @property
    def outputs(self) -> list[OutputFile]:
        files = self.refresh()._view.get("output_files") or []
        return [OutputFile(f["name"], f["size"], f["url"], self.client) for f in files]

    @property
    def error(self) -> ErrorView | None:
        return self.refresh()._view.get("error")

    @property
    def peak_memory_bytes(self) -> int | None:
        return self.refresh()._view.get("peak_memory_bytes")

    @property
    def baseline_memory_bytes(self) -> int | None:
        """The sandbox's own usage (interpreter, page cache) as the call began; the peak includes it."""
        return self.refresh()._view.get("baseline_memory_bytes")

    @property
    def ai_usage(self) -> dict[str, int] | None:
        """Calls and tokens (prompt, completion) the function used on the AI node; None if it used none."""
        return self.refresh()._view.get("ai_usage")

    @property
    def duration(self) -> float | None:
        """Seconds the function ran (inside its sandbox)."""
        ms = self.refresh()._view.get("execution_time_ms")
        return None if ms is None else ms / 1000

    @property
    def cold(self) -> bool | None:
        return self.refresh()._view.get("cold")

    @property
    def worker_id(self) -> str | None:
        return self._view.get("worker_id")

    @property
    def sandbox_id(self) -> str | None:
        return self._view.get("sandbox_id")

    def summary(self) -> str:
        v = self._view
        parts = [f"Job {self.job_id} {self.function_name}".rstrip(), v["status"]]
        if v.get("execution_time_ms") is not None:
            parts.append(f"{v['execution_time_ms']:.1f} ms")
        if peak := v.get("peak_memory_bytes"):
            parts.append(f"peak {peak / (1 << 20):.1f} MiB")
        if v.get("cold") is not None:
            parts.append("cold" if v["cold"] else "warm")
        if error := v.get("error"):
            parts.append(f"error: {error.get('message', '')[:200]}")
        return " | ".join(parts)

    def __repr__(self) -> str:
        return f"<{self.summary()}>"

    def _ipython_display_(self) -> None:
        """In a notebook: a live job widget. In a terminal: the one-line summary."""
        from nanogrid.widgets import JobWidget, in_kernel

        if in_kernel():
            from IPython.display import display

            widget = JobWidget(self)
            display(widget.view)
            widget.follow()
        else:
            print(self.summary())
