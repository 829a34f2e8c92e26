"""Every error NanoGrid raises on purpose is a ``NanoGridError``; remote exceptions keep their own type.

Where Python has a built-in exception for the same mistake, the class derives from it too
(``InvalidArguments`` is a ``TypeError``), so ``except TypeError`` keeps working.
"""

from __future__ import annotations

import errno


class NanoGridError(Exception):
    """Base class of NanoGrid's own errors: ``except nanogrid.NanoGridError`` catches all of them."""


class ConfigError(NanoGridError, ValueError):
    """A setting (file, ``NANOGRID_*`` variable or flag) has a value NanoGrid cannot use; the message names it."""


class NotConnected(NanoGridError):
    """No grid to talk to."""


class GridUnresponsive(NotConnected, TimeoutError):
    """The grid took the request but said nothing for longer than the client's ``timeout`` (stopped, hung or
    overloaded); the client gave up, and cancelled what it had started where it knew the job ids."""


class APIError(NanoGridError):
    """The controller refused a request: ``status`` is the HTTP status, ``code`` its stable error code
    (``not_found``, ``rate_limited``, ...; see docs/http/index.md#errors) and ``detail`` says why."""

    def __init__(self, status: int, detail: str, code: str = "") -> None:
        super().__init__(f"{detail} (HTTP {status})")
        self.status = status
        self.detail = detail
        self.code = code


class VersionMismatch(NanoGridError):
    """The client's Python cannot send functions to the grid's runtime."""


class UnsupportedFunction(NanoGridError, TypeError):
    """``@remote`` was given something it cannot run on the grid (an ``async def``, a generator, ...)."""


class InvalidArguments(NanoGridError, TypeError):
    """A call's arguments do not fit the function's signature or cannot be pickled; nothing was sent."""


class InvalidArgument(NanoGridError, ValueError):
    """A value NanoGrid refuses before sending anything (an option out of range, arguments too large)."""


class InvalidEnvironment(InvalidArguments, ValueError):
    """An environment that could never be built (a package that is not a requirement, a Python no runtime has, a
    system package name apt would read as a pattern), refused where it is written; also a ``ValueError``."""


class MissingModule(NanoGridError, ModuleNotFoundError):
    """The grid's sandbox could not import a module this client has; the message names the package and version to
    add (``requirement``, e.g. ``pyarrow==26.0.1``), and ``name`` is the module."""

    def __init__(self, message: str, *, name: str, requirement: str) -> None:
        super().__init__(message, name=name)
        self.requirement = requirement


class WaitTimeout(NanoGridError, TimeoutError):
    """``Job.result(timeout=...)`` ran out of time; the job itself is still running on the grid."""


class AIUnavailable(NanoGridError, RuntimeError):
    """``nanogrid.ai`` cannot call the AI node: not declared with ``ai=True``, none configured, unreachable,
    or no model chosen."""


class RemoteTraceback(Exception):
    """Carries the remote traceback text; set as ``__cause__`` of a re-raised remote exception."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text}"""'


class RemoteError(NanoGridError):
    """A remote exception whose type could not be rebuilt here (``type_name`` says what it was)."""

    def __init__(self, type_name: str, message: str, traceback: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.traceback = traceback


class UntrustedResult(NanoGridError):
    """A data-only function's job came back in a form that would need unpickling; it was refused."""


class JobFailed(NanoGridError):
    """The call did not finish in its sandbox (see the subclasses); ``job_id`` and ``kind`` say which."""

    def __init__(self, message: str, *, job_id: str = "", kind: str = "") -> None:
        super().__init__(message)
        self.job_id = job_id
        self.kind = kind


class FunctionTimeout(JobFailed, TimeoutError):
    """The call ran past its timeout; the sandbox was stopped and replaced."""


class OutOfMemory(JobFailed, MemoryError):
    """The call went over its memory limit."""


class OutOfDisk(JobFailed, OSError):
    """The call filled its sandbox's scratch disk (/tmp, working and output files: ``@remote(disk=MiB)``)."""

    def __init__(self, message: str, *, job_id: str = "", kind: str = "") -> None:
        super().__init__(message, job_id=job_id, kind=kind)
        self.errno, self.strerror = errno.ENOSPC, message


class SandboxCrashed(JobFailed):
    """The sandbox died during the call (the function exited the interpreter, or killed it)."""


class JobCancelled(JobFailed):
    """The job was cancelled."""


class EnvironmentBuildFailed(JobFailed):
    """The grid could not build the function's environment; the message carries the installer's and
    names the package."""


_BY_KIND: dict[str, type[JobFailed]] = {
    "timeout": FunctionTimeout,
    "memory": OutOfMemory,
    "disk": OutOfDisk,
    "crash": SandboxCrashed,
    "frozen": SandboxCrashed,  # its processes were stopped or frozen on the worker: not the function's doing
    "cancelled": JobCancelled,
    "environment": EnvironmentBuildFailed,
}


def failure_for(kind: str, message: str, job_id: str) -> JobFailed:
    return _BY_KIND.get(kind, JobFailed)(message, job_id=job_id, kind=kind)
