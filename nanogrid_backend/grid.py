"""Assembles one grid from its configuration: registry, store, queue, result bus, worker."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from nanogrid_backend.builds.builder import BuiltEnvironment, Environments
from nanogrid_backend.config import GridConfig
from nanogrid_backend.keys import OwnerPolicy, ensure_local_key
from nanogrid_backend.models import FAILED, RUNNING, FunctionRecord, JobMessage
from nanogrid_backend.notify import Notifier
from nanogrid_backend.queue.base import JobQueue
from nanogrid_backend.queue.local import LocalQueue
from nanogrid_backend.registry.base import JobRegistry, Registry
from nanogrid_backend.registry.lock import DataDirLock
from nanogrid_backend.registry.sqlite import BACKUPS_KEPT, SQLiteRegistry
from nanogrid_backend.results.base import ResultBus
from nanogrid_backend.results.local import LocalResultBus
from nanogrid_backend.retention import Janitor
from nanogrid_backend.sandbox.base import Limits
from nanogrid_backend.sandbox.docker import DockerSandboxFactory, DockerUnavailable
from nanogrid_backend.sandbox.factory import SandboxFactory
from nanogrid_backend.sandbox.process import ProcessSandboxFactory
from nanogrid_backend.sandbox.scratch import SANDBOX_UID
from nanogrid_backend.schedules import Scheduler
from nanogrid_backend.secretbox import SecretBox
from nanogrid_backend.store.base import BlobStore
from nanogrid_backend.store.local import LocalStore
from nanogrid_backend.volumes import VolumeStore
from nanogrid_backend.worker.agent import Worker
from nanogrid_backend.worker.ai_gateway import ai_gateway
from nanogrid_backend.worker.pool import WarmPool
from nanogrid_contract.errors import ConfigError

# The AWS adapters (boto3, redis: `pip install "nanogrid[aws]"`) are imported where a grid is configured to use them:
# the embedded grid (`nanogrid[grid]`) runs without either installed.
if TYPE_CHECKING:
    from nanogrid_backend.volume_sync import S3Volumes

log = logging.getLogger(__name__)


def make_sandbox_factory(config: GridConfig) -> SandboxFactory:
    """``sandbox=docker`` needs the engine and the runtime image; ``auto`` falls back to processes."""
    if config.sandbox in ("docker", "auto"):
        try:
            return DockerSandboxFactory(
                config.docker_image,
                config.data_dir / "sandboxes",
                kill_grace_s=config.kill_grace_s,
                limits=sandbox_limits(config),
                disk_mib=config.default_disk_mib,
                pids_limit=config.docker_pids_limit,
                cpus=config.docker_cpus,
            )
        except DockerUnavailable as exc:
            if config.sandbox == "docker":
                raise
            log.warning("sandbox=auto: %s; using process sandboxes (trusted code only)", exc)
    elif config.sandbox != "process":
        raise ValueError(f"sandbox must be docker, process or auto, not {config.sandbox!r}")
    return ProcessSandboxFactory(
        config.data_dir / "sandboxes",
        config.data_dir,
        bubblewrap=config.bubblewrap,
        cgroups=config.cgroups,
        kill_grace_s=config.kill_grace_s,
        limits=sandbox_limits(config),
    )


def sandbox_limits(config: GridConfig) -> Limits:
    """What the host accepts from one call, whatever the sandbox sends."""
    return Limits(
        capture_bytes=config.capture_limit_bytes,
        result_bytes=config.max_result_bytes,
        output_bytes=config.max_output_bytes,
        output_files=config.max_output_files,
    )


def make_registry(config: GridConfig, keep_backups: int = 0) -> Registry:
    """DynamoDB when a table is configured, else SQLite in the data directory (backed up first if asked)."""
    if config.dynamodb_table:
        from nanogrid_backend.registry.dynamodb import DynamoDBRegistry

        return DynamoDBRegistry(config.dynamodb_table)
    config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return SQLiteRegistry(config.data_dir / "registry.sqlite3", keep_backups=keep_backups)


def make_result_bus(config: GridConfig, registry: JobRegistry) -> ResultBus:
    """Redis when a host is configured (results reach every controller), else in process."""
    if config.redis_host:
        from nanogrid_backend.results.redis import RedisResultBus

        return RedisResultBus(config.redis_host, config.redis_port, registry)
    return LocalResultBus()


def make_volumes(
    config: GridConfig, data: Path, registry: Registry, store: BlobStore, uid: int
) -> tuple[VolumeStore | S3Volumes, VolumeStore]:
    """What ``/v1/volumes`` serves, and what this machine's sandboxes mount. Embedded: one store for both (the
    volumes are this machine's). With S3: the volumes live in the data bucket, and workers mount copies they sync."""
    limits = {"max_volume_mib": config.max_volume_mib, "owner_volume_mib": config.owner_volume_mib}
    if not isinstance(store, LocalStore):  # the data bucket
        from nanogrid_backend.store.s3 import S3Store
        from nanogrid_backend.volume_sync import S3Volumes, SyncedVolumes

        assert isinstance(store, S3Store)
        home = S3Volumes(store.s3, store.data_bucket, registry, **limits)
        return home, SyncedVolumes(data / "volumes", registry, home, uid, **limits)
    local = VolumeStore(data / "volumes", registry, uid, **limits)
    return local, local


def _same_disk(one: Path, other: Path) -> bool:
    """Whether two existing directories are on one filesystem, sharing its free space."""
    try:
        return one.stat().st_dev == other.stat().st_dev
    except OSError:
        return False


def backlog_publisher(namespace: str) -> Callable[[float], None] | None:
    """Puts BacklogPerInstance into CloudWatch (the worker group's target-tracking metric), if configured."""
    if not namespace:
        return None
    import boto3

    cloudwatch = boto3.client("cloudwatch")

    def publish(value: float) -> None:
        cloudwatch.put_metric_data(
            Namespace=namespace,
            MetricData=[{"MetricName": "BacklogPerInstance", "Value": value, "Unit": "Count"}],
        )

    return publish


class Grid:
    """One process's part of a grid: ``all`` (the embedded grid), ``controller`` or ``worker``.

    Adapters follow the configuration: SQS, S3, DynamoDB and Redis when they are configured,
    else an in-memory queue, a directory store, SQLite and an in-process bus.
    """

    def __init__(self, config: GridConfig, role: str = "all") -> None:
        self.config = config
        self.role = role
        data = config.data_dir
        os.umask(0o077)  # every file and directory the grid makes is its account's alone
        data.mkdir(mode=0o700, parents=True, exist_ok=True)
        # also a data dir made by an older version: no other local account reads any owner's data
        data.chmod(0o700)
        for path in data.iterdir():  # the registry, the key file, grid.json, whoever made them
            if path.is_file() and not path.is_symlink():
                path.chmod(0o600)
        if role != "all" and not (config.queue_url and config.redis_host):
            raise ConfigError(
                f"a separate {role} needs a shared queue and bus: set SQS_QUEUE_URL and REDIS_HOST "
                "(or run everything in one process with `nanogrid up`)"
            )
        # one grid per data dir, before _recover
        self.lock = DataDirLock(data).acquire() if role == "all" else None
        try:
            self.registry = make_registry(config, keep_backups=BACKUPS_KEPT)
        except BaseException:
            if self.lock:
                self.lock.release()
            raise
        self.api_key = ensure_local_key(self.registry, data) if role == "all" else None
        self.owners = OwnerPolicy(self.registry, config)
        # NANOGRID_SECRETS_KEY, else data_dir/secrets.key (nanogrid_backend/secretbox.py)
        self.secrets = SecretBox.load(data)
        quota, owner_of = self.owners.disk_quota, self._owner_of
        if config.code_bucket:
            from nanogrid_backend.store.s3 import S3Store

            self.store: BlobStore = S3Store(
                config.code_bucket,
                config.data_bucket or config.code_bucket,
                quota=quota,
                owner_of=owner_of,
            )
        else:
            self.store = LocalStore(data / "store", quota=quota, owner_of=owner_of)
        # The embedded grid's in-memory queue, refilled from the registry at start (_recover); SQS keeps its messages.
        self.local_queue = (
            None
            if config.queue_url
            else LocalQueue(
                limit=lambda owner: self.owners.max_concurrency(owner, config.workers),
                load_payload=self._queued_payload,
            )
        )
        if self.local_queue is not None:
            self.queue: JobQueue = self.local_queue
        else:
            from nanogrid_backend.queue.sqs import SQSQueue

            self.queue = SQSQueue(
                config.queue_url, self.store, config.sqs_visibility_s, config.dlq_url
            )
        self.janitor = (
            Janitor(self.store, config.output_retention_s, config.gc_interval_s)
            if role == "all"
            else None
        )
        self.bus = make_result_bus(config, self.registry)
        self.pool: WarmPool | None = None
        self.environments: Environments | None = None
        # runtime name (nodejs, go, cpp) -> its image
        self.languages: dict[str, BuiltEnvironment] = {}
        self.worker: Worker | None = None
        python = config.python_runtime.removeprefix("python")
        self.factory: SandboxFactory | None = None
        if role in ("all", "worker"):
            factory = self.factory = make_sandbox_factory(config)
            python = factory.python or python
            # Docker serves every Python that has a runtime image; process sandboxes the grid's own.
            images = factory.runtime_images()
            pythons = list(images or [python])
            self.environments = Environments(
                data / "envs",
                runtimes={f"python{v}": v for v in pythons},
                docker_images=images,
                cap_bytes=int(config.env_cache_gb * (1 << 30)),
                shared=self.store if config.code_bucket else None,
            )
            # Node.js, Go and C++ (the seed platform's other languages) where their images are built; Docker only.
            self.languages = factory.language_runtimes()
            self.pool = WarmPool(
                factory,
                cap=config.effective_pool_cap,
                stem_cells=config.stem_cells,
                idle_ttl_s=config.idle_ttl_s,
                environments=self.environments,
                languages=self.languages,
            )
            self.worker = Worker(
                queue=self.queue,
                registry=self.registry,
                store=self.store,
                bus=self.bus,
                pool=self.pool,
                slots=config.workers,
                max_output_bytes=config.max_output_bytes,
                visibility_s=config.sqs_visibility_s,
                heartbeat_s=config.heartbeat_s,
                publish_backlog=backlog_publisher(config.cloudwatch_namespace),
                ai=ai_gateway(config, self.bus.redis),
                secrets=self.secrets,
                notifier=Notifier(self.registry, allow_networks=config.webhook_allow_networks),
            )
        # Owners' volumes: what /v1/volumes serves, and what this worker's sandboxes mount
        self.volumes, mounted = make_volumes(
            config,
            data,
            self.registry,
            self.store,
            self.factory.sandbox_uid if self.factory is not None else SANDBOX_UID,
        )
        if self.worker and self.pool:
            self.worker.volumes, mounted.stop_idle = mounted, self.pool.stop_idle
            room = self.factory.disk_room if self.factory is not None else None
            if room is not None and _same_disk(room.directory, mounted.directory):
                room.also_promised, mounted.also_promised = (
                    mounted.promised,
                    room.promised,
                )  # both sparse files
        self._mounted_volumes = mounted
        self.runtimes = (
            self.environments.runtimes if self.environments else {f"python{python}": python}
        )
        # each controller fires schedules
        self.scheduler = Scheduler(self) if role in ("all", "controller") else None
        self.runtimes = {
            **self.runtimes,
            **{name: env.python for name, env in self.languages.items()},
        }

    def describe_sandbox(self) -> str:
        return self.pool.factory.describe() if self.pool else "workers run separately"

    def _queued_payload(self, job_id: str) -> bytes | None:
        """A queued job's arguments, read back from the registry (the local queue keeps big backlogs on disk)."""
        job = self.registry.get_job(job_id)
        return job.payload if job is not None else None

    def _owner_of(self, job_id: str) -> str:
        """Whose quota a job's output files count against (for a store told only the job id)."""
        job = self.registry.get_job(job_id)
        return job.owner if job is not None else ""

    def start(self) -> None:
        if self.role == "all" and not self.config.queue_url:
            self._recover()
        if self.worker:
            self.worker.start()
        if self.janitor:
            self.janitor.start()
        if self.scheduler:
            self.scheduler.start()

    def stop(self) -> None:
        if self.scheduler:
            self.scheduler.stop()
        if self.janitor:
            self.janitor.stop()
        if self.worker:
            self.worker.stop()
        if self.factory:
            # sandboxes whose removal was still under way: none is left behind
            self.factory.sweep(wait_s=30)
        self._mounted_volumes.close()
        self.volumes.close()
        self.bus.close()
        self.registry.close()
        if self.lock:
            self.lock.release()

    def _recover(self) -> None:
        """Jobs left by a previous run: pending ones go back on the queue, running ones fail."""
        for job in self.registry.list_jobs(limit=-1, status=RUNNING):
            job.status, job.finished_at = FAILED, time.time()
            job.error = {
                "kind": "interrupted",
                "message": "the grid stopped while this job ran; run it again",
            }
            self.registry.finish_job(job)
        queue = self.local_queue
        assert queue is not None  # recovery is the embedded grid's; SQS keeps its own messages
        functions: dict[str, FunctionRecord | None] = {}
        requeued = 0
        # a page at a time and without payloads: read back when taken
        for job in self.registry.pending_jobs():
            if job.function_id not in functions:
                functions[job.function_id] = self.registry.get_function(job.function_id)
            function = functions[job.function_id]
            if function is None:
                job.status, job.finished_at = FAILED, time.time()
                job.error = {
                    "kind": "not_found",
                    "message": f"function {job.function_id} was deleted",
                }
                self.registry.finish_job(job)
                continue
            timeout_s = min(function.timeout_s, self.owners.max_timeout(job.owner))
            queue.put(
                [
                    JobMessage(
                        job.job_id,
                        job.function_id,
                        job.payload_format,
                        b"",
                        timeout_s,
                        function.memory_mib,
                        owner=job.owner,
                        trigger=job.trigger,
                        created_at=job.created_at,
                    )
                ],
                stored=True,
            )
            requeued += 1
        if requeued:
            log.info("requeued %d pending jobs from the previous run", requeued)
