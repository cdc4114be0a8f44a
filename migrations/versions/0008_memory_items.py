"""Key-value memory (SPEC §13): ctx_memory_items.

Scope columns hold "" for "none" (no user: the tenant-wide scope; no session: not
narrowed to one), so that they can be part of the primary key. Keys are compared
byte by byte on PostgreSQL too (collation "C"), as SQLite compares them, so listing
in key order is the same on both.

Revision ID: 0008_memory_items
Revises: 0007_idle_timeout
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008_memory_items"
down_revision: str | None = "0007_idle_timeout"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
KEY = sa.String(255).with_variant(sa.String(255, collation="C"), "postgresql")


def upgrade() -> None:
    op.create_table(
        "ctx_memory_items",
        sa.Column("tenant_id", sa.String(255), nullable=False),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("session_id", sa.String(255), nullable=False),
        sa.Column("namespace", sa.String(255), nullable=False),
        sa.Column("key", KEY, nullable=False),
        sa.Column("value", JSON, nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint(
            "tenant_id", "user_id", "session_id", "namespace", "key", name="pk_ctx_memory_items"
        ),
    )
    op.create_index(
        "ix_ctx_memory_items_tenant_id_session_id", "ctx_memory_items", ["tenant_id", "session_id"]
    )
    op.create_index("ix_ctx_memory_items_expires_at", "ctx_memory_items", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_ctx_memory_items_expires_at", "ctx_memory_items")
    op.drop_index("ix_ctx_memory_items_tenant_id_session_id", "ctx_memory_items")
    op.drop_table("ctx_memory_items")
