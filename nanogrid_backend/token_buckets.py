"""Token buckets per API key: the interface, the in-process buckets and the Redis ones every controller shares."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import redis


class TokenBuckets(Protocol):
    """One bucket per key: ``rate`` tokens a second, at most ``burst`` saved up; each request takes one."""

    # True: the buckets are this process's memory (a take costs microseconds and never blocks on the network).
    in_process: bool

    def take(self, key_id: str, rate: float, burst: int) -> float:
        """Take one token; returns 0 if allowed, else the seconds until one is available."""
        ...

    def take_counted(self, key_id: str, rate: float, burst: int) -> tuple[float, float]:
        """``take``, and the tokens left after it (the seed contract's X-RateLimit-Remaining)."""
        ...


class LocalTokenBuckets:
    """The buckets in this process (the embedded grid and a single controller)."""

    in_process = True

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, when last filled)
        self._lock = threading.Lock()

    def take(self, key_id: str, rate: float, burst: int) -> float:
        return self.take_counted(key_id, rate, burst)[0]

    def take_counted(self, key_id: str, rate: float, burst: int) -> tuple[float, float]:
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


class RedisTokenBuckets:
    """The same token bucket as the in-process one, kept in Redis so every controller shares it."""

    in_process = False

    SCRIPT = """
    local tokens = tonumber(redis.call('HGET', KEYS[1], 't') or ARGV[2])
    local last = tonumber(redis.call('HGET', KEYS[1], 'l') or ARGV[3])
    local rate, burst, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
    tokens = math.min(burst, tokens + math.max(0, now - last) * rate)
    local wait = 0
    if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
    redis.call('HSET', KEYS[1], 't', tostring(tokens), 'l', tostring(now))
    redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 60)
    return {tostring(wait), tostring(tokens)}
    """

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._take = client.register_script(self.SCRIPT)

    def take(self, key_id: str, rate: float, burst: int) -> float:
        return self.take_counted(key_id, rate, burst)[0]

    def take_counted(self, key_id: str, rate: float, burst: int) -> tuple[float, float]:
        if rate <= 0:
            return 0.0, float(burst)
        wait, tokens = self._take(
            keys=[f"nanogrid:bucket:{key_id}"], args=[rate, burst, time.time()]
        )
        return float(wait), float(tokens)
