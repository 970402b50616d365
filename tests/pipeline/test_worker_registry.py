"""The worker registry on a real Redis: a registration is there while renewed and gone at stop,
prefixes stay apart (pattern characters in them included), and Redis going away raises nothing.
A real worker's own registration is checked in tests/jobs/test_warm_restart.py."""

from __future__ import annotations

import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from pipeline import worker_registry
from pipeline.worker_registry import Registration, expected_answers, registered_workers

from support.processes import key_prefix

pytestmark = pytest.mark.redis


@pytest.fixture
def prefix(redis_client):
    name = key_prefix("registry")
    yield name
    for key in redis_client.scan_iter(match=f"{name}*"):
        redis_client.delete(key)


def test_a_registration_lives_while_renewed_and_goes_at_stop(redis_client, prefix, monkeypatch) -> None:
    monkeypatch.setattr(worker_registry, "RENEW_S", 0.05)
    assert registered_workers(redis_client, prefix) == [] and expected_answers(redis_client, prefix) is None
    first, second = Registration(redis_client, prefix, "w1@host"), Registration(redis_client, prefix, "w2@host")
    first.start()
    second.start()
    try:
        assert registered_workers(redis_client, prefix) == ["w1@host", "w2@host"]
        assert expected_answers(redis_client, prefix) == 2
        key = f"{prefix}worker:w1@host"
        assert 0 < redis_client.ttl(key) <= worker_registry.EXPIRY_S
        redis_client.expire(key, 2)
        deadline = time.monotonic() + 10
        while redis_client.ttl(key) <= 2 and time.monotonic() < deadline:  # the thread renews it
            time.sleep(0.02)
        assert redis_client.ttl(key) > 2
    finally:
        first.stop()
    assert registered_workers(redis_client, prefix) == ["w2@host"]
    second.stop()
    assert registered_workers(redis_client, prefix) == []


def test_a_worker_stopped_before_it_started_stops_cleanly(redis_client, prefix) -> None:
    other = Registration(redis_client, prefix, "running@host")
    other.start()
    try:
        Registration(redis_client, prefix, "starting@host").stop()  # shut down before worker_ready
        assert registered_workers(redis_client, prefix) == ["running@host"]
    finally:
        other.stop()


def test_prefixes_stay_apart_even_with_pattern_characters(redis_client, prefix) -> None:
    odd = f"{prefix}[a]*?\\:"
    ours, theirs = Registration(redis_client, prefix, "ours@host"), Registration(redis_client, odd, "theirs@host")
    ours.start()
    theirs.start()
    try:
        assert registered_workers(redis_client, prefix) == ["ours@host"]
        assert registered_workers(redis_client, odd) == ["theirs@host"]
    finally:
        ours.stop()
        theirs.stop()


def test_without_redis_nothing_raises(prefix, caplog) -> None:
    # Nothing listens on port 1; no retries (redis-py's default backs off for seconds per call).
    away = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1, socket_timeout=1, retry=Retry(NoBackoff(), 0))
    registration = Registration(away, prefix, "lonely@host")
    registration.start()
    registration.stop()
    assert expected_answers(away, prefix) is None  # callers wait out their timeout, as without a registry
    assert "worker registration" in caplog.text and "not written" in caplog.text and "not deleted" in caplog.text
