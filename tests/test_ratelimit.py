"""The per-key token bucket, in process and in Redis (shared by controllers), on a clock the test moves.

What must never happen: a key allowed more than its burst at once, a refused request told to come
back before a token exists (or never), idle time saved up beyond the burst, one key's traffic
spending another's tokens, or the two implementations disagreeing on any of it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

import nanogrid_backend.token_buckets
from nanogrid_backend.controller.ratelimit import retry_after_header
from nanogrid_backend.token_buckets import LocalTokenBuckets, RedisTokenBuckets
from tests.aws_cluster import Redis, free_port
from tests.conftest import require


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    require(shutil.which("redis-server") is not None, "redis-server is not installed")
    server = Redis(free_port(), Path(tmp_path_factory.mktemp("redis")))
    server.start()
    client = redis.Redis(port=server.port)
    yield client
    client.close()
    server.stop()


@pytest.fixture(params=["in-process", pytest.param("redis", marks=pytest.mark.integration)])
def buckets(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> tuple[object, Clock]:
    clock = Clock()
    if request.param == "in-process":
        monkeypatch.setattr(nanogrid_backend.token_buckets.time, "monotonic", clock)
        return LocalTokenBuckets(), clock
    client = request.getfixturevalue("redis_server")
    client.flushall()
    monkeypatch.setattr(nanogrid_backend.token_buckets.time, "time", clock)
    return RedisTokenBuckets(client), clock


def test_a_burst_is_allowed_at_once_and_not_one_more(buckets):
    limiter, _ = buckets
    assert [limiter.take("k", 10.0, 5) for _ in range(5)] == [0.0] * 5
    wait = limiter.take("k", 10.0, 5)
    assert wait == pytest.approx(0.1)  # one token at 10/s


def test_a_refused_request_is_told_exactly_when_a_token_exists(buckets):
    limiter, clock = buckets
    for _ in range(2):
        limiter.take("k", 4.0, 2)
    wait = limiter.take("k", 4.0, 2)
    assert wait > 0
    clock.now += wait * 0.9
    assert limiter.take("k", 4.0, 2) > 0  # not yet
    clock.now += wait * 0.2
    assert limiter.take("k", 4.0, 2) == 0.0  # now it is there


def test_tokens_refill_at_the_rate_but_never_beyond_the_burst(buckets):
    limiter, clock = buckets
    for _ in range(3):
        limiter.take("k", 1.0, 3)
    clock.now += 3600  # an hour idle saves up 3 tokens, not 3600
    assert [limiter.take("k", 1.0, 3) for _ in range(4)][:3] == [0.0] * 3
    assert limiter.take("k", 1.0, 3) > 0


def test_keys_do_not_share_tokens(buckets):
    limiter, _ = buckets
    assert limiter.take("alice", 1.0, 1) == 0.0
    assert limiter.take("alice", 1.0, 1) > 0
    assert limiter.take("bob", 1.0, 1) == 0.0


def test_a_rate_of_zero_means_no_limit(buckets):
    limiter, _ = buckets
    assert all(limiter.take("k", 0.0, 1) == 0.0 for _ in range(1000))


def test_retry_after_rounds_up_to_whole_seconds_and_never_says_zero():
    assert retry_after_header(0.01) == "1"
    assert retry_after_header(1.0) == "1"
    assert retry_after_header(1.2) == "2"
