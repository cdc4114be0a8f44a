"""Semantic memory (SPEC §13): ctx_memories.

Each memory's vector is stored portably, as little-endian float32s of length 1, with
its dimension count; scope columns as in ctx_memory_items ("" for none).

Revision ID: 0009_memories
Revises: 0008_memory_items
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0009_memories"
down_revision: str | None = "0008_memory_items"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "ctx_memories",
        sa.Column("tenant_id", sa.String(255), nullable=False),
        sa.Column("memory_id", sa.String(255), nullable=False),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("session_id", sa.String(255), nullable=False),
        sa.Column("namespace", sa.String(255), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("metadata", JSON, nullable=False),
        sa.Column("importance", sa.Float(), nullable=False),
        sa.Column("dimensions", sa.Integer(), nullable=False),
        sa.Column("embedding", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_accessed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("tenant_id", "memory_id", name="pk_ctx_memories"),
    )
    op.create_index(
        "ix_ctx_memories_tenant_id_namespace_user_id",
        "ctx_memories",
        ["tenant_id", "namespace", "user_id"],
    )
    op.create_index(
        "ix_ctx_memories_tenant_id_session_id", "ctx_memories", ["tenant_id", "session_id"]
    )
    op.create_index("ix_ctx_memories_expires_at", "ctx_memories", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_ctx_memories_expires_at", "ctx_memories")
    op.drop_index("ix_ctx_memories_tenant_id_session_id", "ctx_memories")
    op.drop_index("ix_ctx_memories_tenant_id_namespace_user_id", "ctx_memories")
    op.drop_table("ctx_memories")
