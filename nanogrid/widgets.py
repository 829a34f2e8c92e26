"""ipywidgets views of jobs: live status, where and how it ran, its output, files and errors."""

from __future__ import annotations

import html
import threading
import time
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets

if TYPE_CHECKING:
    from nanogrid.job import Job

IMAGE_TYPES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".gif": "gif", ".webp": "webp"}
THUMBNAIL_MAX_BYTES = 5 << 20
STATUS_LABELS = {"pending": ("queued", "#888"), "running": ("running", "#1f6feb"),
                 "completed": ("succeeded", "#1a7f37"), "failed": ("failed", "#cf222e"),
                 "cancelled": ("cancelled", "#9a6700")}


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
        self.memory = widgets.FloatProgress(min=0, max=float(memory_limit_mib or 1), description="memory",
                                            layout=widgets.Layout(width="320px"))
        self.memory_label = widgets.HTML()
        self.value = widgets.HTML()
        self.stdout = widgets.HTML()
        self.stderr = widgets.HTML()
        self.files = widgets.HBox(layout=widgets.Layout(flex_flow="row wrap"))
        self.error = widgets.HTML()
        self.logs = widgets.Accordion(children=[self.stdout, self.stderr])
        self.logs.set_title(0, "stdout")
        self.logs.set_title(1, "stderr")
        self.view = widgets.VBox([self.header, widgets.HBox([self.memory, self.memory_label]), self.value,
                                  self.error, self.logs, self.files],
                                 layout=widgets.Layout(border="1px solid #ddd", padding="6px"))
        self._files_shown = False
        self.update()

    def update(self) -> None:
        v: dict[str, Any] = self.job._view
        label, color = STATUS_LABELS.get(v["status"], (v["status"], "#888"))
        if v.get("execution_time_ms") is not None:
            timing = f"duration {v['execution_time_ms']:.1f} ms"
        else:
            timing = f"elapsed {max(0.0, time.time() - v['created_at']):.1f} s"
        start = "" if v.get("cold") is None else ("cold start" if v["cold"] else "warm")
        where = " · ".join(x for x in (v.get("worker_id"), v.get("sandbox_id")) if x)
        ai = v.get("ai_usage")
        if ai:
            start += (f" · AI {ai['calls']} calls, {ai['prompt_tokens']} + {ai['completion_tokens']} tokens")
        self.header.value = (
            f"<b>{html.escape(self.title)}</b> <span style='background:{color};color:white;padding:1px 6px;"
            f"border-radius:8px'>{label}</span> {timing} · peak memory {_mib(v.get('peak_memory_bytes'))} "
            f"{'· ' + start if start else ''}<br><small style='color:#666'>{html.escape(v['job_id'])}"
            f"{' · ' + html.escape(where) if where else ''}</small>"
        )
        peak = (v.get("peak_memory_bytes") or 0) / (1 << 20)
        if v.get("memory_limit_mib") and self.memory_limit_mib is None:
            self.memory_limit_mib = v["memory_limit_mib"]
            self.memory.max = float(self.memory_limit_mib)
        if self.memory_limit_mib is None:
            self.memory.max = max(self.memory.max, peak or 1)
        self.memory.value = min(peak, self.memory.max)
        limit = f" of {self.memory_limit_mib} MiB" if self.memory_limit_mib else ""
        idle = f" (idle sandbox {_mib(v['baseline_memory_bytes'])})" if v.get("baseline_memory_bytes") else ""
        self.memory_label.value = f"{_mib(v.get('peak_memory_bytes'))}{limit}{idle}"
        self.stdout.value = _pre(v.get("stdout", ""))
        self.stderr.value = _pre(v.get("stderr", ""))
        self.logs.selected_index = 0 if v.get("stdout") else None
        error = v.get("error")
        self.error.value = "" if not error else (
            f"<div style='color:#cf222e'><b>{html.escape(error.get('type') or error.get('kind', 'error'))}</b>: "
            f"{html.escape(error.get('message', ''))}</div>{_pre(error.get('traceback', ''))}"
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
        link = widgets.HTML(f"<a href='{html.escape(output.url)}' download target='_blank'>"
                            f"{html.escape(output.name)}</a> ({output.size:,} bytes)")
        if suffix in IMAGE_TYPES and output.size <= THUMBNAIL_MAX_BYTES:
            image = widgets.Image(value=output.read(), format=IMAGE_TYPES[suffix],
                                  layout=widgets.Layout(max_width="160px", max_height="160px"))
            return widgets.VBox([image, link])
        return link

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
