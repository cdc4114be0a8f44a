"""Conversation compaction (SPEC §14): a message's ``compacted`` flag, and an index of
each chat's system messages.

``compacted``: the message was replaced by a summary (``compact_history``); it stays,
hidden from the history, until ``purge_compacted`` or its session's purge removes it.
``ctx_chats.compacted_through``: every message of the chat not compacted, system
messages aside, has a greater seq (the end of the latest summary's range), so history
reads skip compacted messages by an index range instead of reading them.
``ix_ctx_messages_system`` (partial: system messages only) finds a chat's system prompt
and latest summary, which every history page and context window puts first, without
reading the chat's other messages.

Revision ID: 0012_compaction
Revises: 0011_memory_vectors
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012_compaction"
down_revision: str | None = "0011_memory_vectors"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "ctx_chats",
        sa.Column("compacted_through", sa.BigInteger(), nullable=False, server_default="0"),
    )
    op.add_column(
        "ctx_messages",
        sa.Column("compacted", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.create_index(
        "ix_ctx_messages_system",
        "ctx_messages",
        ["tenant_id", "session_id", "chat_id", "seq"],
        sqlite_where=sa.text("role = 'system'"),
        postgresql_where=sa.text("role = 'system'"),
    )


def downgrade() -> None:
    op.drop_index("ix_ctx_messages_system", "ctx_messages")
    op.drop_column("ctx_messages", "compacted")
    op.drop_column("ctx_chats", "compacted_through")
