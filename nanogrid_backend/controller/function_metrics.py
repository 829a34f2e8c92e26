"""The seed platform's Prometheus metrics, under its names, next to NanoGrid's own on /metrics.

- ``function_invocations_total{functionId,status}``, ``function_duration_seconds`` (the worker's whole turn)
  and ``function_handler_duration_seconds`` (the function's own run) are counted from the registry at each
  scrape, so they cover every worker and controller and survive restarts;
- ``http_request_duration_seconds{method,route,status_code}`` is measured here, by ``RequestDurations``.

``functionId`` is the id the caller knows: the seed function's stable id, or the NanoGrid function id.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from starlette.requests import Request
from starlette.types import Scope

from nanogrid_backend.controller.jobs import live_workers
from nanogrid_backend.controller.metrics import render_metrics
from nanogrid_backend.grid import Grid
from nanogrid_backend.keys import Authenticator, AuthError
from nanogrid_backend.models import COMPLETED

DURATION_BUCKETS_S = (0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30)  # the original's
HANDLER_BUCKETS_S = (0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30)
HTTP_BUCKETS_S = (0.1, 0.5, 1, 2, 5)


class RequestDurations:
    """Each request's duration by method, route template (never the raw path) and status. Observed by the
    controller's one ASGI middleware (``limits.RequestGate``), which also caps request bodies: one layer, not two,
    on every request's path."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.histogram = Histogram(
            "http_request_duration_seconds",
            "Duration of HTTP requests in seconds",
            ["method", "route", "status_code"],
            buckets=HTTP_BUCKETS_S,
            registry=self.registry,
        )
        # the histogram's child per label values, found without ``labels()``'s checks and lock (6 µs a request)
        self._children: dict[tuple[str, str, int], Any] = {}

    def observe(self, scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        if route is None:  # unmatched paths (scanners) would make a label per path
            return
        key = (scope["method"], route.path, status)
        child = self._children.get(key)
        if child is None:
            if len(self._children) >= 4096:
                self._children.clear()
            child = self._children[key] = self.histogram.labels(key[0], key[1], str(status))
        child.observe(seconds)


class FunctionCollector:
    """Collects the function metrics from the registry when scraped."""

    def __init__(self, grid: Grid, per_function: bool) -> None:
        self.grid = grid
        self.per_function = (
            per_function  # else every function's calls add up under functionId="all"
        )

    def collect(self) -> Any:
        bounds = tuple(sorted({b * 1000 for b in DURATION_BUCKETS_S + HANDLER_BUCKETS_S}))
        stable = {
            f.function_id: f.stable_id or f.function_id for f in self.grid.registry.list_functions()
        }
        invocations = CounterMetricFamily(
            "function_invocations",
            "Total number of function invocations",
            labels=["functionId", "status"],
        )
        duration = HistogramMetricFamily(
            "function_duration_seconds",
            "Duration of Function Execution in seconds",
            labels=["functionId", "status"],
        )
        handler = HistogramMetricFamily(
            "function_handler_duration_seconds",
            "Duration of user handler execution only, excluding Worker orchestration",
            labels=["functionId", "status"],
        )
        merged: dict[tuple[str, str], list[Any]] = {}
        for row in self.grid.registry.function_stats(buckets_ms=bounds):
            function = stable.get(row.function_id, row.function_id) if self.per_function else "all"
            key = (function, "SUCCESS" if row.status == COMPLETED else "FAILED")
            into = merged.setdefault(key, [0, 0.0, 0.0, 0, [0] * len(bounds), [0] * len(bounds)])
            into[0] += row.count
            into[1] += row.total_ms
            into[2] += row.handler_ms
            into[3] += row.handler_count
            into[4] = [a + b for a, b in zip(into[4], row.total_buckets, strict=True)]
            into[5] = [a + b for a, b in zip(into[5], row.handler_buckets, strict=True)]
        for labels, (
            count,
            total_ms,
            handler_ms,
            handler_count,
            total_buckets,
            handler_buckets,
        ) in merged.items():
            invocations.add_metric(list(labels), count)
            duration.add_metric(
                list(labels),
                _buckets(bounds, total_buckets, DURATION_BUCKETS_S, count),
                total_ms / 1000,
            )
            handler.add_metric(
                list(labels),
                _buckets(bounds, handler_buckets, HANDLER_BUCKETS_S, handler_count),
                handler_ms / 1000,
            )
        yield from (invocations, duration, handler)


def _buckets(
    bounds: tuple[float, ...], counts: list[int], wanted: tuple[float, ...], total: int
) -> list[tuple[str, int]]:
    by_bound = dict(zip(bounds, counts, strict=True))
    return [(repr(float(b)), by_bound[b * 1000]) for b in wanted] + [("+Inf", total)]


def _is_admin(request: Request, grid: Grid) -> bool:
    """/metrics is open (as the seed's was), but function ids are an owner's own: per-function series need an
    admin key (a Prometheus scrape with ``authorization: Bearer <key>``)."""
    presented = request.headers.get("x-api-key") or request.headers.get(
        "authorization", ""
    ).removeprefix("Bearer ")
    if not presented:
        return False
    try:
        return bool(Authenticator(grid.registry).check(presented).admin)
    except AuthError:
        return False


def render_all(request: Request, grid: Grid) -> str:
    """NanoGrid's metrics (queue, workers, pools), then the seed's (functions, HTTP requests)."""
    functions = CollectorRegistry()
    functions.register(FunctionCollector(grid, per_function=_is_admin(request, grid)))
    text = (
        render_metrics(grid.queue.depth(), live_workers(grid)) + generate_latest(functions).decode()
    )
    durations: RequestDurations | None = getattr(request.state, "request_durations", None)
    return text + (generate_latest(durations.registry).decode() if durations is not None else "")
