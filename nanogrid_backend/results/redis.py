"""Redis: results, cancel requests and worker heartbeats shared by many controllers and workers.

A finished job (already in the registry) is announced on one pub/sub channel; each controller
dispatches announcements to the requests waiting on them. Waiters also check the registry after
subscribing, so a result published before they arrived is not missed. The pub/sub thread reconnects when Redis restarts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from nanogrid_backend.models import JobRecord, job_from_json, job_to_json
from nanogrid_backend.registry.base import JobRegistry
from nanogrid_backend.results.base import (
    LOG_BYTES,
    LOG_TTL_S,
    Listener,
    Listeners,
    LogChunk,
    ResultBus,
)
from nanogrid_backend.token_buckets import RedisTokenBuckets, TokenBuckets

log = logging.getLogger(__name__)

RESULTS = "nanogrid:results"
CANCELS = "nanogrid:cancel"
HEARTBEAT = "nanogrid:worker:"
INLINE_RESULT_BYTES = 64 << 10


class RedisResultBus(ResultBus):
    def __init__(self, host: str, port: int, registry: JobRegistry) -> None:
        self.redis: redis.Redis = redis.Redis(
            host=host,
            port=port,
            socket_timeout=10,
            socket_connect_timeout=5,
            retry_on_timeout=True,
            health_check_interval=15,
        )
        self.registry = registry
        self._listeners = Listeners()
        self._cancel_hooks: list[Callable[[str], object]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="redis-bus", daemon=True)
        self._thread.start()

    def publish(self, job: JobRecord) -> None:
        # Small results ride along with the announcement; big ones are read from the registry.
        announcement = job_to_json(dataclasses.replace(job, payload=b""))
        if len(announcement) > INLINE_RESULT_BYTES:
            announcement = json.dumps({"job_id": job.job_id})

        self._retry(lambda: self.redis.publish(RESULTS, announcement))

    def subscribe(self, job_ids: list[str], listener: Listener) -> Callable[[], None]:
        return self._listeners.add(job_ids, listener)

    # Live output: one Redis stream per running job (capped, expiring), read with XREAD BLOCK.
    def append_log(self, job_id: str, stream: str, data: bytes) -> None:
        key = f"nanogrid:log:{job_id}"
        try:
            pipe = self.redis.pipeline()
            pipe.xadd(
                key,
                {"stream": stream, "data": data},
                maxlen=LOG_BYTES // (64 << 10) * 4,
                approximate=True,
            )
            pipe.expire(key, int(LOG_TTL_S) * 6)
            pipe.execute()
        except redis.RedisError as exc:  # live output is best effort: the job's record has it all
            log.debug("job %s: live output not kept: %s", job_id, exc)

    def end_log(self, job_id: str) -> None:
        key = f"nanogrid:log:{job_id}"
        try:
            pipe = self.redis.pipeline()
            pipe.xadd(key, {"end": b"1"})
            pipe.expire(key, int(LOG_TTL_S))
            pipe.execute()
        except redis.RedisError as exc:
            log.debug("job %s: end of live output not marked: %s", job_id, exc)

    def read_log(self, job_id: str, after: str, wait_s: float) -> tuple[list[LogChunk], str, bool]:
        key = f"nanogrid:log:{job_id}"
        cursor = after or "0-0"
        try:
            found: Any = self.redis.xread(
                {key: cursor}, count=1000, block=max(1, int(wait_s * 1000)) if wait_s else None
            )
        except redis.RedisError:
            return [], after, False
        chunks: list[LogChunk] = []
        ended = False
        for _, entries in found or []:
            for entry_id, fields in entries:
                cursor = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                if b"end" in fields:
                    ended = True
                else:
                    chunks.append((fields[b"stream"].decode(), fields[b"data"]))
        return chunks, cursor, ended

    def request_cancel(self, job_id: str) -> None:
        self._retry(lambda: self.redis.publish(CANCELS, job_id))

    def on_cancel(self, callback: Callable[[str], object]) -> None:
        self._cancel_hooks.append(callback)

    def heartbeat(self, worker_id: str, info: dict, ttl_s: float) -> None:
        self._retry(
            lambda: self.redis.set(HEARTBEAT + worker_id, json.dumps(info), ex=max(1, int(ttl_s)))
        )

    def workers(self) -> list[dict]:
        keys = list(self.redis.scan_iter(HEARTBEAT + "*", count=500))
        values = self.redis.mget(keys) if keys else []
        return [json.loads(v) for v in values if v]

    def token_buckets(self) -> TokenBuckets:
        return RedisTokenBuckets(self.redis)

    def close(self) -> None:
        self._stop.set()

    def _deliver(self, job_id: str, announcement: dict | None = None) -> None:
        listeners = self._listeners.take(job_id)
        if not listeners:
            return
        job: JobRecord | None
        if announcement and "status" in announcement:
            job = job_from_json(json.dumps(announcement))
        else:
            job = self.registry.get_job(job_id)  # the registry holds every result
        if job is None:
            return
        for listener in listeners:
            listener(job)

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(RESULTS, CANCELS)
                # results announced while we were disconnected
                for job_id in self._listeners.waited_on():
                    job = self.registry.get_job(job_id)
                    if job is not None and job.finished:
                        self._deliver(job_id)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    if message["channel"] == RESULTS.encode():
                        announcement = json.loads(message["data"])
                        self._deliver(announcement["job_id"], announcement)
                    else:
                        job_id = message["data"].decode()
                        for hook in self._cancel_hooks:
                            hook(job_id)
            except redis.RedisError as exc:
                log.warning("redis bus: %s; reconnecting", exc)
                time.sleep(0.5)

    def _retry(self, operation: Callable[[], object], attempts: int = 20) -> object:
        """Redis restarts are survivable: retry for up to ~10 s before giving up."""
        for attempt in range(attempts):
            try:
                return operation()
            except redis.ConnectionError:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.5)
        return None
