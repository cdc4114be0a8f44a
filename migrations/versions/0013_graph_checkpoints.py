"""LangGraph checkpoints (``ContextEngineSaver``): ctx_graph_checkpoints, ctx_graph_blobs
and ctx_graph_writes, owned by the session that is the thread (deleted with it).

A checkpoint is stored without its channel values; each channel's value is a blob row
written once per version, so a thread's storage grows with the values that change,
not with the steps times the channels.

Revision ID: 0013_graph_checkpoints
Revises: 0012_compaction
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0013_graph_checkpoints"
down_revision: str | None = "0012_compaction"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
ID = sa.String(255)
#: compared byte by byte (collation "C" on PostgreSQL), as SQLite compares them
KEY = sa.String(255).with_variant(sa.String(255, collation="C"), "postgresql")


def _owned(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["tenant_id", "session_id"],
        ["ctx_sessions.tenant_id", "ctx_sessions.session_id"],
        name=f"fk_{table}_tenant_id_ctx_sessions",
        ondelete="CASCADE",
    )


def upgrade() -> None:
    op.create_table(
        "ctx_graph_checkpoints",
        sa.Column("tenant_id", ID, nullable=False),
        sa.Column("session_id", ID, nullable=False),
        sa.Column("checkpoint_ns", sa.Text(), nullable=False),
        sa.Column("checkpoint_id", KEY, nullable=False),
        sa.Column("parent_checkpoint_id", KEY, nullable=True),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("checkpoint", sa.LargeBinary(), nullable=False),
        sa.Column("metadata", JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint(
            "tenant_id",
            "session_id",
            "checkpoint_ns",
            "checkpoint_id",
            name="pk_ctx_graph_checkpoints",
        ),
        _owned("ctx_graph_checkpoints"),
    )
    op.create_table(
        "ctx_graph_blobs",
        sa.Column("tenant_id", ID, nullable=False),
        sa.Column("session_id", ID, nullable=False),
        sa.Column("checkpoint_ns", sa.Text(), nullable=False),
        sa.Column("channel", sa.Text(), nullable=False),
        sa.Column("version", KEY, nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("blob", sa.LargeBinary(), nullable=True),
        sa.PrimaryKeyConstraint(
            "tenant_id",
            "session_id",
            "checkpoint_ns",
            "channel",
            "version",
            name="pk_ctx_graph_blobs",
        ),
        _owned("ctx_graph_blobs"),
    )
    op.create_table(
        "ctx_graph_writes",
        sa.Column("tenant_id", ID, nullable=False),
        sa.Column("session_id", ID, nullable=False),
        sa.Column("checkpoint_ns", sa.Text(), nullable=False),
        sa.Column("checkpoint_id", KEY, nullable=False),
        sa.Column("task_id", ID, nullable=False),
        sa.Column("idx", sa.Integer(), nullable=False),
        sa.Column("channel", sa.Text(), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("blob", sa.LargeBinary(), nullable=False),
        sa.Column("task_path", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint(
            "tenant_id",
            "session_id",
            "checkpoint_ns",
            "checkpoint_id",
            "task_id",
            "idx",
            name="pk_ctx_graph_writes",
        ),
        _owned("ctx_graph_writes"),
    )


def downgrade() -> None:
    op.drop_table("ctx_graph_writes")
    op.drop_table("ctx_graph_blobs")
    op.drop_table("ctx_graph_checkpoints")
