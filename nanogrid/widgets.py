"""ipywidgets views of jobs: live status, where and how it ran, its output, files and errors."""

from __future__ import annotations

import html
import threading
import time
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets

if TYPE_CHECKING:
    from nanogrid.job import Job
    from nanogrid.magics.cell import CellJob, CellOutcome

IMAGE_TYPES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".gif": "gif", ".webp": "webp"}
THUMBNAIL_MAX_BYTES = 5 << 20
STATUS_LABELS = {
    "pending": ("queued", "#888"),
    "running": ("running", "#1f6feb"),
    "completed": ("succeeded", "#1a7f37"),
    "failed": ("failed", "#cf222e"),
    "cancelled": ("cancelled", "#9a6700"),
}


def in_kernel() -> bool:
    """True inside a Jupyter kernel, where widgets can render."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def _mib(n: int | None) -> str:
    return "–" if n is None else f"{n / (1 << 20):.1f} MiB"


class JobWidget:
    """One job's card. ``follow()`` keeps it current from a background thread until the job ends."""

    def __init__(self, job: Job, memory_limit_mib: int | None = None, title: str = "") -> None:
        self.job = job
        self.memory_limit_mib = memory_limit_mib
        self.title = title or job.function_name or "job"
        self.header = widgets.HTML()
        self.memory = widgets.FloatProgress(
            min=0,
            max=float(memory_limit_mib or 1),
            description="memory",
            layout=widgets.Layout(width="320px"),
        )
        self.memory_label = widgets.HTML()
        self.value = widgets.HTML()
        self.stdout = widgets.HTML()
        self.stderr = widgets.HTML()
        self.files = widgets.HBox(layout=widgets.Layout(flex_flow="row wrap"))
        self.error = widgets.HTML()
        self.logs = widgets.Accordion(children=[self.stdout, self.stderr])
        self.logs.set_title(0, "stdout")
        self.logs.set_title(1, "stderr")
        self.view = widgets.VBox(
            [
                self.header,
                widgets.HBox([self.memory, self.memory_label]),
                self.value,
                self.error,
                self.logs,
                self.files,
            ],
            layout=widgets.Layout(border="1px solid #ddd", padding="6px"),
        )
        self._files_shown = False
        self.update()

    def _status(self) -> tuple[str, str]:
        status = self.job._view["status"]
        return STATUS_LABELS.get(status, (status, "#888"))

    def update(self) -> None:
        v = self.job._view
        label, color = self._status()
        if v.get("execution_time_ms") is not None:
            timing = f"duration {v['execution_time_ms']:.1f} ms"
        else:
            timing = f"elapsed {max(0.0, time.time() - v['created_at']):.1f} s"
        start = "" if v.get("cold") is None else ("cold start" if v["cold"] else "warm")
        where = " · ".join(x for x in (v.get("worker_id"), v.get("sandbox_id")) if x)
        ai = v.get("ai_usage")
        if ai:
            start += f" · AI {ai['calls']} calls, {ai['prompt_tokens']} + {ai['completion_tokens']} tokens"
        self.header.value = (
            f"<b>{html.escape(self.title)}</b> <span style='background:{color};color:white;padding:1px 6px;"
            f"border-radius:8px'>{label}</span> {timing} · peak memory {_mib(v.get('peak_memory_bytes'))} "
            f"{'· ' + start if start else ''}<br><small style='color:#666'>{html.escape(v['job_id'])}"
            f"{' · ' + html.escape(where) if where else ''}</small>"
        )
        peak = (v.get("peak_memory_bytes") or 0) / (1 << 20)
        if (given := v.get("memory_limit_mib")) and self.memory_limit_mib is None:
            self.memory_limit_mib = given
            self.memory.max = float(given)
        if self.memory_limit_mib is None:
            self.memory.max = max(self.memory.max, peak or 1)
        self.memory.value = min(peak, self.memory.max)
        limit = f" of {self.memory_limit_mib} MiB" if self.memory_limit_mib else ""
        idle = (
            f" (idle sandbox {_mib(v['baseline_memory_bytes'])})"
            if v.get("baseline_memory_bytes")
            else ""
        )
        self.memory_label.value = f"{_mib(v.get('peak_memory_bytes'))}{limit}{idle}"
        self.stdout.value = _pre(v.get("stdout", ""))
        self.stderr.value = _pre(v.get("stderr", ""))
        self.logs.selected_index = 0 if v.get("stdout") else None
        error = v.get("error")
        self.error.value = (
            ""
            if not error
            else (
                f"<div style='color:#cf222e'><b>{html.escape(error.get('type') or error.get('kind', 'error'))}</b>: "
                f"{html.escape(error.get('message', ''))}</div>{_pre(error.get('traceback', ''))}"
            )
        )
        if v["status"] == "completed":
            self.value.value = f"<b>value</b> {_pre(self._value_repr())}"
        if self.job.done and not self._files_shown:
            self._files_shown = True
            self.files.children = [self._file_view(f) for f in self.job.outputs]

    def _value_repr(self) -> str:
        try:
            return repr(self.job.result(timeout=0))[:2000]
        except Exception as exc:  # the value may not unpickle here
            return f"<value not shown: {exc}>"

    def _file_view(self, output: Any) -> widgets.Widget:
        suffix = "." + output.name.rsplit(".", 1)[-1].lower() if "." in output.name else ""
        # The grid says how the file opens: images, PDFs and text in the browser, anything else as a download.
        link = widgets.HTML(
            f"<a href='{html.escape(output.url)}' target='_blank' rel='noopener'>"
            f"{html.escape(output.name)}</a> ({output.size:,} bytes)"
        )
        if suffix in IMAGE_TYPES and output.size <= THUMBNAIL_MAX_BYTES:
            image = widgets.Image(
                value=output.read(),
                format=IMAGE_TYPES[suffix],
                layout=widgets.Layout(max_width="160px", max_height="160px"),
            )
            return widgets.VBox([image, link])
        return link

    def show(self) -> JobWidget:
        """Display it and keep it current."""
        from IPython.display import display

        display(self.view)
        self.follow()
        return self

    def follow(self) -> None:
        """Refresh until the job ends, from a daemon thread (the kernel stays free)."""

        def loop() -> None:
            while not self.job.done:
                try:
                    self.job.refresh(wait=0.5)
                except Exception:
                    time.sleep(1.0)
                self.update()
            self.update()

        threading.Thread(target=loop, name="nanogrid-widget", daemon=True).start()


def _pre(text: str) -> str:
    if not text:
        return ""
    return f"<pre style='max-height:240px;overflow:auto;margin:2px 0'>{html.escape(text[-20000:])}</pre>"


class CellWidget(JobWidget):
    """A ``%%nanogrid`` cell's card: status, duration, peak memory, a folded line of the names in and out, files.

    The cell's output, value and exception appear where a local run puts them: in the cell itself,
    or, with ``echo`` (``--async``, whose cell has already ended), inside this card when it finishes.
    """

    def __init__(self, job: CellJob, echo: bool) -> None:
        self.echo = echo
        self.names = widgets.HTML()
        self.output = widgets.Output()
        self._outcome: CellOutcome | None = None
        self._failure: Exception | None = None
        super().__init__(job, title=f"%%nanogrid {job.function_name}")
        self.view.children = [
            self.header,
            widgets.HBox([self.memory, self.memory_label]),
            self.names,
            self.error,
            self.files,
            *([self.output] if echo else []),
        ]

    def _status(self) -> tuple[str, str]:
        if self._failure is not None or (
            self._outcome is not None and self._outcome.error is not None
        ):
            return STATUS_LABELS["failed"]
        return super()._status()

    def _value_repr(self) -> str:
        return ""  # the cell's value is displayed as the cell's own output, as IPython displays it

    def update(self) -> None:
        if self.job.done and self._outcome is None and self._failure is None:
            self._finish()
        super().update()
        self.logs.selected_index = None
        outcome = self._outcome
        if outcome is not None and outcome.error is not None:
            error = outcome.error
            self.error.value = (
                f"<div style='color:#cf222e'><b>{html.escape(type(error).__name__)}</b>: "
                f"{html.escape(str(error))}</div>"
            )
        elif self._failure is not None:
            self.error.value = (
                f"<div style='color:#cf222e'><b>{html.escape(type(self._failure).__name__)}</b>: "
                f"{html.escape(str(self._failure))}</div>"
            )
        self.names.value = self._names_line()

    def _finish(self) -> None:
        job: CellJob = self.job  # type: ignore[assignment]
        try:
            self._outcome = job.outcome()
        except Exception as exc:  # the job itself failed: timeout, out of memory, crash
            self._failure = exc
        if self.echo:
            self._echo()

    def _names_line(self) -> str:
        job: CellJob = self.job  # type: ignore[assignment]
        sent = (
            ", ".join(f"{html.escape(n)} ({size_text(s)})" for n, s in job.sizes_in.items())
            or "none"
        )
        line = f"{len(job.sizes_in)} in ({size_text(sum(job.sizes_in.values()))})"
        details = f"in: {sent}"
        outcome = self._outcome
        if outcome is not None:
            out = (
                ", ".join(
                    f"{html.escape(n)} ({size_text(s)})" for n, s in outcome.names_out.items()
                )
                or "none"
            )
            line += f", {len(outcome.names_out)} out ({size_text(sum(outcome.names_out.values()))})"
            details += f"<br>out: {out}"
            if outcome.deleted:
                line += f", {len(outcome.deleted)} deleted"
                details += "<br>deleted: " + html.escape(", ".join(outcome.deleted))
            if outcome.unpicklable:
                line += f", {len(outcome.unpicklable)} not brought back"
                details += "<br>not brought back: " + html.escape(
                    "; ".join(f"{n} ({why})" for n, why in outcome.unpicklable.items())
                )
        return (
            f"<details><summary style='color:#555'>names: {line}</summary>"
            f"<small style='font-family:monospace'>{details}</small></details>"
        )

    def _echo(self) -> None:
        """``--async``: what the cell printed, its value and its exception, as the cell would have shown them."""
        from IPython import get_ipython

        outcome = self._outcome
        outputs: list[dict[str, Any]] = []
        if outcome is None:
            view = self.job._view
            streams = [("stdout", view.get("stdout", "")), ("stderr", view.get("stderr", ""))]
            outputs.append(
                {
                    "output_type": "error",
                    "ename": type(self._failure).__name__,
                    "evalue": str(self._failure),
                    "traceback": [f"{type(self._failure).__name__}: {self._failure}"],
                }
            )
        else:
            streams = outcome.streams
        outputs[:0] = [
            {"output_type": "stream", "name": name, "text": text} for name, text in streams if text
        ]
        if outcome is not None and outcome.error is None and outcome.value is not None:
            shell = get_ipython()
            data, metadata = (
                shell.display_formatter.format(outcome.value)
                if shell is not None
                else ({"text/plain": repr(outcome.value)}, {})
            )
            outputs.append({"output_type": "display_data", "data": data, "metadata": metadata})
        if outcome is not None:
            outputs += [
                {"output_type": "display_data", "data": figure_data(png, text), "metadata": {}}
                for png, text in outcome.figures
            ]
            if outcome.error is not None:
                render = getattr(outcome.error, "_render_traceback_", None)
                outputs.append(
                    {
                        "output_type": "error",
                        "ename": type(outcome.error).__name__,
                        "evalue": str(outcome.error),
                        "traceback": render() if render else [],
                    }
                )
        self.output.outputs = tuple(outputs)


def figure_data(png: bytes, text: str) -> dict[str, str]:
    import base64

    return {"image/png": base64.b64encode(png).decode(), "text/plain": text}


def size_text(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"
