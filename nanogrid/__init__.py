"""NanoGrid: run notebook code and Python functions on a self-hosted serverless grid.

import nanogrid
nanogrid.connect()                    # NANOGRID_URL, else the grid started by `nanogrid up`

@nanogrid.remote(memory=256, timeout=30)
def square(x):
    return x * x

square.remote(7)                      # 49
job = square.spawn(8); job.result()   # 64
list(square.map(range(100)))          # ordered results
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from nanogrid.errors import (  # noqa: E402  (nanogrid.errors stays an attribute: nanogrid.errors.JobFailed)
    AIUnavailable,
    APIError,
    ConfigError,
    EnvironmentBuildFailed,
    FunctionTimeout,
    GridUnresponsive,
    InvalidArgument,
    InvalidArguments,
    InvalidEnvironment,
    JobCancelled,
    JobFailed,
    MissingModule,
    NanoGridError,
    NotConnected,
    OutOfDisk,
    OutOfMemory,
    RemoteError,
    SandboxCrashed,
    UnsupportedFunction,
    UntrustedResult,
    VersionMismatch,
    WaitTimeout,
)
from nanogrid_contract import __version__

# what the lazy attributes below are, for type checkers (nothing is imported at run time)
if TYPE_CHECKING:
    from nanogrid.client import Client, connect, get_client
    from nanogrid.environment import Environment
    from nanogrid.function import RemoteFunction, remote
    from nanogrid.job import Job, OutputFile
    from nanogrid.schedule import Cron, Period, Schedule, schedules
    from nanogrid.transfer import Ref, put
    from nanogrid.volume import Volume, volumes

# The client side (httpx, tqdm, ...) loads on first use, so that `import nanogrid` stays cheap and
# works inside a sandbox image that carries only the standard library and cloudpickle.
_LAZY = {
    "Client": "nanogrid.client",
    "connect": "nanogrid.client",
    "get_client": "nanogrid.client",
    "RemoteFunction": "nanogrid.function",
    "remote": "nanogrid.function",
    "Job": "nanogrid.job",
    "OutputFile": "nanogrid.job",
    "Environment": "nanogrid.environment",
    "put": "nanogrid.transfer",
    "Ref": "nanogrid.transfer",
    "Cron": "nanogrid.schedule",
    "Period": "nanogrid.schedule",
    "Schedule": "nanogrid.schedule",
    "schedules": "nanogrid.schedule",
    "Volume": "nanogrid.volume",
    "volumes": "nanogrid.volume",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nanogrid' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def output_dir() -> Path:
    """Where a function writes files to return them: collected after the call and listed on its job.

    On the grid this is the sandbox's output directory (``NANOGRID_OUTPUT_DIR``); run locally it is
    ``./nanogrid-output``.
    """
    path = Path(os.environ.get("NANOGRID_OUTPUT_DIR") or "nanogrid-output")
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_ipython_extension(ipython: object) -> None:
    """``%load_ext nanogrid``: registers ``%%nanogrid`` and ``%nanogrid``."""
    from nanogrid.magics import load_ipython_extension as load

    load(ipython)


def _register_in_running_ipython() -> None:
    """``import nanogrid`` inside IPython offers the magics too, without ``%load_ext``."""
    ipython_module = sys.modules.get("IPython")
    shell = ipython_module.get_ipython() if ipython_module is not None else None
    if shell is not None:
        load_ipython_extension(shell)


_register_in_running_ipython()

__all__ = [
    "Environment",
    "EnvironmentBuildFailed",
    "AIUnavailable",
    "APIError",
    "Client",
    "ConfigError",
    "FunctionTimeout",
    "GridUnresponsive",
    "InvalidArgument",
    "InvalidArguments",
    "InvalidEnvironment",
    "Job",
    "JobCancelled",
    "JobFailed",
    "MissingModule",
    "NanoGridError",
    "NotConnected",
    "OutOfDisk",
    "OutOfMemory",
    "OutputFile",
    "RemoteError",
    "RemoteFunction",
    "SandboxCrashed",
    "UnsupportedFunction",
    "UntrustedResult",
    "VersionMismatch",
    "WaitTimeout",
    "__version__",
    "connect",
    "get_client",
    "load_ipython_extension",
    "output_dir",
    "remote",
    "put",
    "Ref",
    "Cron",
    "Period",
    "Schedule",
    "schedules",
    "Volume",
    "volumes",
]
