"""Grid configuration, read once: defaults, then a TOML file, then ``NANOGRID_*`` env vars, then flags.

Every setting is a field of ``GridConfig``; adding one here makes it a ``NANOGRID_<NAME>`` variable, a
config-file key and (where the command has one) a flag of the same name, with no other place to touch.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from nanogrid_contract.errors import ConfigError

MiB = 1 << 20
SEED_NAMES = {  # the seed platform's environment variables, read as these settings
    "queue_url": "SQS_QUEUE_URL",
    "dlq_url": "SQS_DLQ_URL",
    "code_bucket": "S3_CODE_BUCKET",
    "data_bucket": "S3_USER_DATA_BUCKET",
    "dynamodb_table": "DYNAMODB_TABLE",
    "redis_host": "REDIS_HOST",
    "redis_port": "REDIS_PORT",
    "ai_endpoint": "AI_ENDPOINT",
    "ai_model": "LLM_MODEL",
}


def default_data_dir() -> Path:
    return Path(os.environ.get("NANOGRID_DATA_DIR") or Path.home() / ".nanogrid")


@dataclass
class GridConfig:
    data_dir: Path = field(default_factory=default_data_dir)
    host: str = "127.0.0.1"
    open_access: bool = (
        False  # nanogrid up --open: requests without a key act as the local owner (loopback only)
    )
    port: int = 8765
    workers: int = max(2, os.cpu_count() or 1)  # calls run at once by the embedded worker
    sandbox: str = "auto"  # docker | process (trusted code only) | auto: docker when the engine and image are there
    docker_image: str = "nanogrid/runtime-python:latest"
    env_cache_gb: float = (
        20.0  # function environments (package layers and images) kept, least recently used evicted
    )
    docker_pids_limit: int = 64
    docker_cpus: float = 1.0
    bubblewrap: str = "auto"  # auto | on | off: namespaces around process sandboxes
    cgroups: str = "auto"  # auto | off: per-sandbox memory cgroup (limits and peak memory)
    stem_cells: int = 2  # unspecialised sandboxes kept started
    pool_cap: int = (
        0  # most specialised sandboxes alive at once (stem cells extra); 0 = workers * 4
    )
    idle_ttl_s: float = 300.0  # idle warm sandboxes are stopped after this
    kill_grace_s: float = 1.0  # SIGTERM, then this long, then SIGKILL
    default_memory_mib: int = 512
    max_memory_mib: int = 10240  # the seed's Python maximum (and Lambda's)
    default_disk_mib: int = (
        1024  # a sandbox's own disk for /tmp, work and output files (disk= per function)
    )
    max_disk_mib: int = 16384
    max_volume_mib: int = 256 << 10  # one volume (nanogrid.Volume): 256 GiB
    owner_volume_mib: int = 512 << 10  # all of one owner's volumes together
    default_timeout_s: float = 300.0
    max_timeout_s: float = 3600.0
    max_package_bytes: int = 64 * MiB
    # one call argument (pickled); over blob_threshold_bytes it travels as a blob
    max_payload_bytes: int = 2048 * MiB
    max_output_bytes: int = 1024 * MiB  # all output files of one call
    capture_limit_bytes: int = 1 * MiB  # stdout / stderr kept per call
    # one call's pickled result (or exception); more fails the call
    max_result_bytes: int = 2048 * MiB
    # arguments and results above this travel as content-addressed blobs
    blob_threshold_bytes: int = 1 * MiB
    direct_uploads: bool = (
        True  # on S3, clients upload blobs to presigned URLs (off: through the controller)
    )
    max_output_files: int = 10_000  # output files of one call
    ai_tokens_per_hour: int = (
        0  # AI node tokens one owner may use per hour, all workers together (0: no limit)
    )
    ai_max_tokens_per_request: int = (
        4096  # an AI answer's tokens at most (num_predict is capped to this)
    )
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
    sqs_visibility_s: int = (
        30  # extended while a job runs; a dead worker's job reappears after this
    )
    heartbeat_s: float = 5.0
    ai_endpoint: str = ""  # AI_ENDPOINT: the private AI node (an Ollama server) functions may call
    ai_model: str = ""  # LLM_MODEL: its default model
    seed_ai: bool = True  # functions uploaded through the seed routes may reach the AI node, as on the seed platform
    cloudwatch_namespace: str = (
        ""  # e.g. NanoGrid: workers publish BacklogPerInstance there for autoscaling
    )
    rate_limit: float = (
        1000.0  # requests per second per API key (0: no limit); a key may set its own
    )
    rate_burst: int = 2000  # requests a key may make at once before the rate applies
    # Webhooks go to public addresses only; an operator may open named internal networks (CIDRs, e.g.
    # ["10.0.5.0/24"], or "10.0.5.0/24,127.0.0.0/8" in NANOGRID_WEBHOOK_ALLOW_NETWORKS). Tenants cannot.
    webhook_allow_networks: list[str] = field(default_factory=list)
    # Multi-tenancy: each owner (a key's name) gets its turn, a share of the slots and a share of the disk.
    owner_max_concurrency: int = (
        0  # calls of one owner running at once; 0: every slot but one once there are 2 owners
    )
    # stored output files per owner (0: no quota); a key may set its own
    owner_disk_quota_bytes: int = 10 * 1024 * MiB
    # output files and blobs are deleted this long after they were stored
    output_retention_s: float = 7 * 86400.0
    gc_interval_s: float = 600.0  # how often the embedded grid looks for expired outputs
    # calls stay in the invocation history this long (0: for ever)
    history_retention_s: float = 30 * 86400.0
    price_lambda_gb_s: float = 0.0000166667  # the AutoTuner's rates (USD): Lambda's GB-second,
    price_ec2_hourly: float = 0.1008  # an EC2 worker's hour ...
    price_ec2_memory_gib: float = 8.0  # ... and its memory

    @property
    def effective_pool_cap(self) -> int:
        return self.pool_cap or self.workers * 4

    @property
    def python_runtime(self) -> str:
        return "python%d.%d" % sys.version_info[:2]

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: object) -> GridConfig:
        """Defaults < config file (``NANOGRID_CONFIG``) < environment variables < overrides (flags).

        Environment variables: ``NANOGRID_<FIELD>`` for every field, and the seed platform's names
        (``SEED_NAMES``: ``SQS_QUEUE_URL``, ``DYNAMODB_TABLE``, ...). A value that cannot be used raises
        ``ConfigError`` naming where it came from.
        """
        names = {f.name for f in fields(cls)}
        values: dict[str, tuple[object, str]] = {}  # setting -> (value, where it came from)
        path = path or os.environ.get("NANOGRID_CONFIG")
        if path:
            for name, value in _read_file(Path(path), names).items():
                values[name] = (value, f"{name} in {path}")
        for name, seed_name in SEED_NAMES.items():
            if os.environ.get(seed_name):
                values[name] = (os.environ[seed_name], seed_name)
        for name in names:
            env = os.environ.get(f"NANOGRID_{name.upper()}")
            if env is not None:
                values[name] = (env, f"NANOGRID_{name.upper()}")
        for name, value in overrides.items():
            if name not in names:
                raise TypeError(f"GridConfig has no setting {name!r}")
            if value is not None:
                values[name] = (value, f"--{name.replace('_', '-')}")
        config = cls()
        for f in fields(cls):
            if f.name in values:
                value, source = values[f.name]
                setattr(config, f.name, _coerce(source, value, getattr(config, f.name)))
        config.data_dir = Path(config.data_dir).expanduser().resolve()
        config.check({name: source for name, (_, source) in values.items()})
        return config

    def check(self, sources: dict[str, str] | None = None) -> None:
        """Refuse values that parse but cannot work, before anything starts; ``sources`` says where each came from."""

        def refuse(name: str, why: str) -> ConfigError:
            return ConfigError(
                f"{(sources or {}).get(name, 'setting ' + name)}: {why}, not {getattr(self, name)!r}"
            )

        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise refuse(name, f"must be one of {', '.join(allowed)}")
        for name, low in MINIMUMS.items():
            if getattr(self, name) < low:
                raise refuse(name, f"must be at least {low:g}")
        if not 0 <= self.port <= 65535:
            raise refuse("port", "must be 0..65535 (0: any free port)")
        if self.open_access and not _loopback(self.host):
            raise refuse(
                "host",
                "--open serves requests without an API key, so it listens on a loopback address "
                "only (127.0.0.1, ::1, localhost)",
            )
        for network in self.webhook_allow_networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise refuse(
                    "webhook_allow_networks", f"{network!r} is not a network (a CIDR: 10.0.5.0/24)"
                ) from None


CHOICES = {
    "sandbox": ("auto", "docker", "process"),
    "bubblewrap": ("auto", "on", "off"),
    "cgroups": ("auto", "off"),
}
MINIMUMS: dict[str, float] = {
    "workers": 1,
    "stem_cells": 0,
    "pool_cap": 0,
    "default_memory_mib": 16,
    "max_memory_mib": 16,
    "default_disk_mib": 16,
    "max_disk_mib": 16,
    "rate_limit": 0,
    "rate_burst": 1,
    "map_chunk_limit": 1,
    "sqs_visibility_s": 1,
    "redis_port": 1,
    "ai_max_tokens_per_request": 1,
}


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _read_file(path: Path, names: set[str]) -> dict[str, object]:
    try:
        with open(path, "rb") as file:
            values = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(
            f"cannot read the config file {path}: {exc.strerror} (--config or NANOGRID_CONFIG)"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"the config file {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown setting {', '.join(map(repr, unknown))} in {path}; "
            f"the settings are the fields of nanogrid_backend/config.py's GridConfig"
        )
    return values


def _coerce(source: str, value: object, default: object) -> object:
    text = str(value).strip()
    try:
        if isinstance(default, Path):
            return Path(text)
        if isinstance(default, list):  # a TOML list, or comma-separated in an env var or flag
            items = value if isinstance(value, list) else text.split(",")
            return [str(item).strip() for item in items if str(item).strip()]
        if isinstance(default, bool):
            if text.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError(value)
            return text.lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        return text
    except ValueError:
        kind = {bool: "true or false", int: "a whole number", float: "a number"}[type(default)]
        raise ConfigError(f"{source}: {value!r} is not {kind}") from None
