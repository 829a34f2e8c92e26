"""One ``%%nanogrid`` cell: what it sends, the job that runs it, and putting its outcome into the notebook."""

from __future__ import annotations

import argparse
import re
import sys
import threading
import types
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from IPython.core.error import UsageError

from nanogrid.cell_state import (
    CellFailed,
    CellRefused,
    Packed,
    ShellOutput,
    load_state,
    pack_state,
    plan_cell,
    run_cell,
)
from nanogrid.client import Client, get_client
from nanogrid.environment import (
    Environment,
    PackageSyncError,
    for_cell,
    modules_in_pickle,
    requirements_of_modules,
)
from nanogrid.function import RemoteFunction
from nanogrid.job import Job
from nanogrid.volume import Volume
from nanogrid.widgets import size_text
from nanogrid_contract.errors import InvalidArgument, RemoteError
from nanogrid_contract.views import JobView

NOT_SENT = {
    "__builtins__",
    "__builtin__",
    "__name__",
    "__doc__",
    "__loader__",
    "__package__",
    "__spec__",
}
NOTEBOOK_ONLY = {"In", "Out", "_ih", "_oh", "_dh"}  # the notebook's own history: it stays here


@dataclass
class CellOutcome:
    """What a finished cell left: its value or exception, and what changed in the notebook."""

    value: Any = None
    error: BaseException | None = None
    names_out: dict[str, int] = field(default_factory=dict)  # name -> pickled size
    deleted: list[str] = field(default_factory=list)
    unpicklable: dict[str, str] = field(default_factory=dict)
    # ("stdout" | "stderr", text), in order
    streams: list[tuple[str, str]] = field(default_factory=list)
    figures: list[tuple[bytes, str]] = field(default_factory=list)  # PNG, the figure's repr
    diff_ms: float = 0.0  # time the sandbox spent finding what changed


class CellJob(Job):
    """The job of a ``%%nanogrid`` cell: ``result()`` is the cell's value (or raises its exception).

    The first to ask for the outcome (``result()``, the widget, or the ``--async`` delivery thread)
    puts the cell's names into the notebook, once. A cell that raised is a failed job on the grid;
    its names bound before the error come back all the same (inside `CellFailed`).
    """

    def __init__(
        self,
        client: Client,
        view: JobView,
        name: str,
        shell: Any,
        sent: dict[str, Any],
        sizes_in: dict[str, int],
        has_value: bool,
    ) -> None:
        super().__init__(client, view, name)
        self.shell = shell
        self.sent = sent
        self.sizes_in = sizes_in
        self.has_value = has_value
        self._outcome: CellOutcome | None = None
        self._lock = threading.Lock()

    def result(self, timeout: float | None = None) -> Any:
        outcome = self.outcome(timeout)
        if outcome.error is not None:
            raise outcome.error
        return outcome.value

    def outcome(self, timeout: float | None = None) -> CellOutcome:
        """Wait for the cell, bring its names into the notebook (once), and return what it left."""
        with self._lock:
            if self._outcome is None:
                try:
                    # raises JobFailed on a timeout, out-of-memory or crash
                    reply = super().result(timeout)
                # the cell raised: what it left comes with its exception
                except CellFailed as failed:
                    reply = failed.outcome
                self._outcome = self._deliver(reply)
            return self._outcome

    def _deliver(self, reply: dict[str, Any]) -> CellOutcome:
        user_ns = self.shell.user_ns
        outcome = CellOutcome(
            names_out=reply["sizes"],
            deleted=reply["deleted"],
            unpicklable=reply["unpicklable"],
            figures=reply["figures"],
            streams=_streams(self._view, reply["streams"]),
            diff_ms=reply.get("diff_ms", 0.0),
        )
        try:
            records = load_state(reply["state"], user_ns, self.sent)
        except Exception as exc:
            raise RemoteError(
                type(exc).__name__,
                f"the names {', '.join(reply['sizes'])} came back but cannot be "
                f"loaded in this notebook: {exc}",
                "",
            ) from None
        returned = {
            key[5:]: _local_shell_output(value)
            for key, value in records.items()
            if key.startswith("name:")
        }
        # Other notebook names for an object the cell changed follow it, as they would locally (the sent
        # objects are alive in self.sent, so their ids are theirs alone).
        replaced = {
            id(self.sent[name]): returned[name] for name in reply["mutated"] if name in self.sent
        }
        for name, value in list(user_ns.items()):
            if id(value) in replaced:
                user_ns[name] = replaced[id(value)]
        user_ns.update(returned)
        for name in reply["deleted"]:
            user_ns.pop(name, None)
        if reply["unpicklable"]:
            outcome.streams.append(
                (
                    "stderr",
                    "".join(
                        f"%%nanogrid: {name} was not brought back into the notebook: {why}\n"
                        for name, why in reply["unpicklable"].items()
                    ),
                )
            )
        outcome.value = _local_shell_output(records.get("value")) if self.has_value else None
        if reply["error"] is not None:
            outcome.error = _remote_exception(records.get("error"), reply["error"], self.shell)
        return outcome

    def _ipython_display_(self) -> None:
        from nanogrid.widgets import CellWidget, in_kernel

        if in_kernel():
            CellWidget(self, echo=True).show()
        else:
            print(self.summary())


def prepare(
    shell: Any, body: str, args: argparse.Namespace
) -> tuple[RemoteFunction, tuple[Any, ...], dict[str, Any], dict[str, int], bool]:
    """Transform and check the cell, and pickle the notebook names it uses; nothing is sent yet."""
    source = shell.transform_cell(body)
    # tracebacks and inspect show the cell's own lines
    filename = shell.compile.cache(body, _cell_number(shell))
    try:
        plan = plan_cell(source, filename)
    except CellRefused as exc:
        raise UsageError(f"%%nanogrid: {exc}; nothing was sent") from None
    sent = _inputs(shell, plan.reads)
    packed = pack_state(list(sent.items()), shell.user_ns)
    if packed.failed:
        name, why = next(iter(packed.failed.items()))
        raise UsageError(
            f"%%nanogrid: the cell uses {name!r}, which cannot be sent to the grid ({why}). "
            "Create it inside the cell instead, or run this cell locally."
        )
    limit = get_client().limits()["max_payload_bytes"]
    if len(packed.data) > limit:
        largest = ", ".join(
            f"{n} {size_text(s)}" for n, s in sorted(packed.sizes.items(), key=lambda i: -i[1])[:3]
        )
        raise UsageError(
            f"%%nanogrid: the cell's names pickle to {size_text(len(packed.data))}, over the grid's "
            f"{size_text(limit)} limit (largest: {largest}); load large data inside the cell "
            "from a path or URL instead."
        )
    function = function_for(args, *environment_for(shell, source, sent, packed, args))
    call = (source, filename, body, packed.data, list(sent), plan.has_value)
    return function, call, sent, packed.sizes, plan.has_value


class CellFunction(RemoteFunction[..., dict[str, Any]]):
    """`run_cell` as a grid function, with the environment and the user's own module files the cell needs."""

    def __init__(
        self, environment: Environment, local_files: dict[str, bytes], **options: Any
    ) -> None:
        super().__init__(run_cell, environment=environment, **options)
        self.local_files = local_files

    def _environment(self, pickled: bytes) -> tuple[Environment, dict[str, bytes]]:
        return super()._environment(pickled)[0], self.local_files


def function_for(
    args: argparse.Namespace,
    environment: Environment | None = None,
    local_files: dict[str, bytes] | None = None,
) -> RemoteFunction:
    """The grid function that runs cells with these options, in ``environment`` with ``local_files`` beside it."""
    return CellFunction(
        environment or Environment(),
        local_files or {},
        memory=args.memory,
        timeout=args.timeout,
        runtime=args.runtime,
        name=args.name,
        model=args.model,
        ai=args.ai,
        disk=getattr(args, "disk", None),
        volumes=volumes_for(getattr(args, "volume", None)),
    )


def volumes_for(specs: list[str] | None) -> dict[str, Volume]:
    """``--volume NAME:/PATH[:ro]`` options as ``@remote(volumes=...)`` takes them."""
    volumes = {}
    for spec in specs or []:
        name, _, rest = spec.partition(":")
        path, _, mode = rest.partition(":")
        if not path or mode not in ("", "ro", "rw"):
            raise InvalidArgument(
                f"--volume is NAME:/PATH or NAME:/PATH:ro, e.g. --volume datasets:/data, not {spec!r}"
            )
        volumes[path] = Volume(name, read_only=mode == "ro")
    return volumes


def environment_for(
    shell: Any, source: str, inputs: dict[str, Any], packed: Packed, args: argparse.Namespace
) -> tuple[Environment, dict[str, bytes]]:
    """Package sync for a cell, as for a function: the packages (pinned at this kernel's versions) and the user's own
    modules that the cell imports, the names it reads and their pickles refer to; ``--packages`` on top, and
    ``--env NAME`` instead of the synced packages."""
    packages = [p for p in re.split(r"[\s,]+", args.packages or "") if p]
    try:
        synced, local_files = for_cell(source, inputs, packages)
        # What the inputs' pickle as sent refers to: a DataFrame's string columns need pyarrow, never named in the cell.
        sent = requirements_of_modules(modules_in_pickle(packed.data))
        local_files = {**sent.local_files, **local_files}
        if args.env is not None:
            return _named_environment(shell, args.env).with_packages(packages), local_files
        return synced.with_packages(sent.packages), local_files
    except (PackageSyncError, ValueError) as exc:
        raise UsageError(f"%%nanogrid: {exc}; nothing was sent") from None


def _named_environment(shell: Any, name: str) -> Environment:
    value = shell.user_ns.get(name)
    if not isinstance(value, Environment):
        found = "there is no such name" if value is None else f"it is a {type(value).__name__}"
        raise UsageError(
            f"%%nanogrid: --env {name} needs a nanogrid.Environment of that name in the notebook "
            f"({found}), e.g. {name} = nanogrid.Environment(packages=['pandas==2.2.3'])"
        )
    return value


def _cell_number(shell: Any) -> int:
    """The number the notebook shows for the running cell (``In [N]``): the one IPython gave the code that runs this
    magic (IPython 9 counts on to the next cell before running one); outside a cell, the shell's count."""
    numbers = getattr(shell.compile, "_filename_map", {})
    frame: types.FrameType | None = sys._getframe()
    while frame is not None:
        if frame.f_code.co_filename in numbers:
            return int(numbers[frame.f_code.co_filename])
        frame = frame.f_back
    return int(shell.execution_count)


def start(shell: Any, body: str, args: argparse.Namespace) -> CellJob:
    function, call, sent, sizes_in, has_value = prepare(shell, body, args)
    job = function.spawn(*call)
    return CellJob(job.client, job._view, function.name, shell, sent, sizes_in, has_value)


def _inputs(shell: Any, names: list[str]) -> dict[str, Any]:
    user_ns, hidden = shell.user_ns, shell.user_ns_hidden
    inputs = {}
    for name in names:
        if name not in user_ns or name in NOT_SENT:
            continue
        value = user_ns[name]
        if name in hidden and hidden[name] is value:
            if name in NOTEBOOK_ONLY:
                raise UsageError(
                    f"%%nanogrid: the cell uses {name}, the notebook's own history, which stays in "
                    "the notebook; copy what the cell needs into a name of its own first."
                )
            continue  # get_ipython, open, exit: the sandbox has its own
        inputs[name] = value
    return inputs


def _streams(view: JobView, segments: list[list[int]]) -> list[tuple[str, str]]:
    """The cell's stdout and stderr, interleaved as it wrote them where the lengths match what was captured."""
    stdout, stderr = view.get("stdout", ""), view.get("stderr", "")
    if sum(n for fd, n in segments if fd == 1) != len(stdout) or sum(
        n for fd, n in segments if fd == 2
    ) != len(stderr):
        # written at fd level
        return [(name, text) for name, text in (("stdout", stdout), ("stderr", stderr)) if text]
    streams, positions = [], {1: 0, 2: 0}
    for fd, length in segments:
        text = (stdout, stderr)[fd - 1]
        streams.append(
            ("stdout" if fd == 1 else "stderr", text[positions[fd] : positions[fd] + length])
        )
        positions[fd] += length
    return streams


def _local_shell_output(value: Any) -> Any:
    """``x = !cmd`` gives IPython's SList here, as it would have locally."""
    if type(value) is ShellOutput:
        from IPython.utils.text import SList

        return SList(value)
    return value


def _remote_exception(exc: Any, described: dict[str, Any], shell: Any) -> BaseException:
    """The cell's exception as itself, shown as IPython shows a local one, with the cell's own frames only."""
    if not isinstance(exc, BaseException):
        exc = RemoteError(described["type"], described["message"], described["traceback"])
    remote_frames = _traceback_of(described.get("frames", []))

    def render() -> list[str]:
        return shell.InteractiveTB.structured_traceback(type(exc), exc, remote_frames)

    try:
        exc._render_traceback_ = render  # IPython's hook for remote tracebacks
    # an exception type with __slots__: IPython shows it with its local frames
    except AttributeError:
        pass
    return exc


def _traceback_of(frames: list[dict[str, Any]]) -> TracebackType | None:
    """A real traceback whose frames stand at the remote frames' files and lines, so IPython can format it."""
    chain = None
    for frame in reversed(frames):
        entry = _stand_in(frame)
        if entry is not None:
            entry.tb_next = chain
            chain = entry
    return chain


def _stand_in(frame: dict[str, Any]) -> TracebackType | None:
    """A traceback entry at the remote frame's line, in code of its name and parameters (IPython shows
    ``in normalise(values)`` from the frame's code): ``raise`` compiled at that line under that file name."""
    line = max(int(frame["line"]), 1)
    scope: dict[str, Any] = {"__remote_frame__": _RemoteFrame()}
    if frame["name"] == "<module>":
        code = compile("\n" * (line - 1) + "raise __remote_frame__", frame["file"], "exec")
        run: Any = lambda: exec(code, scope)  # noqa: E731
    else:
        names = [*frame["args"], *filter(None, (frame["varargs"], frame["varkw"]))]
        params = (
            [f"a{n}" for n in range(len(frame["args"]))]
            + ["*v"] * bool(frame["varargs"])
            + ["**k"] * bool(frame["varkw"])
        )
        # where the function starts: IPython shows from there
        first = min(max(int(frame.get("first", line)), 1), line)
        body = (
            " raise __remote_frame__"
            if first == line
            else "\n" * (line - first) + "    raise __remote_frame__"
        )
        exec(
            compile(
                "\n" * (first - 1) + f"def f({', '.join(params)}):{body}", frame["file"], "exec"
            ),
            scope,
        )
        function = scope["f"]
        function.__code__ = function.__code__.replace(
            co_name=frame["name"], co_qualname=frame["qualname"], co_varnames=tuple(names)
        )
        run = lambda: function(*[None] * len(frame["args"]))  # noqa: E731
    try:
        run()
    except _RemoteFrame as marker:
        entry = marker.__traceback__
        # the innermost: the one at the remote line
        while entry is not None and entry.tb_next is not None:
            entry = entry.tb_next
        return entry
    return None


class _RemoteFrame(Exception):
    pass


def write_streams(streams: list[tuple[str, str]]) -> None:
    for name, text in streams:
        target = sys.stdout if name == "stdout" else sys.stderr
        target.write(text)
        target.flush()
