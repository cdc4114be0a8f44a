"""Per-session idle timeouts, and message caps fixed per chat at creation.

Sessions get ``idle_timeout`` (seconds; NULL = never expire for idleness) and
``idle_deadline`` (``last_activity`` + ``idle_timeout`` as seconds since the epoch, set
by every touch); the sweep's ``idle_bucket`` is now computed from the deadline.
Existing sessions take the engine's ``session_timeout`` and existing chats without a
cap of their own take ``max_messages_per_chat``: the settings given to the migrating
engine (``config.attributes["settings"]``), else those of the environment
(``CTXENGINE_*``), whose defaults are 1800 s and 1000 messages. On PostgreSQL the
upgrade rewrites ctx_sessions (an UPDATE of every row, then the stored bucket
column), under an exclusive lock: plan it for a quiet moment on a large table.

Revision ID: 0007_idle_timeout
Revises: 0006_idle_bucket
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0007_idle_timeout"
down_revision: str | None = "0006_idle_bucket"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BUCKET = {
    "postgresql": "BIGINT GENERATED ALWAYS AS "
    "((floor((idle_deadline / (10)::double precision)))::bigint) STORED",
    "sqlite": "BIGINT GENERATED ALWAYS AS (CAST((idle_deadline / 10.0) AS INTEGER)) VIRTUAL",
}
OLD_BUCKET = {
    "postgresql": "BIGINT GENERATED ALWAYS AS "
    "((floor(EXTRACT(epoch FROM last_activity - to_timestamp(0)) / 10))::bigint) STORED",
    "sqlite": "BIGINT GENERATED ALWAYS AS "
    "((CAST(strftime('%s', last_activity) AS INTEGER) / 10)) VIRTUAL",
}
#: ``last_activity`` as seconds since the epoch.
EPOCH = {
    "postgresql": "EXTRACT(epoch FROM last_activity)",
    "sqlite": "((julianday(last_activity) - 2440587.5) * 86400.0)",
}
INDEX = "ix_ctx_sessions_status_idle_bucket"


def _defaults() -> tuple[float | None, int | None]:
    settings = context.config.attributes.get("settings")
    if settings is None:
        from ctxengine.settings import EngineSettings

        settings = EngineSettings()
    return settings.session_timeout, settings.max_messages_per_chat


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    timeout, max_messages = _defaults()
    op.drop_index(INDEX, "ctx_sessions")
    op.execute("ALTER TABLE ctx_sessions DROP COLUMN idle_bucket")
    op.add_column("ctx_sessions", sa.Column("idle_timeout", sa.Double(), nullable=True))
    op.add_column("ctx_sessions", sa.Column("idle_deadline", sa.Double(), nullable=True))
    if timeout is not None:
        op.execute(
            sa.text(
                f"UPDATE ctx_sessions SET idle_timeout = :timeout, "
                f"idle_deadline = {EPOCH[dialect]} + :timeout"
            ).bindparams(timeout=float(timeout))
        )
    op.execute(f"ALTER TABLE ctx_sessions ADD COLUMN idle_bucket {BUCKET[dialect]}")
    op.create_index(INDEX, "ctx_sessions", ["status", "idle_bucket"])
    if max_messages is not None:
        op.execute(
            sa.text(
                "UPDATE ctx_chats SET max_messages = :cap WHERE max_messages IS NULL"
            ).bindparams(cap=max_messages)
        )


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.drop_index(INDEX, "ctx_sessions")
    op.execute("ALTER TABLE ctx_sessions DROP COLUMN idle_bucket")
    op.drop_column("ctx_sessions", "idle_deadline")
    op.drop_column("ctx_sessions", "idle_timeout")
    op.execute(f"ALTER TABLE ctx_sessions ADD COLUMN idle_bucket {OLD_BUCKET[dialect]}")
    op.create_index(INDEX, "ctx_sessions", ["status", "idle_bucket"])
