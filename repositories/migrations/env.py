"""Alembic environment: runs on the connection handed over by ``upgrade_database``."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from repositories.store import Base


def run_migrations(connection: Connection) -> None:
    """Run the pending migrations inside the caller's transaction."""
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through repositories.migrations.upgrade_database or `make migrate`")
run_migrations(connection)
