"""Chats, messages and checkpoints.

Revision ID: 0003_conversation
Revises: 0002_usage_and_limits
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003_conversation"
down_revision: str | None = "0002_usage_and_limits"
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
    # Plain ALTER TABLE on both backends: a batch copy of ctx_sessions on SQLite would
    # cascade-delete the rows other tables own.
    op.add_column(
        "ctx_sessions",
        sa.Column("chat_count", sa.BigInteger(), nullable=False, server_default="0"),
    )
    op.create_table(
        "ctx_chats",
        sa.Column("tenant_id", ID, nullable=False),
        sa.Column("session_id", ID, nullable=False),
        sa.Column("chat_id", ID, nullable=False),
        sa.Column("name", sa.Text(), nullable=True),
        sa.Column("metadata", JSON, nullable=False),
        sa.Column("max_messages", sa.BigInteger(), nullable=True),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("next_seq", sa.BigInteger(), nullable=False),
        sa.Column("message_count", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "session_id", "chat_id", name="pk_ctx_chats"),
        _owned("ctx_chats"),
    )
    op.create_table(
        "ctx_messages",
        sa.Column("tenant_id", ID, nullable=False),
        sa.Column("session_id", ID, nullable=False),
        sa.Column("chat_id", ID, nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("message_id", sa.String(36), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("metadata", JSON, nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=True),
        sa.Column("created_at", TIME, nullable=False),
        sa.PrimaryKeyConstraint(
            "tenant_id", "session_id", "chat_id", "seq", name="pk_ctx_messages"
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id", "session_id", "chat_id"],
            ["ctx_chats.tenant_id", "ctx_chats.session_id", "ctx_chats.chat_id"],
            name="fk_ctx_messages_tenant_id_ctx_chats",
            ondelete="CASCADE",
        ),
    )
    op.create_table(
        "ctx_checkpoints",
        sa.Column("tenant_id", ID, nullable=False),
        sa.Column("session_id", ID, nullable=False),
        sa.Column("checkpoint_id", sa.String(36), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("content", JSON, nullable=False),
        sa.PrimaryKeyConstraint(
            "tenant_id", "session_id", "checkpoint_id", name="pk_ctx_checkpoints"
        ),
        _owned("ctx_checkpoints"),
    )
    # Sessions created before this revision get their default chat too.
    op.execute(
        "INSERT INTO ctx_chats (tenant_id, session_id, chat_id, name, metadata, max_messages,"
        " created_at, next_seq, message_count)"
        " SELECT tenant_id, session_id, 'default', NULL, '{}', NULL, created_at, 0, 0"
        " FROM ctx_sessions"
    )
    op.execute(
        "UPDATE ctx_sessions SET chat_count = 1, current_chat_id = 'default'"
        " WHERE current_chat_id IS NULL"
    )


def downgrade() -> None:
    op.drop_table("ctx_checkpoints")
    op.drop_table("ctx_messages")
    op.drop_table("ctx_chats")
    op.drop_column("ctx_sessions", "chat_count")
