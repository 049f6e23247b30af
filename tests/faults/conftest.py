"""Fault-test fixtures: a Redis server, a PostgreSQL proxy and a loopback provider of each test's own."""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from repositories.migrations import upgrade_database
from repositories.store import JobStore, create_store_engine
from tests.faults.harness import FaultStack, RedisServer
from tests.faults.proxy import TcpProxy
from tests.loopback.openrouter import OpenRouterServer

MakeStack = Callable[..., FaultStack]


@pytest.fixture(scope="session", autouse=True)
def tier_services(services: None) -> None:
    """Every test of this tier has real Redis and PostgreSQL."""


@pytest.fixture(autouse=True)
def collect_cut_connections() -> Iterator[None]:
    """After each fault test, collect the database connections its faults cut, here rather than in a later test.

    A connection whose socket a fault closed mid-statement can be dropped by its pool without a clean close;
    psycopg warns when such an object is collected. That is the fault working, not a leak of the code under
    test, so it is collected at once with the warning ignored (the suite turns warnings into errors).
    """
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.fixture
def pg_proxy(postgres_database: str) -> Iterator[TcpProxy]:
    """A TCP proxy in front of the machine's PostgreSQL, for this test only."""
    url = make_url(postgres_database)
    with TcpProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        yield proxy


@pytest.fixture
def fault_stack(tmp_path: Path, postgres_database: str, pg_proxy: TcpProxy) -> Iterator[MakeStack]:
    """Build this test's stack: its own Redis (``appendonly`` or not); workers reach PostgreSQL through the proxy."""
    stacks: list[FaultStack] = []

    def make(*, appendonly: bool = False, **extra_env: str) -> FaultStack:
        redis_dir = tmp_path / "redis"
        redis_dir.mkdir(exist_ok=True)
        engine = create_store_engine(postgres_database)
        upgrade_database(engine)
        provider = OpenRouterServer().start()
        stack = FaultStack(
            redis_server=RedisServer(redis_dir, appendonly=appendonly).start(),
            store=JobStore(engine),
            database_url=postgres_database,
            worker_database_url=pg_proxy.rewrite_url(postgres_database),
            provider=provider,
            log_dir=tmp_path,
            extra_env=dict(extra_env),
        )
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.close()
        stack.provider.stop()
        stack.store.engine.dispose()
