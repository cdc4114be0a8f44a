"""The one MetaData: every table ctxengine owns. Migrations are compared against it.

Every table carries ``tenant_id``; session ids are unique per tenant.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Computed,
    Double,
    Float,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    false,
    literal_column,
    text,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

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

#: The width of an idle bucket, in seconds.
IDLE_BUCKET_SECONDS = 10


class idle_bucket(FunctionElement[int]):
    """The idle bucket of an idle deadline (seconds since the epoch): whole
    ``IDLE_BUCKET_SECONDS`` since the epoch; NULL when the deadline is NULL (never idle).

    The sweep finds idle sessions through an index on (status, idle_bucket), a
    column the database computes from ``idle_deadline``, rather than on the deadline
    itself: a touch that stays in its bucket changes no indexed column, so PostgreSQL
    makes it a HOT update, which writes no index entry. Every session write touches,
    and an index on the deadline made each touch add an entry to all five of the
    table's indexes. The bucket only narrows the search: the sweep still compares
    ``idle_deadline`` itself, so it stays exact, and reads the sessions of at most one
    bucket that are not idle yet."""

    type = BigInteger()
    inherit_cache = True


@compiles(idle_bucket, "postgresql")
def _idle_bucket_postgresql(element: idle_bucket, compiler: SQLCompiler, **kw: Any) -> str:
    # written as PostgreSQL shows the generated column's expression, so that comparing
    # the models with the migrated database finds them equal
    seconds = compiler.process(element.clauses, **kw)
    return f"(floor(({seconds} / {IDLE_BUCKET_SECONDS}::double precision)))::bigint"


@compiles(idle_bucket, "sqlite")
def _idle_bucket_sqlite(element: idle_bucket, compiler: SQLCompiler, **kw: Any) -> str:
    seconds = compiler.process(element.clauses, **kw)
    return f"CAST(({seconds} / {IDLE_BUCKET_SECONDS}.0) AS INTEGER)"


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
    # chats the session holds: max_chats_per_session is one conditional UPDATE of this row
    Column("chat_count", BigInteger, nullable=False, server_default="0"),
    # the session's own idle timeout in seconds, fixed at creation; NULL = never idle
    Column("idle_timeout", Double, nullable=True),
    # last_activity + idle_timeout, as seconds since the epoch (set by every touch, in
    # plain arithmetic that every backend does alike); NULL = never idle
    Column("idle_deadline", Double, nullable=True),
    # computed by the database (see idle_bucket); never read into a Session
    Column("idle_bucket", BigInteger, Computed(idle_bucket(literal_column("idle_deadline")))),
    PrimaryKeyConstraint("tenant_id", "session_id"),
    # listing newest first, keyset paging
    Index(None, "tenant_id", "created_at", "session_id"),
    # per-user listing and per-user session limits
    Index(None, "tenant_id", "user_id", "created_at"),
    # the sweep: idle sessions and sessions past their deadline
    Index(None, "status", "idle_bucket"),
    Index(None, "status", "expires_at"),
)


def _owned_by_session() -> ForeignKeyConstraint:
    """Rows a session owns go when the session goes."""
    return ForeignKeyConstraint(
        ["tenant_id", "session_id"],
        ["ctx_sessions.tenant_id", "ctx_sessions.session_id"],
        ondelete="CASCADE",
    )


#: One counter row per (session, resource type): the quota check is one conditional
#: statement on this row. ``quota_limit`` NULL = unlimited; ``custom`` = set by
#: set_quota() (kept across change_tier()).
quotas = Table(
    "ctx_quotas",
    metadata,
    Column("tenant_id", ID, nullable=False),
    Column("session_id", ID, nullable=False),
    Column("resource_type", String(32), nullable=False),
    Column("used", Double, nullable=False),
    Column("quota_limit", Double, nullable=True),
    Column("custom", Boolean, nullable=False),
    PrimaryKeyConstraint("tenant_id", "session_id", "resource_type"),
    _owned_by_session(),
)

usage_records = Table(
    "ctx_usage_records",
    metadata,
    Column("tenant_id", ID, nullable=False),
    Column("record_id", String(36), nullable=False),
    Column("session_id", ID, nullable=False),
    Column("user_id", ID, nullable=False),
    Column("operation", ID, nullable=False),
    Column("resource_type", String(32), nullable=False),
    Column("amount", Double, nullable=False),
    Column("metadata", JSONDocument, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("tenant_id", "record_id"),
    _owned_by_session(),
    Index(None, "tenant_id", "session_id", "created_at"),
    Index(None, "tenant_id", "user_id", "created_at"),
)

#: Custom rate limits (set_rate_limit) per session or per user and operation.
rate_limit_rules = Table(
    "ctx_rate_limit_rules",
    metadata,
    Column("tenant_id", ID, nullable=False),
    Column("scope", String(16), nullable=False),
    Column("subject", ID, nullable=False),
    Column("operation", ID, nullable=False),
    Column("max_calls", BigInteger, nullable=False),
    Column("window_seconds", Double, nullable=False),
    PrimaryKeyConstraint("tenant_id", "scope", "subject", "operation"),
)

#: Limiter state per key: at most 61 sub-window counts, whatever max_calls is.
rate_limit_state = Table(
    "ctx_rate_limit_state",
    metadata,
    Column("tenant_id", ID, nullable=False),
    Column("scope", String(16), nullable=False),
    Column("subject", ID, nullable=False),
    Column("operation", ID, nullable=False),
    Column("window_ms", BigInteger, nullable=False),
    Column("state", JSONDocument, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("tenant_id", "scope", "subject", "operation", "window_ms"),
)

#: Live concurrency slots; a lease counts while ``expires_at`` is in the future.
leases = Table(
    "ctx_leases",
    metadata,
    Column("tenant_id", ID, nullable=False),
    Column("lease_id", String(36), nullable=False),
    Column("session_id", ID, nullable=False),
    Column("operation", ID, nullable=False),
    Column("acquired_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("tenant_id", "lease_id"),
    _owned_by_session(),
    Index(None, "tenant_id", "session_id", "expires_at"),
)


#: Chats of a session. ``next_seq`` is the last sequence number handed out: appends
#: lock this row to take the next one, so message order is commit order.
chats = Table(
    "ctx_chats",
    metadata,
    Column("tenant_id", ID, nullable=False),
    Column("session_id", ID, nullable=False),
    Column("chat_id", ID, nullable=False),
    Column("name", Text, nullable=True),
    Column("metadata", JSONDocument, nullable=False),
    Column("max_messages", BigInteger, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("next_seq", BigInteger, nullable=False),
    Column("message_count", BigInteger, nullable=False),
    # every message not compacted, system messages aside, has a seq above this one (the
    # end of the latest summary's range): history reads never scan compacted messages
    Column("compacted_through", BigInteger, nullable=False, server_default="0"),
    PrimaryKeyConstraint("tenant_id", "session_id", "chat_id"),
    _owned_by_session(),
)

#: Messages; the primary key (chat, seq) is the index every history read scans.
messages = Table(
    "ctx_messages",
    metadata,
    Column("tenant_id", ID, nullable=False),
    Column("session_id", ID, nullable=False),
    Column("chat_id", ID, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("message_id", String(36), nullable=False),
    Column("role", String(16), nullable=False),
    Column("content", Text, nullable=False),
    Column("metadata", JSONDocument, nullable=False),
    Column("tokens", BigInteger, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    # replaced by a summary (compact_history): kept, hidden from the history until purged
    Column("compacted", Boolean, nullable=False, server_default=false()),
    PrimaryKeyConstraint("tenant_id", "session_id", "chat_id", "seq"),
    ForeignKeyConstraint(
        ["tenant_id", "session_id", "chat_id"],
        ["ctx_chats.tenant_id", "ctx_chats.session_id", "ctx_chats.chat_id"],
        ondelete="CASCADE",
    ),
    # a chat's system messages (its prompt, its summary): read with every history page
    # and context window without scanning the chat
    Index(
        "ix_ctx_messages_system",
        "tenant_id",
        "session_id",
        "chat_id",
        "seq",
        sqlite_where=text("role = 'system'"),
        postgresql_where=text("role = 'system'"),
    ),
)

#: A checkpoint holds a copy of the session's chats, messages and metadata as one document.
checkpoints = Table(
    "ctx_checkpoints",
    metadata,
    Column("tenant_id", ID, nullable=False),
    Column("session_id", ID, nullable=False),
    Column("checkpoint_id", String(36), nullable=False),
    Column("description", Text, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("content", JSONDocument, nullable=False),
    PrimaryKeyConstraint("tenant_id", "session_id", "checkpoint_id"),
    _owned_by_session(),
)

#: JSON documents shared by a tenant's sessions (per app, per user, ...), merged in SQL.
shared_state = Table(
    "ctx_shared_state",
    metadata,
    Column("tenant_id", ID, nullable=False),
    Column("key", ID, nullable=False),
    Column("document", JSONDocument, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("tenant_id", "key"),
)

#: Scope columns of memory: "" stands for "none" (no user: the tenant-wide scope; no
#: session: not narrowed), since a primary key column cannot be NULL; identifiers are
#: never empty, so "" is never a real id. The API shows None.
NO_SCOPE = ""

#: Keys compare byte by byte (code point order) on every backend: PostgreSQL's "C"
#: collation, SQLite's default BINARY; listing by key pages the same everywhere.
MEMORY_KEY = ID.with_variant(String(255, collation="C"), "postgresql")

#: Key-value memory (SPEC §13): one row per (tenant, user, session, namespace, key).
#: The primary key is the scope, then the key: prefix listing reads one range of it in
#: key order, and forget_user reads the (tenant, user) range. ``version`` counts the
#: writes since the item was (re)created; ``expires_at`` NULL = never expires. (The
#: semantic half of memory gets tables of its own: ``ctx_memories``.)
memory_items = Table(
    "ctx_memory_items",
    metadata,
    Column("tenant_id", ID, nullable=False),
    Column("user_id", ID, nullable=False),
    Column("session_id", ID, nullable=False),
    Column("namespace", ID, nullable=False),
    Column("key", MEMORY_KEY, nullable=False),
    Column("value", JSONDocument, nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=True),
    # the TTL in seconds the item was last written with (NULL: none, never expires):
    # the LangGraph store's reads with refresh_ttl set expires_at = now + ttl_seconds
    Column("ttl_seconds", Double, nullable=True),
    PrimaryKeyConstraint("tenant_id", "user_id", "session_id", "namespace", "key"),
    # delete_session and purge_sessions: the items narrowed to a session
    Index(None, "tenant_id", "session_id"),
    # the sweep: expired items
    Index(None, "expires_at"),
)


#: Semantic memory (SPEC §13): a text, its metadata and importance, and its vector as
#: ``dimensions`` little-endian float32s of length 1 (cosine = dot product), in a scope
#: (the scope columns as ``ctx_memory_items``'): tenant, user ("" = tenant-wide),
#: session ("" = not narrowed), namespace.
memories = Table(
    "ctx_memories",
    metadata,
    Column("tenant_id", ID, nullable=False),
    Column("memory_id", ID, nullable=False),
    Column("user_id", ID, nullable=False),
    Column("session_id", ID, nullable=False),
    Column("namespace", ID, nullable=False),
    Column("text", Text, nullable=False),
    Column("metadata", JSONDocument, nullable=False),
    Column("importance", Float, nullable=False),
    Column("dimensions", Integer, nullable=False),
    Column("embedding", LargeBinary, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("last_accessed_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=True),
    # where the memory came from (a message, an ADK event): one memory per source
    Column("source", Text, nullable=True),
    PrimaryKeyConstraint("tenant_id", "memory_id"),
    Index(None, "tenant_id", "source", unique=True),
    # retention by max_memories_per_user ranks a user's memories of every namespace
    Index(None, "tenant_id", "user_id"),
    # a search reads one scope: the user's memories (their sessions' included) and the
    # tenant-wide ones, of one namespace
    Index(None, "tenant_id", "namespace", "user_id"),
    # delete_session and purge_sessions: the memories narrowed to a session
    Index(None, "tenant_id", "session_id"),
    # the sweep: expired memories
    Index(None, "expires_at"),
)


#: Checkpoint ids and channel versions compare byte by byte on every backend (the
#: newest checkpoint is the greatest id), as memory keys do.
GRAPH_ID = MEMORY_KEY

#: LangGraph checkpoints (``ctxengine.integrations.langgraph.ContextEngineSaver``): a
#: thread is a session. Each row is one checkpoint of one namespace, serialized by the
#: saver's serializer without its channel values (``type``, ``checkpoint``), which are
#: rows of ``ctx_graph_blobs``, stored once per channel version. ``metadata`` is JSON,
#: for listing filters. Checkpoint ids grow with time: the newest is the greatest.
graph_checkpoints = Table(
    "ctx_graph_checkpoints",
    metadata,
    Column("tenant_id", ID, nullable=False),
    Column("session_id", ID, nullable=False),
    Column("checkpoint_ns", Text, nullable=False),
    Column("checkpoint_id", GRAPH_ID, nullable=False),
    Column("parent_checkpoint_id", GRAPH_ID, nullable=True),
    Column("type", String(64), nullable=False),
    Column("checkpoint", LargeBinary, nullable=False),
    Column("metadata", JSONDocument, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("tenant_id", "session_id", "checkpoint_ns", "checkpoint_id"),
    _owned_by_session(),
)

#: The value of one channel of a thread's namespace at one version, written once (a
#: checkpoint names the version of each of its channels); ``type`` "empty": the channel
#: had no value at that version.
graph_blobs = Table(
    "ctx_graph_blobs",
    metadata,
    Column("tenant_id", ID, nullable=False),
    Column("session_id", ID, nullable=False),
    Column("checkpoint_ns", Text, nullable=False),
    Column("channel", Text, nullable=False),
    Column("version", GRAPH_ID, nullable=False),
    Column("type", String(64), nullable=False),
    Column("blob", LargeBinary, nullable=True),
    PrimaryKeyConstraint("tenant_id", "session_id", "checkpoint_ns", "channel", "version"),
    _owned_by_session(),
)

#: Pending writes of the tasks of a checkpoint: ``idx`` the write's place among its
#: task's writes, negative for LangGraph's special channels (errors, interrupts...).
graph_writes = Table(
    "ctx_graph_writes",
    metadata,
    Column("tenant_id", ID, nullable=False),
    Column("session_id", ID, nullable=False),
    Column("checkpoint_ns", Text, nullable=False),
    Column("checkpoint_id", GRAPH_ID, nullable=False),
    Column("task_id", ID, nullable=False),
    Column("idx", Integer, nullable=False),
    Column("channel", Text, nullable=False),
    Column("type", String(64), nullable=False),
    Column("blob", LargeBinary, nullable=False),
    Column("task_path", Text, nullable=False),
    PrimaryKeyConstraint(
        "tenant_id", "session_id", "checkpoint_ns", "checkpoint_id", "task_id", "idx"
    ),
    _owned_by_session(),
)
