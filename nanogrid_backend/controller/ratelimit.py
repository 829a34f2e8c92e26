"""A token bucket per API key, in process (the embedded grid and a single controller)."""

from __future__ import annotations

import math
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nanogrid_backend.config import GridConfig
    from nanogrid_backend.models import ApiKey


class TokenBuckets:
    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, when last filled)
        self._lock = threading.Lock()

    def take(self, key_id: str, rate: float, burst: int) -> float:
        """Take one token; returns 0 if allowed, else the seconds until one is available."""
        return self.take_counted(key_id, rate, burst)[0]

    def take_counted(self, key_id: str, rate: float, burst: int) -> tuple[float, float]:
        """``take``, and the tokens left after it (the seed contract's X-RateLimit-Remaining)."""
        if rate <= 0:
            return 0.0, float(burst)
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key_id, (float(burst), now))
            tokens = min(float(burst), tokens + (now - last) * rate)
            if tokens >= 1.0:
                self._buckets[key_id] = (tokens - 1.0, now)
                return 0.0, tokens - 1.0
            self._buckets[key_id] = (tokens, now)
        return (1.0 - tokens) / rate, tokens


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


def key_limits(key: ApiKey, config: GridConfig) -> tuple[float, int]:
    """A key's rate (requests per second) and burst: its own where it has them, else the grid's."""
    return (config.rate_limit if key.rate_limit is None else key.rate_limit), (key.rate_burst or config.rate_burst)
