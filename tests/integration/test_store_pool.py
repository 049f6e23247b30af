"""The PostgreSQL store's pool pings a connection only when it sat unused, and replaces one that died meanwhile."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from repositories.store import PING_AFTER_IDLE_S, Job, JobKind, JobStatus, JobStore, create_store_engine
from tests.conftest import unique
from tests.harness import wait_until

pytestmark = pytest.mark.integration


class PingCounter:
    """Counts the dialect's pings of an engine (the guarded ``do_ping`` the pool calls at checkout)."""

    def __init__(self, engine: Engine) -> None:
        self.count = 0
        ping = engine.dialect.do_ping

        def counted(dbapi_connection: Any) -> bool:
            self.count += 1
            return bool(ping(dbapi_connection))

        engine.dialect.do_ping = counted  # type: ignore[method-assign]


@pytest.fixture
def engine(pooled_engine: Engine) -> Engine:
    """A store engine on PostgreSQL whose calls all reuse one pooled connection (``pooled_engine``)."""
    return pooled_engine


def test_a_connection_used_a_moment_ago_is_handed_out_without_a_ping(engine: Engine) -> None:
    # Given a pooled connection that was just used
    pings = PingCounter(engine)
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    # When ten statements run one after the other
    for _ in range(10):
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    # Then none of them paid a ping round trip
    assert pings.count == 0


def test_a_connection_idle_longer_than_the_bound_is_pinged_and_replaced_when_it_died(
    engine: Engine, postgres_database: str
) -> None:
    # Given a pooled connection, killed by the server while it sat idle past the bound
    store = JobStore(engine)
    pings = PingCounter(engine)
    with engine.connect() as connection:
        backend = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
    admin = create_store_engine(postgres_database)
    with admin.begin() as connection:
        connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": backend})
    admin.dispose()
    time.sleep(PING_AFTER_IDLE_S + 0.2)  # the idle time is what is under test
    # When the store runs a statement
    job_id = unique("ping")
    created = store.create(job_id=job_id, user_id="u1", kind=JobKind.GENERATE, request={})
    # Then the checkout pinged, found the connection dead and replaced it: the statement succeeded
    assert pings.count >= 1
    assert created
    assert store.get(job_id) is not None
    with engine.connect() as connection:
        assert connection.execute(text("SELECT pg_backend_pid()")).scalar_one() != backend


def test_row_locks_of_a_transaction_left_open_by_a_frozen_client_come_back_after_the_idle_bound(
    engine: Engine, postgres_database: str
) -> None:
    # Given a pending job, and a client that updated its row in a transaction and then froze (never commits)
    store = JobStore(engine)
    job_id = unique("locked")
    store.create(job_id=job_id, user_id="u1", kind=JobKind.GENERATE, request={})
    frozen_engine = create_store_engine(postgres_database, idle_transaction_timeout_s=1.0)
    frozen = frozen_engine.connect()
    try:
        frozen.execute(text("UPDATE llm_job_results SET updated_at = now() WHERE job_id = :id"), {"id": job_id})
        # When another worker claims the job (each try waits at most its 5 s statement timeout for the row's lock)
        started = time.monotonic()
        job = wait_until(
            lambda: _claim_or_none(store, job_id), timeout=15, interval=0.1, what="the claim past the frozen lock"
        )
        # Then the server ended the frozen session after its idle bound, and the claim got the row
        assert job.status is JobStatus.PROCESSING
        assert time.monotonic() - started < 5.0  # before the claim's own statement timeout, not after retries
    finally:
        with contextlib.suppress(Exception):
            frozen.close()
        frozen_engine.dispose()


def _claim_or_none(store: JobStore, job_id: str) -> Job | None:
    try:
        return store.claim(job_id, owner="attempt-1", lease_s=30)
    except OperationalError:  # its statement timeout, waiting for the row's lock
        return None
