"""``%%nanogrid`` (run a cell on the grid) and ``%nanogrid`` (connect, status, jobs, config)."""

from __future__ import annotations

import argparse
import threading
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import publish_display_data

from nanogrid.magics import commands
from nanogrid.magics.cell import CellJob, start, write_streams
from nanogrid.widgets import CellWidget, figure_data, in_kernel
from nanogrid_contract.errors import JobFailed

LINE_COMMANDS = "connect [URL [API_KEY]] | status | jobs [N] | config"


@magics_class
class NanoGridMagics(Magics):
    @magic_arguments()
    @argument("command", nargs="*", help=f"%%nanogrid only: {LINE_COMMANDS}")
    @argument("--memory", type=int, metavar="MiB", help="memory limit of the cell's sandbox")
    @argument(
        "--disk",
        type=int,
        metavar="MiB",
        help="scratch disk of the cell's sandbox (/tmp and output files)",
    )
    @argument(
        "--volume",
        action="append",
        metavar="NAME:/PATH[:ro]",
        help="mount your volume NAME at /PATH in the "
        "cell's sandbox (read-only with :ro); repeatable",
    )
    @argument("--timeout", type=float, metavar="SECONDS", help="stop the cell after this long")
    @argument(
        "--runtime",
        metavar="RUNTIME",
        help="the grid's runtime, e.g. python3.11 (default: this Python's)",
    )
    @argument("--name", default="cell", help="the name the grid's job lists show (default: cell)")
    @argument(
        "--ai", action="store_true", help="let the cell reach the grid's AI node (nanogrid.ai)"
    )
    @argument("--model", metavar="MODEL", help="the AI node's model for this cell (implies --ai)")
    @argument(
        "--async",
        dest="asynchronous",
        action="store_true",
        help="return the cell's Job at once; its names arrive when it finishes, job.result() is its value",
    )
    @argument(
        "--packages",
        metavar="A,B",
        help="packages the cell needs besides those it is found to use (names or "
        "pins, comma-separated), e.g. --packages scikit-learn==1.5.2,humanize",
    )
    @argument(
        "--env",
        metavar="NAME",
        help="run in the nanogrid.Environment named NAME in this notebook instead of "
        "mirroring this kernel's packages",
    )
    @line_cell_magic
    def nanogrid(self, line: str, cell: str | None = None) -> Any:
        """Run this cell on the grid, leaving the notebook as a local run would (``%%nanogrid [options]``).

        The cell's names come from the notebook and every name it binds, changes or deletes comes
        back; its last expression is the cell's value. ``%nanogrid connect | status | jobs | config``
        manages the connection.
        """
        try:
            args = parse_argstring(self.nanogrid, line)
        except UsageError as exc:
            usage = self.nanogrid.parser.format_usage().strip()
            raise UsageError(
                f"%%nanogrid: {exc}\n{usage}\n(%nanogrid? shows every option)"
            ) from None
        if cell is None:
            return self._line(args)
        if args.command:
            raise UsageError(
                f"%%nanogrid takes only options (--memory, --timeout, ...), not {' '.join(args.command)!r}"
            )
        return self._run_cell(cell, args)

    def _run_cell(self, body: str, args: argparse.Namespace) -> Any:
        job = start(self.shell, body, args)
        if args.asynchronous:
            threading.Thread(
                target=_deliver_when_done, args=(job,), name="nanogrid-cell", daemon=True
            ).start()
            return job  # displayed as its widget, which shows the outcome when it comes
        widget = CellWidget(job, echo=False).show() if in_kernel() else None
        printed = {
            "stdout": 0,
            "stderr": 0,
        }  # what the cell printed and the notebook showed as it ran
        try:
            for name, text in job.live(poll_s=1.0):
                write_streams([(name, text)])
                printed[name] += len(text)
            outcome = job.outcome()
        except KeyboardInterrupt:
            job.cancel()
            raise
        # timeout, out of memory, crash: the cell's output so far, then why
        except JobFailed as exc:
            write_streams(
                not_yet_shown(
                    [
                        ("stdout", job._view.get("stdout", "")),
                        ("stderr", job._view.get("stderr", "")),
                    ],
                    printed,
                )
            )
            line = f"{type(exc).__name__}: {exc}"
            exc._render_traceback_ = lambda: [line]  # type: ignore[attr-defined]
            raise exc from None
        finally:
            if widget is not None:
                widget.update()
        write_streams(not_yet_shown(outcome.streams, printed))
        self._show_figures(outcome.figures)
        if outcome.error is not None:
            raise outcome.error
        return outcome.value

    def _show_figures(self, figures: list[tuple[bytes, str]]) -> None:
        """Matplotlib figures appear after the cell's value, where the inline backend shows them."""
        shell = self.shell
        if not figures or shell is None:
            return

        def show(*_: Any) -> None:
            shell.events.unregister("post_execute", show)
            for png, text in figures:
                publish_display_data(figure_data(png, text))

        shell.events.register("post_execute", show)

    def _line(self, args: argparse.Namespace) -> None:
        command, rest = (args.command[0], args.command[1:]) if args.command else ("status", [])
        if command == "connect":
            return commands.connect(rest[0] if rest else None, rest[1] if len(rest) > 1 else None)
        if command == "status":
            return commands.show_status()
        if command == "jobs":
            return commands.show_jobs(int(rest[0]) if rest else 20)
        if command == "config":
            return commands.show_config()
        raise UsageError(f"%nanogrid: unknown command {command!r}; use {LINE_COMMANDS}")


def not_yet_shown(streams: list[tuple[str, str]], printed: dict[str, int]) -> list[tuple[str, str]]:
    """The cell's streams without the first ``printed[stream]`` characters of each, already shown live."""
    left = dict(printed)
    rest = []
    for name, text in streams:
        skip = min(left.get(name, 0), len(text))
        left[name] = left.get(name, 0) - skip
        if text[skip:]:
            rest.append((name, text[skip:]))
    return rest


def _deliver_when_done(job: CellJob) -> None:
    """``--async``: the names arrive when the cell ends (the widget, or job.result(), shows how it went)."""
    try:
        outcome = job.outcome()
    except Exception:
        return
    if not in_kernel():
        write_streams(outcome.streams)


def load_ipython_extension(ipython: Any) -> None:
    ipython.register_magics(NanoGridMagics)
