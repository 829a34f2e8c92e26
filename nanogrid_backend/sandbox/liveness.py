"""Seeing a frozen sandbox: one whose processes are stopped (SIGSTOP) or frozen (``docker pause``).

A frozen bootstrap keeps its channel open, so it looks alive; without this check the next new function
would wait out the whole load timeout and fail, and a call would end as the user's timeout. The bootstrap
has no ping, so the host asks the kernel instead: the state of the sandbox's launcher and bootstrap
processes (``T`` in ``/proc/<pid>/stat``) and the container's freezer cgroup. Both are reads of a few small
files, cheap enough to make before every hand-out of a sandbox and twice a second while waiting on one.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from typing import Any

from nanogrid_backend.sandbox.base import Sandbox, SandboxError
from nanogrid_backend.sandbox.protocol import ChannelTimeout

CHECK_EVERY_S = 0.5  # while waiting for the bootstrap: how long a freeze goes unseen at most
FROZEN = (
    "the sandbox stopped answering: its processes were stopped or frozen on the worker (SIGSTOP, `docker "
    "pause`); it was discarded. Not the function's doing: run the call again"
)


class WatchedSandbox(Sandbox):
    """A sandbox that can tell it is frozen; a wait on its bootstrap ends as soon as it is (kind ``frozen``)."""

    @abstractmethod
    def frozen(self) -> bool:
        """True while the bootstrap cannot run: stopped or frozen by someone on the host."""

    def _receive(self, deadline: float, max_body: int) -> tuple[dict[str, Any], bytes]:
        """One frame by ``deadline``, waited for in short slices with a look at the sandbox's state between them
        (the frame reader keeps what arrived of a frame across slices)."""
        while True:
            until = min(deadline, time.monotonic() + CHECK_EVERY_S)
            try:
                return super()._receive(until, max_body)
            except ChannelTimeout:
                if until >= deadline:
                    raise
                if self.frozen():
                    self.close()
                    raise SandboxError("frozen", FROZEN) from None
