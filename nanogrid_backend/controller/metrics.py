"""/metrics in Prometheus's text format, built from the workers' heartbeats and the queue."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge, generate_latest


def render_metrics(queue_depth: int, workers: list[dict]) -> str:
    registry = CollectorRegistry()
    Gauge("nanogrid_queue_depth", "jobs waiting in the queue", registry=registry).set(queue_depth)
    Gauge("nanogrid_workers", "workers with a live heartbeat", registry=registry).set(len(workers))
    Gauge(
        "nanogrid_backlog_per_worker",
        "queued jobs per live worker (the autoscaling signal)",
        registry=registry,
    ).set(queue_depth / max(1, len(workers)))
    jobs = Gauge(
        "nanogrid_worker_jobs",
        "jobs a worker finished since it started",
        ["worker", "outcome"],
        registry=registry,
    )
    cold = Gauge(
        "nanogrid_worker_cold_starts",
        "calls that specialised a sandbox",
        ["worker"],
        registry=registry,
    )
    sandboxes = Gauge(
        "nanogrid_pool_sandboxes",
        "sandboxes in a worker's warm pool",
        ["worker", "state"],
        registry=registry,
    )
    for worker in workers:
        name = worker["worker_id"]
        jobs.labels(name, "completed").set(worker.get("completed", 0))
        jobs.labels(name, "failed").set(worker.get("failed", 0))
        cold.labels(name).set(worker.get("cold_starts", 0))
        pool = worker.get("pool", {})
        for state in ("busy", "idle", "stem_cells"):
            sandboxes.labels(name, state).set(pool.get(state, 0))
    return generate_latest(registry).decode()
