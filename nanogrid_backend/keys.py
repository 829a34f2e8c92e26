"""API keys: made once, shown once, stored only as a SHA-256 hash, and looked up per request."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
import time
from pathlib import Path

from nanogrid_backend.config import GridConfig
from nanogrid_backend.models import ApiKey
from nanogrid_backend.registry.base import Registry

PREFIX = "ng_"
LOCAL_KEY_FILE = "local-key"  # the embedded grid's own key, readable only by its user
CACHE_TTL_S = 5.0  # a revoked key stops working within this long on every controller


class AuthError(Exception):
    """Why a request's key was refused (HTTP 401)."""


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(
    registry: Registry,
    name: str,
    *,
    rate_limit: float | None = None,
    rate_burst: int | None = None,
    admin: bool = False,
    max_timeout_s: float | None = None,
    max_concurrency: int | None = None,
    disk_quota_bytes: int | None = None,
) -> tuple[str, ApiKey]:
    """A new key for ``name``; returns the key (show it once, it is not stored) and its record.

    The limits are this key's own (None: the grid's setting); ``admin`` lets it see every owner's jobs and workers.
    """
    if not name or len(name) > 64 or not all(c.isalnum() or c in "_.-" for c in name):
        raise ValueError(f"key name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
    if max_timeout_s is not None and not max_timeout_s > 0:
        raise ValueError(f"max timeout must be more than 0 s, not {max_timeout_s:g}")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max concurrency must be at least 1, not {max_concurrency}")
    if disk_quota_bytes is not None and disk_quota_bytes < 0:
        raise ValueError(f"disk quota must be 0 bytes or more, not {disk_quota_bytes}")
    key_id = secrets.token_hex(4)
    key = f"{PREFIX}{key_id}_{secrets.token_urlsafe(24)}"
    record = ApiKey(
        key_id=key_id,
        name=name,
        key_hash=_hash(key),
        rate_limit=rate_limit,
        rate_burst=rate_burst,
        admin=admin,
        max_timeout_s=max_timeout_s,
        max_concurrency=max_concurrency,
        disk_quota_bytes=disk_quota_bytes,
    )
    registry.put_key(record)
    return key, record


def revoke_key(registry: Registry, key_id: str) -> ApiKey:
    record = registry.get_key(key_id.removeprefix(PREFIX).split("_")[0])
    if record is None:
        raise KeyError(f"no key {key_id!r}")
    record.revoked_at = record.revoked_at or time.time()
    registry.put_key(record)
    return record


def ensure_local_key(registry: Registry, data_dir: Path) -> str:
    """The embedded grid's key for clients on this machine, made on first start (file mode 0600)."""
    path = data_dir / LOCAL_KEY_FILE
    if path.exists():
        key = path.read_text().strip()
        record = registry.get_key(key.removeprefix(PREFIX).split("_")[0])
        if (
            record is not None
            and record.revoked_at is None
            and hmac.compare_digest(record.key_hash, _hash(key))
        ):
            return key
    key, _ = create_key(registry, "local")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


class Authenticator:
    """Checks presented keys against the registry, with a short cache so a request costs a dict lookup."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._cache: dict[str, tuple[ApiKey, float]] = {}
        self._lock = threading.Lock()

    def check(self, presented: str | None) -> ApiKey:
        if not presented:
            raise AuthError(
                "missing API key: send it as the x-api-key header or as Authorization: Bearer KEY "
                "(`nanogrid keys create NAME` makes one)"
            )
        digest = _hash(presented)
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(digest)
        if cached is not None and now - cached[1] < CACHE_TTL_S:
            record = cached[0]
        else:
            key_id = (
                presented.removeprefix(PREFIX).split("_")[0] if presented.startswith(PREFIX) else ""
            )
            found = self.registry.get_key(key_id) if key_id else None
            if found is None or not hmac.compare_digest(found.key_hash, digest):
                raise AuthError("wrong API key: it does not match any key of this grid")
            record = found
            with self._lock:
                self._cache[digest] = (record, now)
        if record.revoked_at is not None:
            raise AuthError(f"API key {PREFIX}{record.key_id}… was revoked")
        return record


class OwnerPolicy:
    """Each owner's limits: what its keys set, else the grid's settings. Read from the registry, cached briefly.

    Limits are set per key but bound the owner (the key's name): where an owner's active keys differ, the
    strictest applies, so a second key never widens what the first one was given.
    """

    def __init__(self, registry: Registry, config: GridConfig) -> None:
        self.registry = registry
        self.config = config
        self._keys: list[ApiKey] = []
        self._read_at = -CACHE_TTL_S
        self._lock = threading.Lock()

    def _active_keys(self) -> list[ApiKey]:
        now = time.monotonic()
        with self._lock:
            if now - self._read_at >= CACHE_TTL_S:
                self._keys = [k for k in self.registry.list_keys() if k.revoked_at is None]
                self._read_at = now
            return self._keys

    def _strictest(self, owner: str, name: str) -> float | None:
        values = [
            getattr(k, name)
            for k in self._active_keys()
            if k.name == owner and getattr(k, name) is not None
        ]
        return min(values) if values else None

    def max_concurrency(self, owner: str, slots: int) -> int | None:
        """How many of the owner's calls may run at once on ``slots`` slots; None: no cap.

        The default (``owner_max_concurrency = 0``) leaves one slot free for other owners once the grid has more
        than one owner, so a lone user keeps every slot and a second owner always finds one."""
        own = self._strictest(owner, "max_concurrency")
        if own is not None:
            return max(1, int(own))
        if self.config.owner_max_concurrency > 0:
            return self.config.owner_max_concurrency
        owners = {k.name for k in self._active_keys()} | {owner}
        return max(1, slots - 1) if len(owners) > 1 else None

    def disk_quota(self, owner: str) -> int | None:
        """Bytes of output files the owner may keep stored; None: no quota."""
        own = self._strictest(owner, "disk_quota_bytes")
        if own is not None:
            return int(own)  # a key's quota is a limit, 0 included (no output files kept)
        return self.config.owner_disk_quota_bytes or None  # the grid's 0: no quota

    def max_timeout(self, owner: str) -> float:
        own = self._strictest(owner, "max_timeout_s")
        return (
            min(float(own), self.config.max_timeout_s)
            if own is not None
            else self.config.max_timeout_s
        )
