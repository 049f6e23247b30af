"""The worker's live text writer against real Redis: coalescing, order, attempts, expiry, and a lost Redis."""

from __future__ import annotations

import itertools
import logging
import threading
import uuid
from typing import Any

import pytest
import redis

from repositories.live_text import LiveEntry, RedisLiveText, stream_key
from tests.conftest import TEST_REDIS_URL
from tests.harness import wait_until


def _entries(client: redis.Redis, job_id: str) -> list[LiveEntry]:
    items: list[tuple[Any, dict[Any, Any]]] = client.xrange(stream_key(job_id))  # type: ignore[assignment]
    parsed = (LiveEntry.parse(fields) for _, fields in items)
    return [entry for entry in parsed if entry is not None]


def test_text_is_coalesced_in_order_and_ends_with_the_attempt() -> None:
    client = redis.Redis.from_url(TEST_REDIS_URL)
    live = RedisLiveText(client, interval_s=0.2, ended_ttl_s=30)
    job_id = uuid.uuid4().hex
    with live.attempt(job_id, 1):
        for i in range(200):
            live.append(job_id, 1, f"{i},")
    assert live.flush()
    entries = _entries(client, job_id)
    assert entries[0] == LiveEntry("reset", 1)
    assert entries[-1] == LiveEntry("end", 1)
    texts = [e for e in entries if e.kind == "text"]
    assert "".join(e.text for e in texts) == "".join(f"{i}," for i in range(200))
    assert len(texts) <= 3  # 200 appends within one interval: coalesced
    assert all(b.offset == a.offset + len(a.text) for a, b in itertools.pairwise(texts))
    assert 0 < client.ttl(stream_key(job_id)) <= 30


def test_text_written_while_the_attempt_runs_arrives_before_its_end() -> None:
    client = redis.Redis.from_url(TEST_REDIS_URL)
    live = RedisLiveText(client, interval_s=0.05)
    job_id = uuid.uuid4().hex
    finish = threading.Event()

    def run() -> None:
        with live.attempt(job_id, 1):
            live.append(job_id, 1, "early")
            finish.wait(5)

    thread = threading.Thread(target=run)
    thread.start()
    wait_until(lambda: any(e.kind == "text" for e in _entries(client, job_id)), timeout=2, what="the text")
    finish.set()
    thread.join()


def test_a_new_attempt_replaces_the_entries_of_the_last() -> None:
    client = redis.Redis.from_url(TEST_REDIS_URL)
    live = RedisLiveText(client)
    job_id = uuid.uuid4().hex
    with live.attempt(job_id, 1):
        live.append(job_id, 1, "first")
    with live.attempt(job_id, 2):
        live.append(job_id, 2, "second")
        live.append(job_id, 1, "a late piece of the old attempt is ignored")
    assert live.flush()
    assert _entries(client, job_id) == [LiveEntry("reset", 2), LiveEntry("text", 2, 0, "second"), LiveEntry("end", 2)]


def test_an_unreachable_redis_never_fails_the_attempt() -> None:
    client = redis.Redis.from_url("redis://127.0.0.1:9/0", socket_connect_timeout=0.2)
    live = RedisLiveText(client)
    with live.attempt("job", 1):
        live.append("job", 1, "text")
    assert live.flush()


class _ThreadNotingRedis(redis.Redis):
    """A Redis client that notes which thread opened each pipeline."""

    pipeline_threads: list[str]

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        self.pipeline_threads.append(threading.current_thread().name)
        return super().pipeline(*args, **kwargs)


def test_every_entry_is_written_by_the_writer_thread_text_at_once_after_a_quiet_spell_never_by_the_caller() -> None:
    client = _ThreadNotingRedis(connection_pool=redis.ConnectionPool.from_url(TEST_REDIS_URL))
    client.pipeline_threads = []
    live = RedisLiveText(client, interval_s=0.05)
    job_id = uuid.uuid4().hex
    with live.attempt(job_id, 1):
        live.append(job_id, 1, "now")
        wait_until(lambda: _entries(client, job_id)[-1:] == [LiveEntry("text", 1, 0, "now")], timeout=2)
        live.append(job_id, 1, " later")  # within the interval: coalesced, written when it is due
        wait_until(lambda: _entries(client, job_id)[-1:] == [LiveEntry("text", 1, 3, " later")], timeout=2)
    assert live.flush()
    assert _entries(client, job_id)[0] == LiveEntry("reset", 1)
    assert _entries(client, job_id)[-1] == LiveEntry("end", 1)
    # The caller (a worker thread, the worker's stream loop) never waited on Redis, not even for the start and end
    assert set(client.pipeline_threads) == {"live-text-writer"}
    client.close()
    client.connection_pool.disconnect()


def test_many_short_attempts_are_written_in_a_few_round_trips() -> None:
    # Given a writer whose Redis client counts pipelines
    client = _ThreadNotingRedis(connection_pool=redis.ConnectionPool.from_url(TEST_REDIS_URL))
    client.pipeline_threads = []
    live = RedisLiveText(client)
    jobs = [uuid.uuid4().hex for _ in range(200)]
    # When 200 attempts start, stream a piece each and end, back to back
    for job_id in jobs:
        with live.attempt(job_id, 1):
            live.append(job_id, 1, "piece")
    assert live.flush()
    # Then every stream is complete and in order, written in far fewer pipelines than the 400 starts and ends
    for job_id in jobs:
        assert _entries(client, job_id) == [
            LiveEntry("reset", 1),
            LiveEntry("text", 1, 0, "piece"),
            LiveEntry("end", 1),
        ]
    assert len(client.pipeline_threads) < 100
    client.close()
    client.connection_pool.disconnect()


def test_a_status_change_is_one_status_entry_after_the_attempts_end_and_no_second_end() -> None:
    client = redis.Redis.from_url(TEST_REDIS_URL)
    live = RedisLiveText(client, ended_ttl_s=30)
    ran, never_ran = uuid.uuid4().hex, uuid.uuid4().hex
    with live.attempt(ran, 1):
        live.append(ran, 1, "text")
    # When a cancel tells the readers of a job that ran, and of one that never started
    live.status_changed(ran)
    live.status_changed(never_ran)
    assert live.flush()
    # Then each stream gets one status entry, no attempt of it ends twice, and it expires
    assert _entries(client, ran) == [
        LiveEntry("reset", 1),
        LiveEntry("text", 1, 0, "text"),
        LiveEntry("end", 1),
        LiveEntry("status", 0),
    ]
    assert _entries(client, never_ran) == [LiveEntry("status", 0)]
    assert 0 < client.ttl(stream_key(never_ran)) <= 30


def test_a_status_change_never_raises_when_redis_is_unreachable(caplog: pytest.LogCaptureFixture) -> None:
    client = redis.Redis.from_url("redis://127.0.0.1:9/0", socket_connect_timeout=0.2)
    live = RedisLiveText(client)
    with caplog.at_level(logging.WARNING, logger="repositories.live_text"):
        live.status_changed("job-a")
        assert live.flush()
        live.status_changed("job-b")
        assert live.flush()
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert getattr(warnings[0], "job_id", None) == "job-a"
