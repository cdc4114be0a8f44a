"""Sessions: the sweep's index on a coarse idle bucket instead of last_activity, so
that touches are HOT updates on PostgreSQL.

``idle_bucket`` is whole 10-second periods since the epoch of ``last_activity``,
computed by the database: stored on PostgreSQL (adding it rewrites ctx_sessions, under
an exclusive lock), virtual on SQLite. The sessions table keeps 10 % of each page free
on PostgreSQL so that an updated row fits beside its old version.

Revision ID: 0006_idle_bucket
Revises: 0005_rate_limit_take
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006_idle_bucket"
down_revision: str | None = "0005_rate_limit_take"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BUCKET = {
    "postgresql": "BIGINT GENERATED ALWAYS AS "
    "((floor(EXTRACT(epoch FROM last_activity - to_timestamp(0)) / 10))::bigint) STORED",
    "sqlite": "BIGINT GENERATED ALWAYS AS "
    "((CAST(strftime('%s', last_activity) AS INTEGER) / 10)) VIRTUAL",
}


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute("ALTER TABLE ctx_sessions SET (fillfactor = 90)")
    op.execute(f"ALTER TABLE ctx_sessions ADD COLUMN idle_bucket {BUCKET[dialect]}")
    op.create_index("ix_ctx_sessions_status_idle_bucket", "ctx_sessions", ["status", "idle_bucket"])
    op.drop_index("ix_ctx_sessions_status_last_activity", "ctx_sessions")


def downgrade() -> None:
    op.create_index(
        "ix_ctx_sessions_status_last_activity", "ctx_sessions", ["status", "last_activity"]
    )
    op.drop_index("ix_ctx_sessions_status_idle_bucket", "ctx_sessions")
    op.execute("ALTER TABLE ctx_sessions DROP COLUMN idle_bucket")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE ctx_sessions RESET (fillfactor)")
