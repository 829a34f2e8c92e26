"""API keys: made once, shown once, stored only as a SHA-256 hash, and looked up per request."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
import time
from pathlib import Path

from backend.models import ApiKey
from backend.registry.base import Registry

PREFIX = "ng_"
LOCAL_KEY_FILE = "local-key"  # the embedded grid's own key, readable only by its user
CACHE_TTL_S = 5.0  # a revoked key stops working within this long on every controller


class AuthError(Exception):
    """Why a request's key was refused (HTTP 401)."""


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(registry: Registry, name: str, *, rate_limit: float | None = None,
               rate_burst: int | None = None) -> tuple[str, ApiKey]:
    """A new key for ``name``; returns the key (show it once, it is not stored) and its record."""
    if not name or len(name) > 64 or not all(c.isalnum() or c in "_.-" for c in name):
        raise ValueError(f"key name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
    key_id = secrets.token_hex(4)
    key = f"{PREFIX}{key_id}_{secrets.token_urlsafe(24)}"
    record = ApiKey(key_id=key_id, name=name, key_hash=_hash(key), rate_limit=rate_limit, rate_burst=rate_burst)
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
        if record is not None and record.revoked_at is None and hmac.compare_digest(record.key_hash, _hash(key)):
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
            raise AuthError("missing API key: send it as the x-api-key header or as Authorization: Bearer KEY "
                            "(`nanogrid keys create NAME` makes one)")
        digest = _hash(presented)
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(digest)
        if cached is not None and now - cached[1] < CACHE_TTL_S:
            record = cached[0]
        else:
            key_id = presented.removeprefix(PREFIX).split("_")[0] if presented.startswith(PREFIX) else ""
            record = self.registry.get_key(key_id) if key_id else None
            if record is None or not hmac.compare_digest(record.key_hash, digest):
                raise AuthError("wrong API key: it does not match any key of this grid")
            with self._lock:
                self._cache[digest] = (record, now)
        if record.revoked_at is not None:
            raise AuthError(f"API key {PREFIX}{record.key_id}… was revoked")
        return record
