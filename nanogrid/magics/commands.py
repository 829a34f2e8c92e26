"""``%nanogrid connect | status | jobs | config``: the grid as seen from a notebook."""

from __future__ import annotations

import html
import sys

from IPython.display import display

import nanogrid
from nanogrid.cli import job_row
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
        lines.append(
            f"worker {worker['worker_id']}: {worker['slots']} slots, {pool['busy']} busy, {pool['idle']} warm, "
            f"{pool['stem_cells']} stem cells ({pool['sandbox']})"
        )
    lines.append(
        "jobs: " + (", ".join(f"{n} {s}" for s, n in sorted(status["jobs"].items())) or "none yet")
    )
    print("\n".join(lines))


def show_config() -> None:
    client = get_client()
    print(
        f"url      {client.url}\nruntimes {', '.join(client.runtimes())}\npython   "
        f"{sys.version_info.major}.{sys.version_info.minor}"
    )


def show_jobs(limit: int) -> None:
    """A table: HTML in a notebook, aligned text in a terminal."""
    rows = [job_row(j) for j in get_client().jobs(limit)]
    columns = ["function", "status", "duration", "peak memory", "failure", "job"]
    head = "".join(f"<th style='text-align:left'>{c}</th>" for c in columns)
    body = "".join(
        "<tr>"
        + "".join(f"<td style='text-align:left'>{html.escape(r[c])}</td>" for c in columns)
        + "</tr>"
        for r in rows
    )
    widths = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in columns}
    header = {c: c for c in columns}
    text = "\n".join(
        "  ".join(r[c].ljust(widths[c]) for c in columns).rstrip() for r in [header, *rows]
    )
    display({"text/html": f"<table><tr>{head}</tr>{body}</table>", "text/plain": text}, raw=True)
