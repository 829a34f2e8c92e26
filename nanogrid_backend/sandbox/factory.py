"""What the warm pool and the grid ask of a sandbox factory, whichever kind of sandbox it starts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from nanogrid_backend.builds.builder import BuiltEnvironment
    from nanogrid_backend.sandbox.base import Sandbox
    from nanogrid_backend.sandbox.scratch import DiskRoom
    from nanogrid_backend.volumes import VolumeSet


class SandboxFactory(Protocol):
    """Starts one kind of sandbox with one grid's settings (sandbox/process.py, sandbox/docker.py)."""

    kind: str  # "process" or "docker": what /health and the status page name
    python: str  # the Python minor its runtime runs ("": the grid's own interpreter's)
    sandbox_uid: int  # whom its sandboxes run as, so who owns what they write on volumes

    @property
    def disk_mib(self) -> int | None:
        """The scratch disk of its stem cells, in MiB (a function asking for another size starts its own sandbox);
        None: sandboxes have no disk of their own and write to the host's."""
        ...

    @property
    def disk_room(self) -> DiskRoom | None:
        """The host's room that sandboxes' own disks share (idle ones give theirs up for a call);
        None: no such disks."""
        ...

    def start(
        self,
        ai: bool = False,
        environment: BuiltEnvironment | None = None,
        disk_mib: int | None = None,
        evict_idle: bool = False,
        volumes: VolumeSet | None = None,
    ) -> Sandbox:
        """A stem cell: with ``environment``, its packages; ``volumes``: bound for the sandbox's life."""
        ...

    def takes_volumes(self, volumes: VolumeSet) -> bool:
        """Whether a started stem cell can be given these volumes as it is specialised (else one starts with them)."""
        ...

    def disk_shortfall(self) -> str | None:
        """Why a stem cell's disk does not fit on the host now, even once idle sandboxes gave theirs up ('' when it
        does); None: sandboxes have no disks of their own to run short of (what /health asks)."""
        ...

    def runtime_images(self) -> dict[str, str] | None:
        """Python minor -> the runtime image its sandboxes start from, for each Python it can serve; None: it serves
        only its own Python, with no image."""
        ...

    def language_runtimes(self) -> dict[str, BuiltEnvironment]:
        """The other languages it can run: runtime name (nodejs, go, cpp) -> what their sandboxes start with."""
        ...

    def describe(self) -> str:
        """One line for /health and the logs: the kind of sandbox and its isolation."""
        ...

    def sweep(self, wait_s: float = 0.0) -> int:
        """Remove what sandboxes of an earlier run left behind; how many there were. ``wait_s`` (at shutdown): how
        long removals already under way may take before it looks."""
        ...
