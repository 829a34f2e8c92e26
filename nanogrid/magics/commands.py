"""``%nanogrid connect | status | jobs | config``: the grid as seen from a notebook."""

from __future__ import annotations

import html
import sys
from typing import Any

from IPython.display import HTML, display

import nanogrid
from nanogrid.client import get_client


def connect(url: str | None, api_key: str | None) -> None:
    client = nanogrid.connect(url, api_key)
    print(f"connected to {client.url} ({client.health()['sandbox']})")


def show_status() -> None:
    client = get_client()
    status = client.system_status()
    lines = [f"grid {client.url}: {status['queue_depth']} queued"]
    for worker in status["workers"]:
        pool = worker["pool"]
        lines.append(f"worker {worker['worker_id']}: {worker['slots']} slots, {pool['busy']} busy, {pool['idle']} warm, "
                     f"{pool['stem_cells']} stem cells ({pool['sandbox']})")
    lines.append("jobs: " + (", ".join(f"{n} {s}" for s, n in sorted(status["jobs"].items())) or "none yet"))
    print("\n".join(lines))


def show_config() -> None:
    client = get_client()
    print(f"url      {client.url}\nruntimes {', '.join(client.runtimes())}\npython   "
          f"{sys.version_info.major}.{sys.version_info.minor}")


def job_row(job: dict[str, Any]) -> dict[str, str]:
    """One job as ``%nanogrid jobs`` and ``nanogrid jobs`` show it."""
    ms, peak, error = job.get("execution_time_ms"), job.get("peak_memory_bytes"), job.get("error") or {}
    reason = ""
    if job["status"] in ("failed", "cancelled"):
        kind = error.get("type") or error.get("kind") or job["status"]
        reason = f"{kind}: {error.get('message', '')}".strip().rstrip(":")
    return {"job": job["job_id"], "function": job.get("function_name") or job["function_id"], "status": job["status"],
            "duration": "" if ms is None else f"{ms:.1f} ms", "peak memory": "" if peak is None else
            f"{peak / (1 << 20):.1f} MiB", "failure": reason.splitlines()[0][:200] if reason else ""}


def show_jobs(limit: int) -> None:
    rows = [job_row(j) for j in get_client().jobs(limit)]
    columns = ["function", "status", "duration", "peak memory", "failure", "job"]
    head = "".join(f"<th style='text-align:left'>{c}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td style='text-align:left'>{html.escape(r[c])}</td>" for c in columns) + "</tr>"
                   for r in rows)
    display(HTML(f"<table><tr>{head}</tr>{body}</table>"))
