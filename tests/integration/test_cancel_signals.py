"""The Redis pub/sub cancel signal reaches a watch registered in another client, and only that one."""

from __future__ import annotations

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from actors.cancellation import CancelSignals, CancelWatch
from tests.conftest import TEST_REDIS_URL, unique
from tests.integration.conftest import wait_until


def test_a_published_cancel_sets_the_watch_of_that_job_only() -> None:
    listener = CancelSignals(redis.Redis.from_url(TEST_REDIS_URL), channel=unique("chan"))
    publisher = CancelSignals(redis.Redis.from_url(TEST_REDIS_URL), channel=listener._channel)
    try:
        watched = CancelWatch("job-a")
        listener.watch(watched)
        other = CancelWatch("job-b")
        listener.watch(other)
        assert listener.wait_until_listening()
        publisher.publish("job-a")
        wait_until(watched.is_set, timeout=5, what="the signal")
        assert not other.is_set()
    finally:
        listener.close()


def test_an_unwatched_job_ignores_its_signal() -> None:
    listener = CancelSignals(redis.Redis.from_url(TEST_REDIS_URL), channel=unique("chan"))
    try:
        watch = CancelWatch("job-a")
        listener.watch(watch)
        listener.unwatch(watch)
        sentinel = CancelWatch("job-z")
        listener.watch(sentinel)
        assert listener.wait_until_listening()
        listener.publish("job-a")
        listener.publish("job-z")
        wait_until(sentinel.is_set, timeout=5, what="the sentinel signal")
        assert not watch.is_set()
    finally:
        listener.close()


def test_publishing_to_an_unreachable_redis_does_not_raise() -> None:
    client = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    signals = CancelSignals(client)
    signals.publish("job-a")
