"""Sessions: lifecycle, metrics and metadata of every session, per tenant.

Revision ID: 0001_sessions
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001_sessions"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "ctx_sessions",
        sa.Column("tenant_id", sa.String(255), nullable=False),
        sa.Column("session_id", sa.String(255), nullable=False),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("tier", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("name", sa.Text(), nullable=True),
        sa.Column("metadata", JSON, nullable=False),
        sa.Column("tags", JSON, nullable=False),
        sa.Column("preferences", JSON, nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("last_activity", TIME, nullable=False),
        sa.Column("ended_at", TIME, nullable=True),
        sa.Column("expires_at", TIME, nullable=True),
        sa.Column("request_count", sa.BigInteger(), nullable=False),
        sa.Column("error_count", sa.BigInteger(), nullable=False),
        sa.Column("total_processing_time", sa.Double(), nullable=False),
        sa.Column("current_chat_id", sa.String(255), nullable=True),
        sa.PrimaryKeyConstraint("tenant_id", "session_id", name="pk_ctx_sessions"),
    )
    op.create_index(
        "ix_ctx_sessions_tenant_id_created_at_session_id",
        "ctx_sessions",
        ["tenant_id", "created_at", "session_id"],
    )
    op.create_index(
        "ix_ctx_sessions_tenant_id_user_id_created_at",
        "ctx_sessions",
        ["tenant_id", "user_id", "created_at"],
    )
    op.create_index(
        "ix_ctx_sessions_status_last_activity", "ctx_sessions", ["status", "last_activity"]
    )
    op.create_index("ix_ctx_sessions_status_expires_at", "ctx_sessions", ["status", "expires_at"])


def downgrade() -> None:
    op.drop_table("ctx_sessions")
