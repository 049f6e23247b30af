"""On PostgreSQL a store call of one statement is one round trip: no ``BEGIN`` and ``COMMIT`` of its own.

Read off the wire with libpq's own trace of the pooled connection: every round trip of psycopg ends with
a ``Sync`` (extended protocol) or is one simple ``Query`` (``BEGIN``, ``COMMIT``, ``ROLLBACK``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine

from repositories.store import JobKind, JobStore
from tests.conftest import unique

pytestmark = pytest.mark.integration


@pytest.fixture
def engine(pooled_engine: Engine) -> Engine:
    """A store engine on PostgreSQL whose calls all reuse one pooled connection (``pooled_engine``)."""
    return pooled_engine


def round_trips(engine: Engine, call: Callable[[], Any]) -> list[str]:
    """What ``call`` sent to the server, one entry per round trip (``"Query: BEGIN"``, ``"Sync: UPDATE"``)."""
    with engine.connect() as connection:
        pgconn = connection.connection.driver_connection.pgconn  # type: ignore[union-attr]
    with tempfile.TemporaryFile("w+") as trace:
        pgconn.trace(trace.fileno())
        try:
            call()
        finally:
            pgconn.untrace()
        trace.seek(0)
        lines = [line.split("\t") for line in trace.read().splitlines()]
    trips, statement = [], ""
    for fields in lines:
        if len(fields) < 4 or fields[1] != "F":  # what the client sent, not what the server answered
            continue
        kind, body = fields[3], (fields[4] if len(fields) > 4 else "")
        if kind == "Parse":
            statement = body.split('"')[3].split(" ")[0]
        elif kind == "Query":
            trips.append(f"Query: {body.strip().strip(chr(34))}")
        elif kind == "Sync":
            trips.append(f"Sync: {statement}")
    return trips


def test_a_claim_a_read_and_a_completion_are_one_round_trip_each(engine: Engine) -> None:
    # Given a pending job
    store, job_id = JobStore(engine), unique("job")
    store.create(job_id=job_id, user_id="u1", kind=JobKind.GENERATE, request={})
    # When it is claimed, read, and completed
    claim = round_trips(engine, lambda: store.claim(job_id, owner="attempt-1", lease_s=30))
    read = round_trips(engine, lambda: store.get(job_id))
    answer: dict[str, Any] = {"content": "hi", "response": {}, "provider": "p", "model": "m", "usage": None}
    completion = round_trips(engine, lambda: store.complete(job_id, owner="attempt-1", **answer))
    # Then each sent its one statement and nothing else: no BEGIN, COMMIT or ROLLBACK round trip
    assert claim == ["Sync: UPDATE"]
    assert read == ["Sync: SELECT"]
    assert completion == ["Sync: UPDATE"]
    job = store.get(job_id)
    assert job is not None
    assert (job.status, job.content, job.attempts) == ("completed", "hi", 1)


def test_an_enqueue_still_holds_its_row_in_a_transaction_until_its_block_ends(engine: Engine) -> None:
    # Given an enqueue's insert (the API sends the job's message inside this block)
    store, job_id = JobStore(engine), unique("job")

    def enqueue() -> None:
        with store.creating(job_id=job_id, user_id="u1", kind=JobKind.GENERATE, request={}) as created:
            assert created

    # Then the insert ran in a transaction of its own, committed when the block ended
    assert round_trips(engine, enqueue) == ["Query: BEGIN", "Sync: INSERT", "Query: COMMIT"]
