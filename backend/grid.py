"""Assembles one grid from its configuration: registry, store, queue, result bus, worker."""

from __future__ import annotations

import logging
import time

from backend.config import GridConfig
from backend.keys import ensure_local_key
from backend.models import FAILED, PENDING, RUNNING, JobMessage
from backend.queue.local import LocalQueue
from backend.registry.sqlite import SQLiteRegistry
from backend.results.local import LocalResultBus
from backend.sandbox.docker import DockerSandboxFactory, DockerUnavailable
from backend.sandbox.process import ProcessSandboxFactory
from backend.store.local import LocalStore
from backend.worker.agent import Worker
from backend.worker.pool import WarmPool

log = logging.getLogger(__name__)


def make_sandbox_factory(config: GridConfig) -> ProcessSandboxFactory | DockerSandboxFactory:
    """``sandbox=docker`` needs the engine and the runtime image; ``auto`` falls back to processes."""
    if config.sandbox in ("docker", "auto"):
        try:
            return DockerSandboxFactory(
                config.docker_image, config.data_dir / "sandboxes", kill_grace_s=config.kill_grace_s,
                capture_limit=config.capture_limit_bytes, max_output_bytes=config.max_output_bytes,
                scratch_mib=config.docker_scratch_mib, pids_limit=config.docker_pids_limit, cpus=config.docker_cpus,
            )
        except DockerUnavailable as exc:
            if config.sandbox == "docker":
                raise
            log.warning("sandbox=auto: %s; using process sandboxes (trusted code only)", exc)
    elif config.sandbox != "process":
        raise ValueError(f"sandbox must be docker, process or auto, not {config.sandbox!r}")
    return ProcessSandboxFactory(
        config.data_dir / "sandboxes", config.data_dir, bubblewrap=config.bubblewrap, cgroups=config.cgroups,
        kill_grace_s=config.kill_grace_s, capture_limit=config.capture_limit_bytes,
        max_output_bytes=config.max_output_bytes,
    )


class Grid:
    """The embedded grid: everything in one process with local adapters."""

    def __init__(self, config: GridConfig) -> None:
        self.config = config
        data = config.data_dir
        data.mkdir(parents=True, exist_ok=True)
        self.registry = SQLiteRegistry(data / "registry.sqlite3")
        self.api_key = ensure_local_key(self.registry, data)  # for clients on this machine
        self.store = LocalStore(data / "store")
        self.queue = LocalQueue()
        self.bus = LocalResultBus()
        factory = make_sandbox_factory(config)
        python = getattr(factory, "python", None) or config.python_runtime.removeprefix("python")
        self.runtimes = {f"python{python}": python}
        self.pool = WarmPool(factory, cap=config.effective_pool_cap, stem_cells=config.stem_cells,
                             idle_ttl_s=config.idle_ttl_s)
        self.worker = Worker(queue=self.queue, registry=self.registry, store=self.store, bus=self.bus,
                             pool=self.pool, slots=config.workers, max_output_bytes=config.max_output_bytes)

    def start(self) -> None:
        self._recover()
        self.worker.start()

    def stop(self) -> None:
        self.worker.stop()
        self.registry.close()

    def _recover(self) -> None:
        """Jobs left by a previous run: pending ones go back on the queue, running ones fail."""
        for job in self.registry.list_jobs(limit=-1, status=RUNNING):
            job.status, job.finished_at = FAILED, time.time()
            job.error = {"kind": "interrupted", "message": "the grid stopped while this job ran; run it again"}
            self.registry.finish_job(job)
        pending = self.registry.list_jobs(limit=-1, status=PENDING)
        for job in reversed(pending):
            function = self.registry.get_function(job.function_id)
            if function is None:
                job.status, job.finished_at = FAILED, time.time()
                job.error = {"kind": "not_found", "message": f"function {job.function_id} was deleted"}
                self.registry.finish_job(job)
                continue
            self.queue.put([JobMessage(job.job_id, job.function_id, job.payload_format, job.payload,
                                       function.timeout_s, function.memory_mib)])
        if pending:
            log.info("requeued %d pending jobs from the previous run", len(pending))
