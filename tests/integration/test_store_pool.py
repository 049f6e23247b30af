"""The PostgreSQL store's pool pings a connection only when it sat unused, and replaces one that died meanwhile."""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy import Engine, text

from repositories.store import PING_AFTER_IDLE_S, JobKind, JobStore, create_store_engine
from tests.conftest import unique

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
