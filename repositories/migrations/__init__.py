"""Alembic migrations of the job store, applied with ``upgrade_database`` or ``make migrate``."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text

from repositories.sql_deadline import unbounded

logger = logging.getLogger(__name__)

_SCRIPT_LOCATION = str(Path(__file__).resolve().parent)
#: Any constant works: it only has to be the same in every process that migrates this database.
_PG_MIGRATION_LOCK = 0x4C4C4D51


def alembic_config() -> Config:
    """An Alembic configuration pointing at this package, with no ini file needed."""
    config = Config()
    config.set_main_option("script_location", _SCRIPT_LOCATION)
    return config


def head_revision() -> str | None:
    """The newest revision shipped with the code."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None when it was never migrated."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade_database(engine: Engine) -> None:
    """Upgrade the database to the newest revision; safe when several processes start at once.

    On PostgreSQL an advisory lock serialises the processes. SQLite serialises writers itself, so a
    process that loses the race finds the database already at head and stops there.
    """
    with unbounded():
        _upgrade(engine)


def _upgrade(engine: Engine) -> None:
    # Waiting for another process's migration, or a long DDL statement, is not an outage: no timeouts here.
    if current_revision(engine) == head_revision():
        return
    config = alembic_config()
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SET LOCAL statement_timeout = 0"))
            connection.execute(text("SET LOCAL idle_in_transaction_session_timeout = 0"))
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
        config.attributes["connection"] = connection
        try:
            command.upgrade(config, "head")
        except Exception:
            if connection.dialect.name == "sqlite":
                connection.rollback()
                if current_revision(engine) == head_revision():
                    return
            raise
    logger.info("job store migrated to revision %s", head_revision())
