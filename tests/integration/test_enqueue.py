"""``enqueue_*`` writes the row and sends the message as one step: the row commits only once its message is sent."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from actors.queue import JobQueue
from repositories.store import Job, JobStatus
from settings import Settings
from tests.conftest import database_url_for, unique
from tests.queues import queue_on

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "postgresql"])
def api(request: pytest.FixtureRequest) -> Iterator[JobQueue]:
    """The web API on a migrated store of each backend."""
    settings = Settings(database_url=database_url_for(request, request.param), cancel_signals=False)
    with queue_on(settings) as current:
        yield current


def _params() -> dict[str, Any]:
    return {"model": "test/model", "messages": [{"role": "user", "content": "hi"}]}


def test_the_row_is_seen_only_once_its_message_is_in_the_broker(api: JobQueue, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a broker send that looks at the store, from another connection, while it sends
    job_id = unique("atomic")
    seen_while_sending: list[Job | None] = []
    send = api._send

    def looking_send(message: Any, delay_ms: int = 0) -> None:
        seen_while_sending.append(api.store.get(job_id))
        send(message, delay_ms)

    monkeypatch.setattr(api, "_send", looking_send)
    # When the job is enqueued
    assert api.enqueue_generation("u1", _params(), job_id=job_id) == job_id
    # Then the row did not exist for others while the message was being sent, and exists, marked sent, after
    assert seen_while_sending == [None]
    job = api.get_job(job_id)
    assert job is not None
    assert job.status is JobStatus.PENDING
    assert job.enqueued_at is not None


def test_a_send_that_fails_writes_nothing_and_the_same_id_can_be_enqueued_again(
    api: JobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a broker that refuses the send
    job_id = unique("refused")
    send = api._send

    def refused(message: Any, delay_ms: int = 0) -> None:
        raise redis.ConnectionError("broker down")

    monkeypatch.setattr(api, "_send", refused)
    # When the job is enqueued / Then the broker's error reaches the caller, and no row was written
    with pytest.raises(redis.ConnectionError):
        api.enqueue_generation("u1", _params(), job_id=job_id)
    assert api.get_job(job_id) is None
    # And once the broker takes messages again, the same id is a new job
    monkeypatch.setattr(api, "_send", send)
    assert api.enqueue_generation("u1", _params(), job_id=job_id) == job_id
    job = api.get_job(job_id)
    assert job is not None
    assert job.enqueued_at is not None
