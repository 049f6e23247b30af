"""RabbitMQ for the integration tests: a virtual host of the test run's own, and the test process's broker
swapped for a RabbitMQ one (then put back).

``actors.broker`` is built when ``actors`` is imported (the Redis broker of ``REDIS_URL``), and every actor
holds a reference to it. ``rabbitmq_broker_in_tests`` builds the RabbitMQ broker the worker uses, re-declares
every actor on it, makes it Dramatiq's global broker and ``actors.broker``, and restores all three afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import dramatiq

import actors
from actors.wiring import build_broker
from middleware.rabbitmq import RabbitmqJobBroker
from settings import Settings
from tests.integration.message_ledger import MessageLedger
from tests.services import port_open

logger = logging.getLogger(__name__)

TEST_RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672")
TEST_RABBITMQ_USER = os.environ.get("TEST_RABBITMQ_USER", "guest")


def _rabbitmqctl(*args: str) -> bool:
    command = shutil.which("rabbitmqctl")
    if command is None:
        return False
    done = subprocess.run([command, "-q", *args], capture_output=True, timeout=60, check=False)
    return done.returncode == 0


@contextlib.contextmanager
def own_vhost() -> Iterator[str]:
    """The URL of a fresh RabbitMQ virtual host, deleted afterwards; the default one (``/``, to be purged)
    where ``rabbitmqctl`` cannot add one."""
    host_port = TEST_RABBITMQ_URL.rsplit("@", 1)[-1].split("/", 1)[0]
    host, _, port = host_port.partition(":")
    if not port_open(host, int(port or 5672)):
        raise RuntimeError(f"RabbitMQ does not answer at {host_port} (.ci/run starts it)")
    name = f"llmq-test-{uuid.uuid4().hex[:10]}"
    if _rabbitmqctl("add_vhost", name) and _rabbitmqctl(
        "set_permissions", "-p", name, TEST_RABBITMQ_USER, ".*", ".*", ".*"
    ):
        try:
            yield f"{TEST_RABBITMQ_URL.rstrip('/')}/{quote(name, safe='')}"
        finally:
            _rabbitmqctl("delete_vhost", name)
        return
    logger.warning("rabbitmqctl could not add a virtual host: the tests use the default one")
    yield f"{TEST_RABBITMQ_URL.rstrip('/')}/%2F"


def point_actors_at(broker: dramatiq.Broker) -> dramatiq.Broker:
    """Re-declare every actor on ``broker`` and make it the global and ``actors.broker``; returns the old one."""
    old = actors.broker
    for name in sorted(old.get_declared_actors()):
        actor = old.get_actor(name)
        actor.broker = broker
        if name not in broker.get_declared_actors():
            broker.declare_actor(actor)
    dramatiq.set_broker(broker)
    actors.broker = broker  # type: ignore[assignment]
    return old


@contextlib.contextmanager
def rabbitmq_broker_in_tests(settings: Settings) -> Iterator[RabbitmqJobBroker]:
    """Make the RabbitMQ broker of ``settings`` (which has ``broker_url``) the test process's, then restore."""
    new = build_broker(settings)
    if not isinstance(new, RabbitmqJobBroker):
        raise ValueError("settings.broker_url must be an amqp:// URL")
    new.add_middleware(MessageLedger(new.client))
    old = point_actors_at(new)
    try:
        yield new
    finally:
        point_actors_at(old)
        with contextlib.suppress(Exception):
            new.flush_all()
        new.close()
        new.client.close()
