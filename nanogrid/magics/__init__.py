"""``%%nanogrid`` (run a cell on the grid) and ``%nanogrid`` (connect, status, jobs, config)."""

from __future__ import annotations

import argparse
import html
import shlex
import sys
import threading
from typing import Any

import cloudpickle
from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.display import HTML, display

import nanogrid
from nanogrid.cells import plan_cell, run_cell
from nanogrid.client import get_client
from nanogrid.function import MAX_ARGS_BYTES, RemoteFunction
from nanogrid.widgets import JobWidget, in_kernel

HIDDEN_NAMES = {"In", "Out", "exit", "quit", "get_ipython"}


def _cell_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="%%nanogrid", add_help=False, exit_on_error=False)
    parser.add_argument("--memory", type=int, default=None, help="MiB")
    parser.add_argument("--timeout", type=float, default=None, help="seconds")
    parser.add_argument("--runtime", default=None)
    parser.add_argument("--name", default="cell")
    parser.add_argument("--model", default=None, help="the AI node's model for this cell")
    parser.add_argument("--ai", action="store_true", help="let the cell reach the AI node")
    parser.add_argument("--async", dest="asynchronous", action="store_true")
    return parser


@magics_class
class NanoGridMagics(Magics):
    @line_cell_magic
    def nanogrid(self, line: str, cell: str | None = None) -> Any:
        """%%nanogrid [--memory MiB] [--timeout s] [--runtime R] [--name N] [--async]: run this cell on the grid.

        %nanogrid connect URL | status | jobs | config
        """
        if cell is None:
            return self._line(line)
        try:
            args = _cell_parser().parse_args(shlex.split(line))
        except (argparse.ArgumentError, SystemExit) as exc:
            raise UsageError(f"%%nanogrid: {exc}. Options: --memory MiB --timeout s --runtime R --name N --async") from None
        return self._run_cell(cell, args)

    def _run_cell(self, source: str, args: argparse.Namespace) -> Any:
        plan = plan_cell(source)
        inputs = self._inputs(plan.reads)
        function = RemoteFunction(run_cell, memory=args.memory, timeout=args.timeout, runtime=args.runtime,
                                  name=args.name, model=args.model, ai=args.ai)
        job = function.spawn(source, inputs, plan.assigns, plan.has_value)
        widget = None
        if in_kernel():
            widget = JobWidget(job, args.memory, title=f"%%nanogrid {args.name}")
            display(widget.view)
            widget.follow()
        if args.asynchronous:
            threading.Thread(target=self._deliver_later, args=(job,), daemon=True).start()
            return job
        try:
            outcome = job.result()
        except KeyboardInterrupt:
            job.cancel()
            raise
        finally:
            self._echo(job)
        if widget is not None:
            widget.update()
        value = self._deliver(outcome)
        return value if plan.has_value else None

    def _inputs(self, names: list[str]) -> dict[str, Any]:
        namespace = self.shell.user_ns
        inputs = {}
        for name in names:
            if name not in namespace or name in HIDDEN_NAMES or name.startswith("_"):
                continue
            value = namespace[name]
            try:
                size = len(cloudpickle.dumps(value))
            except Exception as exc:
                raise UsageError(
                    f"%%nanogrid: the cell uses {name!r} ({type(value).__name__}), which cannot be sent to the grid "
                    f"({exc}). Create it inside the cell instead, or run this cell locally."
                ) from None
            if size > MAX_ARGS_BYTES:
                raise UsageError(
                    f"%%nanogrid: the cell uses {name!r}, {size >> 20} MiB pickled, over the {MAX_ARGS_BYTES >> 20} MiB "
                    "limit; load it inside the cell from a path or URL instead."
                )
            inputs[name] = value
        return inputs

    def _deliver(self, outcome: dict[str, Any]) -> Any:
        """Put the names the cell assigned into the notebook; returns the cell's value."""
        self.shell.user_ns.update(outcome["names"])
        for name, why in outcome["unpicklable"].items():
            print(f"%%nanogrid: {name} was not brought back ({why})", file=sys.stderr)
        return outcome["value"]

    def _deliver_later(self, job: nanogrid.Job) -> None:
        try:
            self._deliver(job.result())
        except Exception:
            pass  # the job's widget and job.result() show the failure

    @staticmethod
    def _echo(job: nanogrid.Job) -> None:
        if job.stdout:
            sys.stdout.write(job.stdout)
        if job.stderr:
            sys.stderr.write(job.stderr)

    def _line(self, line: str) -> Any:
        words = shlex.split(line)
        command, rest = (words[0], words[1:]) if words else ("status", [])
        if command == "connect":  # %nanogrid connect [URL [API_KEY]]
            client = nanogrid.connect(rest[0] if rest else None, rest[1] if len(rest) > 1 else None)
            print(f"connected to {client.url} ({client.health()['sandbox']})")
            return None
        if command == "status":
            return _show_status()
        if command == "jobs":
            return _show_jobs(int(rest[0]) if rest else 20)
        if command == "config":
            client = get_client()
            print(f"url      {client.url}\nruntimes {', '.join(client.runtimes())}\npython   "
                  f"{sys.version_info.major}.{sys.version_info.minor}")
            return None
        raise UsageError(f"%nanogrid: unknown command {command!r}; use connect URL, status, jobs or config")


def _show_status() -> None:
    client = get_client()
    status = client.system_status()
    lines = [f"grid {client.url}: {status['queue_depth']} queued"]
    for worker in status["workers"]:
        pool = worker["pool"]
        lines.append(f"worker {worker['worker_id']}: {worker['slots']} slots, {pool['busy']} busy, {pool['idle']} warm, "
                     f"{pool['stem_cells']} stem cells ({pool['sandbox']})")
    lines.append("jobs: " + (", ".join(f"{n} {s}" for s, n in sorted(status["jobs"].items())) or "none yet"))
    print("\n".join(lines))


def _show_jobs(limit: int) -> None:
    rows = get_client().jobs(limit)
    cells = "".join(
        f"<tr><td>{html.escape(j['job_id'])}</td><td>{j['status']}</td>"
        f"<td>{'' if j['execution_time_ms'] is None else round(j['execution_time_ms'], 1)}</td>"
        f"<td>{'' if j['peak_memory_bytes'] is None else round(j['peak_memory_bytes'] / (1 << 20), 1)}</td></tr>"
        for j in rows
    )
    display(HTML(f"<table><tr><th>job</th><th>status</th><th>ms</th><th>peak MiB</th></tr>{cells}</table>"))


def load_ipython_extension(ipython: Any) -> None:
    ipython.register_magics(NanoGridMagics)
