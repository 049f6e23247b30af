"""Actors module of the worker under test on RabbitMQ: the real actors, plus the ``MessageLedger``.

Run as ``dramatiq tests.integration.ledger_actors``.
"""

from __future__ import annotations

import actors
from tests.integration.message_ledger import MessageLedger

actors.broker.add_middleware(MessageLedger(actors.broker.client))
