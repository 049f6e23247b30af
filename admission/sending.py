"""Parking at send time for every sender: ``actor.send(...)`` gets what ``enqueue_*`` gets.

A message sent while its user has a line of parked jobs would only be fetched by a worker to be parked;
``ParkAtSend`` (a broker mixin) parks it behind that line instead of enqueueing it, for every undelayed
``broker.enqueue``: the API's helpers, the reconciler, ``actor.send`` and a retry coming due. Messages
that already hold a slot (handed off by a gate) are enqueued inside ``handing_off()`` and never parked.
A failure to reach admission's backend never fails a send: the message is enqueued and the worker decides.
"""

from __future__ import annotations

import logging
from typing import Any

import dramatiq

from admission.messages import handing_off, is_handing_off
from admission.user_admission import UserAdmission

logger = logging.getLogger(__name__)

__all__ = ["ParkAtSend", "handing_off", "parks_at_send"]


def parks_at_send(admission: UserAdmission, broker: dramatiq.Broker, message: Any) -> bool:
    """Park ``message`` behind its user's line if one exists (True); False: enqueue it as usual."""
    if is_handing_off():
        return False
    try:
        return admission.park_behind_backlog(broker, message)
    except Exception as exc:
        # Not a warning: admission's Redis is the broker's, so the enqueue that follows fails loudly too when
        # it is down; when only this check failed, the worker takes the decision as it always can.
        logger.debug("could not check the user's line at send (%s): enqueued as usual", type(exc).__name__)
        return False


class ParkAtSend(dramatiq.Broker):
    """Broker mixin (put it first: ``class B(ParkAtSend, RedisBroker)``): undelayed enqueues go through admission.

    Set ``admission`` after building the ``UserAdmission`` (None: a plain broker).
    """

    admission: UserAdmission | None = None

    def enqueue(self, message: dramatiq.Message[Any], *, delay: int | None = None) -> dramatiq.Message[Any]:
        """Park the message behind its user's line, or enqueue it (always, with a delay)."""
        if not delay and self.admission is not None and parks_at_send(self.admission, self, message):
            return message
        return super().enqueue(message, delay=delay)
