"""Semantic memory: a memory's source (an idempotency key) and the user index retention
ranks by.

``source`` names where a memory came from (a message, an ADK event); a tenant holds
one memory per source, so adding one twice writes it once. NULL: no source (NULLs are
distinct in a unique index on both backends).

Revision ID: 0010_memory_source
Revises: 0009_memories
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_memory_source"
down_revision: str | None = "0009_memories"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("ctx_memories", sa.Column("source", sa.Text(), nullable=True))
    op.create_index(
        "ix_ctx_memories_tenant_id_source", "ctx_memories", ["tenant_id", "source"], unique=True
    )
    op.create_index("ix_ctx_memories_tenant_id_user_id", "ctx_memories", ["tenant_id", "user_id"])


def downgrade() -> None:
    op.drop_index("ix_ctx_memories_tenant_id_user_id", "ctx_memories")
    op.drop_index("ix_ctx_memories_tenant_id_source", "ctx_memories")
    op.drop_column("ctx_memories", "source")
