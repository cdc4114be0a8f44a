"""Quotas, usage records, rate limits and concurrency leases.

Revision ID: 0002_usage_and_limits
Revises: 0001_sessions
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002_usage_and_limits"
down_revision: str | None = "0001_sessions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TIME = sa.DateTime(timezone=True)
ID = sa.String(255)


def _owned(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["tenant_id", "session_id"],
        ["ctx_sessions.tenant_id", "ctx_sessions.session_id"],
        name=f"fk_{table}_tenant_id_ctx_sessions",
        ondelete="CASCADE",
    )


def upgrade() -> None:
    op.create_table(
        "ctx_quotas",
        sa.Column("tenant_id", ID, nullable=False),
        sa.Column("session_id", ID, nullable=False),
        sa.Column("resource_type", sa.String(32), nullable=False),
        sa.Column("used", sa.Double(), nullable=False),
        sa.Column("quota_limit", sa.Double(), nullable=True),
        sa.Column("custom", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "session_id", "resource_type", name="pk_ctx_quotas"),
        _owned("ctx_quotas"),
    )
    op.create_table(
        "ctx_usage_records",
        sa.Column("tenant_id", ID, nullable=False),
        sa.Column("record_id", sa.String(36), nullable=False),
        sa.Column("session_id", ID, nullable=False),
        sa.Column("user_id", ID, nullable=False),
        sa.Column("operation", ID, nullable=False),
        sa.Column("resource_type", sa.String(32), nullable=False),
        sa.Column("amount", sa.Double(), nullable=False),
        sa.Column("metadata", JSON, nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "record_id", name="pk_ctx_usage_records"),
        _owned("ctx_usage_records"),
    )
    op.create_index(
        "ix_ctx_usage_records_tenant_id_session_id_created_at",
        "ctx_usage_records",
        ["tenant_id", "session_id", "created_at"],
    )
    op.create_index(
        "ix_ctx_usage_records_tenant_id_user_id_created_at",
        "ctx_usage_records",
        ["tenant_id", "user_id", "created_at"],
    )
    op.create_table(
        "ctx_rate_limit_rules",
        sa.Column("tenant_id", ID, nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("subject", ID, nullable=False),
        sa.Column("operation", ID, nullable=False),
        sa.Column("max_calls", sa.BigInteger(), nullable=False),
        sa.Column("window_seconds", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint(
            "tenant_id", "scope", "subject", "operation", name="pk_ctx_rate_limit_rules"
        ),
    )
    op.create_table(
        "ctx_rate_limit_state",
        sa.Column("tenant_id", ID, nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("subject", ID, nullable=False),
        sa.Column("operation", ID, nullable=False),
        sa.Column("window_ms", sa.BigInteger(), nullable=False),
        sa.Column("state", JSON, nullable=False),
        sa.Column("updated_at", TIME, nullable=False),
        sa.PrimaryKeyConstraint(
            "tenant_id",
            "scope",
            "subject",
            "operation",
            "window_ms",
            name="pk_ctx_rate_limit_state",
        ),
    )
    op.create_table(
        "ctx_leases",
        sa.Column("tenant_id", ID, nullable=False),
        sa.Column("lease_id", sa.String(36), nullable=False),
        sa.Column("session_id", ID, nullable=False),
        sa.Column("operation", ID, nullable=False),
        sa.Column("acquired_at", TIME, nullable=False),
        sa.Column("expires_at", TIME, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "lease_id", name="pk_ctx_leases"),
        _owned("ctx_leases"),
    )
    op.create_index(
        "ix_ctx_leases_tenant_id_session_id_expires_at",
        "ctx_leases",
        ["tenant_id", "session_id", "expires_at"],
    )


def downgrade() -> None:
    op.drop_table("ctx_leases")
    op.drop_table("ctx_rate_limit_state")
    op.drop_table("ctx_rate_limit_rules")
    op.drop_table("ctx_usage_records")
    op.drop_table("ctx_quotas")
