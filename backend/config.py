"""Grid configuration, read once: defaults, then a TOML file, then ``NANOGRID_*`` env vars, then flags."""

from __future__ import annotations

import os
import sys
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

MiB = 1 << 20
SEED_NAMES = {  # the seed platform's environment variables, read as these settings
    "queue_url": "SQS_QUEUE_URL", "dlq_url": "SQS_DLQ_URL", "code_bucket": "S3_CODE_BUCKET",
    "data_bucket": "S3_USER_DATA_BUCKET", "dynamodb_table": "DYNAMODB_TABLE",
    "redis_host": "REDIS_HOST", "redis_port": "REDIS_PORT", "ai_endpoint": "AI_ENDPOINT", "ai_model": "LLM_MODEL",
}


def default_data_dir() -> Path:
    return Path(os.environ.get("NANOGRID_DATA_DIR") or Path.home() / ".nanogrid")


@dataclass
class GridConfig:
    data_dir: Path = field(default_factory=default_data_dir)
    host: str = "127.0.0.1"
    port: int = 8765
    workers: int = max(2, os.cpu_count() or 1)  # calls run at once by the embedded worker
    sandbox: str = "auto"  # docker | process (trusted code only) | auto: docker when the engine and image are there
    docker_image: str = "nanogrid/runtime-python:latest"
    docker_scratch_mib: int = 1024  # tmpfs for the bootstrap's working and output directory
    docker_pids_limit: int = 64
    docker_cpus: float = 1.0
    docker_ai_network: str = "nanogrid-ai"  # internal network joined by the AI node and by sandboxes with ai=True
    bubblewrap: str = "auto"  # auto | on | off: namespaces around process sandboxes
    cgroups: str = "auto"  # auto | off: per-sandbox memory cgroup (limits and peak memory)
    stem_cells: int = 2  # unspecialised sandboxes kept started
    pool_cap: int = 0  # most specialised sandboxes alive at once (stem cells extra); 0 = workers * 4
    idle_ttl_s: float = 300.0  # idle warm sandboxes are stopped after this
    kill_grace_s: float = 1.0  # SIGTERM, then this long, then SIGKILL
    default_memory_mib: int = 512
    max_memory_mib: int = 8192
    default_timeout_s: float = 300.0
    max_timeout_s: float = 3600.0
    max_package_bytes: int = 64 * MiB
    max_payload_bytes: int = 16 * MiB
    max_output_bytes: int = 1024 * MiB  # all output files of one call
    capture_limit_bytes: int = 1 * MiB  # stdout / stderr kept per call
    map_chunk_limit: int = 10_000  # items in one /map request
    # Shared services for many machines (empty: the embedded grid's local adapters). The seeds' names
    # (SQS_QUEUE_URL, S3_CODE_BUCKET, ...) are read too; endpoints come from boto3's own settings.
    queue_url: str = ""
    code_bucket: str = ""
    data_bucket: str = ""
    dynamodb_table: str = ""
    redis_host: str = ""
    redis_port: int = 6379
    dlq_url: str = ""  # SQS_DLQ_URL: jobs whose deliveries all failed are reported from here
    sqs_visibility_s: int = 30  # extended while a job runs; a dead worker's job reappears after this
    heartbeat_s: float = 5.0
    ai_endpoint: str = ""  # AI_ENDPOINT: the private AI node (an Ollama server) functions may call
    ai_model: str = ""  # LLM_MODEL: its default model
    cloudwatch_namespace: str = ""  # e.g. NanoGrid: workers publish BacklogPerInstance there for autoscaling
    rate_limit: float = 1000.0  # requests per second per API key (0: no limit); a key may set its own
    rate_burst: int = 2000  # requests a key may make at once before the rate applies
    # Multi-tenancy: each owner (a key's name) gets its turn, a share of the slots and a share of the disk.
    owner_max_concurrency: int = 0  # calls of one owner running at once; 0: every slot but one once there are 2 owners
    owner_disk_quota_bytes: int = 10 * 1024 * MiB  # stored output files per owner (0: no quota); a key may set its own
    output_retention_s: float = 7 * 86400.0  # output files and blobs are deleted this long after they were stored
    gc_interval_s: float = 600.0  # how often the embedded grid looks for expired outputs

    @property
    def effective_pool_cap(self) -> int:
        return self.pool_cap or self.workers * 4

    @property
    def python_runtime(self) -> str:
        return "python%d.%d" % sys.version_info[:2]

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: object) -> GridConfig:
        """Defaults < config file (``NANOGRID_CONFIG``) < ``NANOGRID_<FIELD>`` env vars < overrides."""
        values: dict[str, object] = {}
        path = path or os.environ.get("NANOGRID_CONFIG")
        if path:
            with open(path, "rb") as f:
                values.update(tomllib.load(f))
        for name, seed_name in SEED_NAMES.items():
            if os.environ.get(seed_name):
                values[name] = os.environ[seed_name]
        for f in fields(cls):
            env = os.environ.get(f"NANOGRID_{f.name.upper()}")
            if env is not None:
                values[f.name] = env
        values.update({k: v for k, v in overrides.items() if v is not None})
        config = cls()
        for f in fields(cls):
            if f.name in values:
                setattr(config, f.name, _coerce(f.name, values[f.name], getattr(config, f.name)))
        config.data_dir = Path(config.data_dir).expanduser().resolve()
        return config


def _coerce(name: str, value: object, default: object) -> object:
    try:
        if isinstance(default, Path):
            return Path(str(value))
        if isinstance(default, bool):
            return str(value).lower() in ("1", "true", "yes", "on")
        return type(default)(value)
    except (TypeError, ValueError):
        raise ValueError(f"setting {name!r}: cannot read {value!r} as {type(default).__name__}") from None
