"""Admission fails closed: with its Redis refusing connections no job runs over its user's limit and no retry
is spent, and every job completes once Redis answers again.

Two real ``dramatiq`` worker processes on a Redis server of the test's own; admission reaches that server
through a proxy the test switches to refusing connections (the broker does not: jobs keep being delivered),
once before any job started and once while two of the user's jobs run (their releases fail and are kept).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dramatiq import Message
from dramatiq.brokers.redis import RedisBroker

from tests.faults.own_redis import OwnRedis
from tests.faults.proxy import TcpProxy
from tests.harness import PROJECT_ROOT, WorkerProcess, wait_until

#: As in ``tests/faults/admission_actors.py`` (not imported here: importing it builds the worker's broker).
EVENTS_KEY = "admission-outage:events"
HOLD_KEY = "admission-outage:hold"
LIMIT = 2
OUTAGE = "throttle backend unreachable"
BUSY, OTHER = "u-busy", "u-other"


class Outage:
    """The test's Redis, the proxy admission goes through, a sending broker, and the worker processes."""

    def __init__(self, tmp_path: Path) -> None:
        self.redis = OwnRedis().start()
        self.proxy = TcpProxy("127.0.0.1", self.redis.port).start()
        self.client = self.redis.client()
        self.sender = RedisBroker(client=self.client, middleware=[])  # type: ignore[no-untyped-call]
        self.sender.declare_queue("default")
        env = {
            **os.environ,
            "ADMISSION_OUTAGE_BROKER_URL": self.redis.url,
            "ADMISSION_OUTAGE_LEASES_URL": self.proxy.rewrite_url(self.redis.url),
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(PROJECT_ROOT),
        }
        self.worker = WorkerProcess(
            env, tmp_path / "worker.log", threads=3, processes=2, actors_module="tests.faults.admission_actors"
        )

    def send(self, job_id: str, user_id: str, seconds: float = 0.5) -> None:
        kwargs = {"job_id": job_id, "user_id": user_id, "seconds": seconds}
        self.sender.enqueue(Message(queue_name="default", actor_name="limited_job", args=(), kwargs=kwargs, options={}))

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.client.lrange(EVENTS_KEY, 0, -1)]

    def started(self, user_id: str) -> int:
        return sum(1 for e in self.events() if e["event"] == "start" and e["user_id"] == user_id)

    def ended(self, user_id: str) -> int:
        return sum(1 for e in self.events() if e["event"] == "end" and e["user_id"] == user_id)

    def outages_logged(self) -> Counter[str]:
        """How many times each worker process logged that admission's backend is unreachable, by PID."""
        return Counter(re.findall(rf"\[PID (\d+)\][^\n]*{OUTAGE}", self.worker.log()))

    def close(self) -> None:
        self.worker.stop()
        self.sender.close()
        self.client.close()
        self.proxy.stop()
        self.redis.stop()


@pytest.fixture
def outage(tmp_path: Path) -> Iterator[Outage]:
    running = Outage(tmp_path)
    try:
        yield running
    finally:
        running.close()


def _peak(events: list[dict[str, Any]], user_id: str) -> int:
    changes = sorted((e["at"], 1 if e["event"] == "start" else -1) for e in events if e["user_id"] == user_id)
    peak = current = 0
    for _, change in changes:  # an end sorts before a start at the same instant
        current += change
        peak = max(peak, current)
    return peak


def test_admission_without_redis_runs_nothing_spends_no_retry_and_everything_completes_after(
    outage: Outage,
) -> None:
    outage.worker.start()
    # Given admission's Redis refusing connections before any job started
    outage.proxy.set_mode("refuse")
    jobs = {f"busy-{index}": BUSY for index in range(6)} | {"other-0": OTHER}
    for job_id, user_id in jobs.items():
        outage.send(job_id, user_id)
    # When the workers take the jobs: they try admission, fail, and send the messages back with a delay
    wait_until(
        lambda: outage.events() or (outage.outages_logged() and outage.client.hlen("dramatiq:default.DQ.msgs") > 0),
        timeout=30,
        what="the workers to find admission unreachable and send messages back to the queue",
    )
    # Then no job ran
    assert outage.events() == []
    # When Redis answers again, and then refuses again while two of the busy user's jobs run
    # (held running until admission refuses, so that neither can end and release its slot before)
    outage.client.set(HOLD_KEY, 1)
    outage.proxy.set_mode("pass")
    wait_until(lambda: outage.started(BUSY) >= LIMIT, timeout=30, what="two of the busy user's jobs to start")
    first_outage = sum(outage.outages_logged().values())
    outage.proxy.set_mode("refuse")
    outage.client.delete(HOLD_KEY)
    for index in range(2):
        jobs[f"late-{index}"] = BUSY
        outage.send(f"late-{index}", BUSY)
    wait_until(
        lambda: outage.ended(BUSY) >= LIMIT and sum(outage.outages_logged().values()) > first_outage,
        timeout=30,
        what="the running jobs to end while admission is unreachable",
    )
    # Then no other job of that user started meanwhile (their releases failed: the slots stay taken)
    assert outage.started(BUSY) == LIMIT
    # When Redis answers again
    outage.proxy.set_mode("pass")
    wait_until(
        lambda: outage.ended(BUSY) + outage.ended(OTHER) == len(jobs),
        timeout=60,
        what="every job to complete",
    )
    # Then every job ran exactly once, on its first attempt, and never more than the limit at once
    events = outage.events()
    assert Counter(e["job_id"] for e in events if e["event"] == "start") == Counter(dict.fromkeys(jobs, 1))
    assert {e["retries"] for e in events} == {0}
    assert _peak(events, BUSY) == LIMIT
    # And each process logged each outage at most once
    logged = outage.outages_logged()
    assert sum(logged.values()) >= 2
    assert max(logged.values()) <= 2
    assert "throttle backend answers again" in outage.worker.log()
