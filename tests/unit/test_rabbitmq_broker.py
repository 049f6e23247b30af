"""BROKER_URL: Redis stays the default broker; an amqp:// URL makes it RabbitMQ with publisher confirms."""

from __future__ import annotations

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker

from actors.queue import JobQueue
from admission.sending import ParkAtSend
from brokers.rabbitmq import RabbitmqJobBroker, is_rabbitmq
from brokers.waking_redis import WakingRedisBroker
from middleware.rabbitmq import RabbitmqTuning
from middleware.throttle import UserThrottle
from middleware.worker_tuning import WorkerTuning
from settings import ConfigurationError, Settings, load_settings

RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


def test_without_a_broker_url_the_broker_is_redis() -> None:
    queue = JobQueue(Settings(_env_file=None, broker_url=None))
    broker = queue.broker
    try:
        assert isinstance(broker, WakingRedisBroker)
        assert not is_rabbitmq(broker)
        # actor.send() gets what enqueue_* gets: every undelayed send goes through the queue's admission
        assert isinstance(broker, ParkAtSend)
        assert broker.admission is queue.admission
    finally:
        broker.close()


def test_an_amqp_broker_url_gives_rabbitmq_with_confirms_the_same_throttle_and_no_redis_polling() -> None:
    # Given / When
    redis_url = "redis://127.0.0.1:6390/3"  # never connected to: building a broker opens no connection
    queue = JobQueue(Settings(_env_file=None, broker_url=RABBITMQ_URL, redis_url=redis_url))
    broker = queue.broker
    try:
        # Then
        assert isinstance(broker, RabbitmqJobBroker)
        assert isinstance(broker, ParkAtSend)
        assert broker.admission is queue.admission
        assert broker.confirm_delivery is True
        kinds = [type(middleware) for middleware in broker.middleware]
        assert UserThrottle in kinds
        assert RabbitmqTuning in kinds
        assert WorkerTuning not in kinds  # its idle polling and Redis consumer recovery are Redis-only
        # The throttle, lanes and signals keep their Redis (REDIS_URL's).
        assert broker.client.connection_pool.connection_kwargs["port"] == 6390
        assert broker.client.connection_pool.connection_kwargs["db"] == 3
    finally:
        broker.client.close()


def test_rabbitmq_tuning_sets_one_message_per_thread_and_keeps_dramatiqs_worker_timeout() -> None:
    broker = StubBroker()
    worker = dramatiq.Worker(broker, worker_threads=4)
    default_timeout = worker.worker_timeout
    RabbitmqTuning(prefetch_per_thread=1).before_worker_boot(broker, worker)
    assert worker.queue_prefetch == 4
    assert worker.worker_timeout == default_timeout


def test_a_broker_url_that_is_not_amqp_is_refused_naming_the_variable_not_its_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BROKER_URL", "redis://admin:hunter2@broker.internal:6379/0")
    with pytest.raises(ConfigurationError) as refused:
        load_settings()
    assert "BROKER_URL" in str(refused.value)
    assert "hunter2" not in str(refused.value)


def test_the_broker_url_is_a_secret_never_shown_in_the_settings() -> None:
    settings = Settings(_env_file=None, broker_url="amqp://app:hunter2@rabbit:5672/jobs")
    assert "hunter2" not in repr(settings)
    assert settings.broker_url is not None
    assert settings.broker_url.get_secret_value().endswith("/jobs")
