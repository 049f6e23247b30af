"""Create llm_job_results.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from repositories.store import JSONDocument, UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the job table and its indexes."""
    op.create_table(
        "llm_job_results",
        sa.Column("job_id", sa.String(128), primary_key=True),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("request", JSONDocument, nullable=False),
        sa.Column("response", JSONDocument, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("content", sa.Text, nullable=False, server_default=""),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("provider", sa.String(64), nullable=True),
        sa.Column("model", sa.String(200), nullable=True),
        sa.Column("usage", JSONDocument, nullable=True),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        sa.Column("heartbeat_at", UTCDateTime, nullable=True),
        sa.Column("enqueued_at", UTCDateTime, nullable=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("started_at", UTCDateTime, nullable=True),
        sa.Column("finished_at", UTCDateTime, nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'processing', 'completed', 'failed', 'cancelled')",
            name="ck_llm_job_results_status",
        ),
        sa.CheckConstraint("kind IN ('generate', 'preview')", name="ck_llm_job_results_kind"),
    )
    op.create_index("ix_llm_job_results_user_created", "llm_job_results", ["user_id", "created_at"])
    op.create_index("ix_llm_job_results_status_updated", "llm_job_results", ["status", "updated_at"])


def downgrade() -> None:
    """Drop the job table."""
    op.drop_index("ix_llm_job_results_status_updated", table_name="llm_job_results")
    op.drop_index("ix_llm_job_results_user_created", table_name="llm_job_results")
    op.drop_table("llm_job_results")
