"""Fenced attempts and reconciliation: the message of the current attempt, provider retries spent, next attempt time.

``lease_owner`` now holds a fresh attempt token per delivery (not the broker's message id); the
message id moves to ``lease_message``. ``retries`` counts provider retries spent, so a message
re-sent by the reconciler keeps the job's retry budget; ``not_before`` is when a waiting retry is due.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from repositories.store import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the columns."""
    with op.batch_alter_table("llm_job_results") as batch:
        batch.add_column(sa.Column("lease_message", sa.String(64), nullable=True))
        batch.add_column(sa.Column("retries", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("not_before", UTCDateTime, nullable=True))


def downgrade() -> None:
    """Drop the columns."""
    with op.batch_alter_table("llm_job_results") as batch:
        batch.drop_column("not_before")
        batch.drop_column("retries")
        batch.drop_column("lease_message")
