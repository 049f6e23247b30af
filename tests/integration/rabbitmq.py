"""RabbitMQ for the integration tests: a virtual host of the test run's own, and a ``JobQueue`` on it.

``rabbitmq_queue_in_tests`` builds the queue the worker uses (``BROKER_URL`` set), with the message ledger
on its broker, binds the actors to it for the block, and binds the queue before again afterwards.
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

from actors.queue import JobQueue
from brokers.rabbitmq import RabbitmqJobBroker
from settings import Settings
from tests.integration.message_ledger import MessageLedger
from tests.services import port_open

logger = logging.getLogger(__name__)

TEST_RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672")
TEST_RABBITMQ_USER = os.environ.get("TEST_RABBITMQ_USER", "guest")


def rabbitmqctl(*args: str) -> bool:
    """Run ``rabbitmqctl -q args``: True when it succeeded (False too when it is not installed)."""
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
    if rabbitmqctl("add_vhost", name) and rabbitmqctl(
        "set_permissions", "-p", name, TEST_RABBITMQ_USER, ".*", ".*", ".*"
    ):
        try:
            yield f"{TEST_RABBITMQ_URL.rstrip('/')}/{quote(name, safe='')}"
        finally:
            rabbitmqctl("delete_vhost", name)
        return
    logger.warning("rabbitmqctl could not add a virtual host: the tests use the default one")
    yield f"{TEST_RABBITMQ_URL.rstrip('/')}/%2F"


@contextlib.contextmanager
def rabbitmq_queue_in_tests(settings: Settings) -> Iterator[JobQueue]:
    """A queue on the RabbitMQ broker of ``settings`` (which has ``broker_url``), bound for the block."""
    queue = JobQueue(settings)
    broker = queue.broker
    if not isinstance(broker, RabbitmqJobBroker):
        raise ValueError("settings.broker_url must be an amqp:// URL")
    broker.add_middleware(MessageLedger(broker.client))
    try:
        with queue.bound():
            yield queue
    finally:
        with contextlib.suppress(Exception):
            broker.flush_all()
        broker.close()
        broker.client.close()
        queue.close()
