"""Key-value memory: the TTL an item was last written with, ``ctx_memory_items.ttl_seconds``.

Seconds (NULL: the item was written without one, and never expires). ``remember(...,
ttl=)`` and the LangGraph store's puts set it with ``expires_at``; the store's reads
with ``refresh_ttl`` start an item's expiry over from it (``expires_at = now +
ttl_seconds``) in one statement.

Revision ID: 0014_memory_ttl
Revises: 0013_graph_checkpoints
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014_memory_ttl"
down_revision: str | None = "0013_graph_checkpoints"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("ctx_memory_items", sa.Column("ttl_seconds", sa.Double(), nullable=True))


def downgrade() -> None:
    op.drop_column("ctx_memory_items", "ttl_seconds")
