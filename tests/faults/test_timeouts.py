"""Fault 6: a PostgreSQL that accepts connections and never answers, and a Redis that goes silent.

The web API (``enqueue_*``, ``get_job``, ``cancel_job``) raises ``StoreUnavailable`` within its bound
instead of hanging for the whole partition, and every Redis client gives up within its socket timeout.
The PostgreSQL is reached through a proxy of the test's own; the Redis is a server of the test's own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from dramatiq import Message
from dramatiq.errors import ConnectionClosed

import actors
from actors.queue import JobQueue
from repositories.sql_deadline import StoreUnavailable
from settings import Settings
from tests.conftest import unique
from tests.faults.own_redis import OwnRedis
from tests.faults.proxy import TcpProxy
from tests.queues import queue_on

#: The timeouts these tests configure, in seconds; the bound of one API call is connect + statement + 1.
CONNECT_S = 2.0
STATEMENT_S = 2.0
#: Generous: the point is "ends", not "ends fast"; without the timeouts these calls hang past the test timeout.
BOUND_S = 3 * (CONNECT_S + STATEMENT_S + 1.0)

PARAMS = {"model": "test/model", "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture
def proxy(postgres_database: str) -> Iterator[TcpProxy]:
    """A TCP proxy in front of the session's PostgreSQL, and the API's runtime using it."""
    with TcpProxy("127.0.0.1", 5432) as running:
        settings = Settings(
            database_url=running.rewrite_url(postgres_database),
            database_connect_timeout_s=CONNECT_S,
            database_statement_timeout_s=STATEMENT_S,
            cancel_signals=False,
        )
        with queue_on(settings):
            yield running


def _raises_within_bound(call: Callable[[], Any]) -> StoreUnavailable:
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as raised:
        call()
    elapsed = time.monotonic() - started
    assert elapsed < BOUND_S, f"took {elapsed:.1f}s"
    return raised.value


def test_api_calls_raise_store_unavailable_when_postgres_goes_silent_on_open_connections(proxy: TcpProxy) -> None:
    # Given pooled connections that worked
    assert actors.get_job(unique("warm")) is None
    assert actors.cancel_job(unique("warm"), user_id="u1") is False
    # When the server stops answering
    proxy.set_mode("silent")
    # Then every call ends with a clear error, and nothing is sent for the job that could not be written
    job_id = unique("silent")
    errors = [
        _raises_within_bound(lambda: actors.get_job(job_id, user_id="u1")),
        _raises_within_bound(lambda: actors.cancel_job(job_id, user_id="u1")),
        _raises_within_bound(lambda: actors.enqueue_generation("u1", PARAMS, job_id=job_id)),
    ]
    for error in errors:
        assert str(error).startswith("job store unavailable:")
        assert "SELECT" not in str(error)
        assert "UPDATE" not in str(error)
        assert "hello" not in str(error)
    assert not any(job_id.encode() in body for body in actors.broker.client.hvals("dramatiq:llm_generate.msgs"))


def test_api_calls_raise_store_unavailable_when_postgres_accepts_but_never_answers_new_connections(
    proxy: TcpProxy,
) -> None:
    # Given a server that accepts connections and never answers, from the first one on
    proxy.set_mode("silent")
    # Then
    _raises_within_bound(lambda: actors.get_job(unique("job"), user_id="u1"))
    _raises_within_bound(lambda: actors.enqueue_generation("u1", PARAMS, job_id=unique("job")))


def test_api_calls_raise_store_unavailable_at_once_when_postgres_refuses(proxy: TcpProxy) -> None:
    proxy.set_mode("refuse")
    error = _raises_within_bound(lambda: actors.get_job(unique("job"), user_id="u1"))
    assert "job store unavailable" in str(error)


def test_the_api_works_again_once_postgres_answers(proxy: TcpProxy) -> None:
    # Given a silence that interrupted the pooled connections
    assert actors.get_job(unique("warm")) is None
    proxy.set_mode("silent")
    _raises_within_bound(lambda: actors.get_job(unique("job")))
    # When the server answers again
    proxy.set_mode("pass")
    # Then a fresh connection serves the next call
    assert actors.get_job(unique("job")) is None


def test_every_redis_client_gives_up_within_its_socket_timeout(tmp_path: Any) -> None:
    with OwnRedis() as server, TcpProxy("127.0.0.1", server.port) as proxy:
        # Given the broker, throttle and cancel-signal clients of a process, through the proxy
        settings = Settings(
            redis_url=proxy.rewrite_url(server.url),
            redis_socket_timeout_s=1.0,
            database_url=f"sqlite:///{tmp_path / 'jobs.db'}",
        )
        queue = JobQueue(settings)
        broker = queue.broker
        signals = queue.services().cancel_signals
        assert signals is not None
        clients: list[redis.Redis] = [broker.client, queue.admission.leases._client, signals._client]  # type: ignore[attr-defined]
        for client in clients:
            assert client.ping()
        # When Redis goes silent
        proxy.set_mode("silent")
        # Then each client raises within its bound instead of waiting forever
        for client in clients:
            started = time.monotonic()
            with pytest.raises(redis.RedisError):
                client.ping()
            assert time.monotonic() - started < 5.0
        broker.close()
        queue.close()


def test_a_consumer_reports_a_silent_redis_as_a_lost_connection(tmp_path: Any) -> None:
    with OwnRedis() as server, TcpProxy("127.0.0.1", server.port) as proxy:
        # Given a worker's consumer fetching through the proxy, with a short socket timeout
        broker = JobQueue(Settings(redis_url=proxy.rewrite_url(server.url), redis_socket_timeout_s=1.0)).broker
        broker.declare_queue("llm_generate")
        broker.enqueue(Message(queue_name="llm_generate", actor_name="a", args=(), kwargs={}, options={}))
        consumer = broker.consume("llm_generate", prefetch=1, timeout=20)
        message = next(consumer)
        assert message is not None
        # When Redis goes silent
        proxy.set_mode("silent")
        # Then acks and fetches fail as a lost connection (Dramatiq retries acks and reconnects on those),
        # not as an unexpected error that would leave the message unacked in a live worker
        with pytest.raises(ConnectionClosed):
            consumer.ack(message)
        with pytest.raises(ConnectionClosed):
            next(consumer)
        broker.close()


def test_a_store_down_when_the_queue_first_uses_it_is_unavailable_like_any_other_time(postgres_database: str) -> None:
    with TcpProxy("127.0.0.1", 5432) as proxy:
        # Given a queue that has not opened its store yet (it does on first use), and a server that refuses
        settings = Settings(
            database_url=proxy.rewrite_url(postgres_database),
            database_connect_timeout_s=CONNECT_S,
            database_statement_timeout_s=STATEMENT_S,
            cancel_signals=False,
        )
        queue = JobQueue(settings)
        proxy.set_mode("refuse")
        try:
            # Then the first calls, which build the store, fail with the same clear error
            _raises_within_bound(lambda: queue.enqueue_generation("u1", PARAMS, job_id=unique("job")))
            _raises_within_bound(lambda: queue.get_job(unique("job")))
            # And once the server answers, the same queue works
            proxy.set_mode("pass")
            assert queue.get_job(unique("job")) is None
        finally:
            queue.close()
