"""Shared fixtures: the test process's settings, real services (for the tiers that use them), and job stores on
SQLite and PostgreSQL."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# The test process imports ``actors``, which reads its settings once: pin them before any import.
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
TEST_POSTGRES_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
TEST_API_KEY = "sk-or-test-" + "SECRETKEYNEVERLOGGED"
os.environ.update(
    {
        "REDIS_URL": TEST_REDIS_URL,
        "DATABASE_URL": "sqlite:///" + str(Path(tempfile.gettempdir()) / f"llmq-{uuid.uuid4().hex}.db"),
        "LLM_PROVIDER": "openrouter",
        "OPENROUTER_BASE_URL": "http://127.0.0.1:9/api/v1",
        "OPENROUTER_API_KEY": TEST_API_KEY,
        "RETRY_MIN_BACKOFF_MS": "100",
        "RETRY_MAX_BACKOFF_MS": "400",
        "LOG_LEVEL": "INFO",
    }
)

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from repositories.migrations import upgrade_database  # noqa: E402
from repositories.store import JobStore, create_store_engine  # noqa: E402
from tests.services import ensure_postgres, ensure_redis  # noqa: E402


@pytest.fixture(scope="session")
def services() -> None:
    """Redis and PostgreSQL are real and running (started when down).

    Autouse in the tiers that need them (``tests/integration``, ``tests/faults``, ``tests/web``); the unit
    tier overrides it with a failure, so no unit test reaches a real service, even through a fixture."""
    ensure_redis()
    ensure_postgres()


@pytest.fixture(scope="session")
def postgres_database(services: None) -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    name = f"llmq_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(TEST_POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(TEST_POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def sqlite_database(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A SQLite file for this test session."""
    return "sqlite:///" + str(tmp_path_factory.mktemp("store") / "jobs.db")


def database_url_for(request: pytest.FixtureRequest, backend: str) -> str:
    """The session database of ``backend`` (``sqlite`` or ``postgresql``)."""
    fixture = "sqlite_database" if backend == "sqlite" else "postgres_database"
    url: str = request.getfixturevalue(fixture)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest) -> Iterator[JobStore]:
    """A migrated job store, once on SQLite and once on PostgreSQL."""
    engine = create_store_engine(database_url_for(request, request.param))
    upgrade_database(engine)
    yield JobStore(engine)
    engine.dispose()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[JobStore]:
    """A migrated job store on a fresh SQLite file (fast, for unit tests)."""
    engine = create_store_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    upgrade_database(engine)
    yield JobStore(engine)
    engine.dispose()


def unique(prefix: str) -> str:
    """A short unique id for jobs and users, so tests never see each other's rows."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"
