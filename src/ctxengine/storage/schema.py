"""The one MetaData: every table ctxengine owns. Migrations are compared against it.

Every table carries ``tenant_id``; session ids are unique per tenant.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Double,
    Index,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
)

from .types import JSONDocument, UTCDateTime

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

ID = String(255)

sessions = Table(
    "ctx_sessions",
    metadata,
    Column("tenant_id", ID, nullable=False),
    Column("session_id", ID, nullable=False),
    Column("user_id", ID, nullable=False),
    Column("tier", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("name", Text, nullable=True),
    Column("metadata", JSONDocument, nullable=False),
    Column("tags", JSONDocument, nullable=False),
    Column("preferences", JSONDocument, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("last_activity", UTCDateTime, nullable=False),
    Column("ended_at", UTCDateTime, nullable=True),
    Column("expires_at", UTCDateTime, nullable=True),
    Column("request_count", BigInteger, nullable=False),
    Column("error_count", BigInteger, nullable=False),
    Column("total_processing_time", Double, nullable=False),
    Column("current_chat_id", ID, nullable=True),
    PrimaryKeyConstraint("tenant_id", "session_id"),
    # listing newest first, keyset paging
    Index(None, "tenant_id", "created_at", "session_id"),
    # per-user listing and per-user session limits
    Index(None, "tenant_id", "user_id", "created_at"),
    # the sweep: idle sessions and sessions past their deadline
    Index(None, "status", "last_activity"),
    Index(None, "status", "expires_at"),
)
