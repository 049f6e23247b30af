"""Actors module of the admission-outage fault test (``tests/faults/test_admission_outage.py``).

Run as ``dramatiq tests.faults.admission_actors``: a Redis broker on ``ADMISSION_OUTAGE_BROKER_URL`` and the
per-user admission on ``ADMISSION_OUTAGE_LEASES_URL`` (the same server, through a proxy the test switches to
refusing connections), with a limit of 2 running jobs per user. Each job records its start and end, with the
retries its message had spent, in the list ``admission-outage:events`` of the broker's Redis.
"""

from __future__ import annotations

import json
import os
import time

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import AgeLimit, Callbacks, CurrentMessage, Pipelines, Retries, ShutdownNotifications

from admission.keys import job_key
from admission.leases import RedisLeaseStore
from admission.limits import ConcurrencyLimit
from admission.user_admission import UserAdmission
from middleware.attempts import AttemptTokens
from middleware.throttle import UserThrottle

EVENTS_KEY = "admission-outage:events"
#: While this key exists in the broker's Redis, a job that has taken its ``seconds`` keeps running (at most 30 s).
HOLD_KEY = "admission-outage:hold"
NAMESPACE = "admission-outage"
LIMIT = 2

_direct = redis.Redis.from_url(os.environ["ADMISSION_OUTAGE_BROKER_URL"], socket_timeout=5, socket_connect_timeout=5)
_through_proxy = redis.Redis(
    connection_pool=redis.BlockingConnectionPool.from_url(
        os.environ["ADMISSION_OUTAGE_LEASES_URL"],
        max_connections=8,
        timeout=1,
        socket_timeout=1,
        socket_connect_timeout=1,
    )
)

admission = UserAdmission(
    leases=RedisLeaseStore(_through_proxy, namespace=NAMESPACE),
    key_of=job_key,
    lease_ms=10_000,
    sweep_interval_ms=200,
    backend_down_delay_ms=300,
)
broker = RedisBroker(  # type: ignore[no-untyped-call]
    client=_direct,
    middleware=[
        AttemptTokens(),
        UserThrottle(admission),
        AgeLimit(),
        ShutdownNotifications(),
        Callbacks(),
        Pipelines(),
        Retries(max_retries=3, min_backoff=100, max_backoff=200),
        CurrentMessage(),
    ],
)
dramatiq.set_broker(broker)


def _record(event: str, job_id: str, user_id: str) -> None:
    message = CurrentMessage.get_current_message()
    retries = int(message.options.get("retries", 0)) if message is not None else -1
    row = {"event": event, "job_id": job_id, "user_id": user_id, "retries": retries, "pid": os.getpid()}
    _direct.rpush(EVENTS_KEY, json.dumps({**row, "at": time.time()}))


@dramatiq.actor(user_limit=ConcurrencyLimit(LIMIT), max_retries=3)
def limited_job(job_id: str, user_id: str, seconds: float) -> None:
    """Record the start, take ``seconds`` (the job's own duration) and any hold the test puts on, record the end."""
    _record("start", job_id, user_id)
    time.sleep(seconds)
    deadline = time.monotonic() + 30
    while _direct.exists(HOLD_KEY) and time.monotonic() < deadline:
        time.sleep(0.02)
    _record("end", job_id, user_id)
