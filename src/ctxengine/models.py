"""Public data models: frozen pydantic snapshots and string enums."""

from __future__ import annotations

import math
from datetime import datetime
from enum import Enum, StrEnum
from typing import Any, Final, Literal, Self

from pydantic import BaseModel, ConfigDict, Field

from .lifecycle import OPEN_STATUSES, SessionStatus, is_live

__all__ = [
    "FROM_SETTINGS",
    "Chat",
    "Checkpoint",
    "ContextWindow",
    "Event",
    "FromSettings",
    "MemoryHit",
    "MemoryImportResult",
    "MemoryItem",
    "MemoryRecord",
    "Message",
    "QuotaStatus",
    "QuotaType",
    "RateLimitStatus",
    "RateLimitType",
    "Session",
    "SessionStats",
    "SessionStatus",
    "SessionTemplate",
    "Statistics",
    "UsageRecord",
    "UserAnalytics",
]


class FromSettings(Enum):
    """The type of :data:`FROM_SETTINGS`."""

    FROM_SETTINGS = "from settings"


#: The default of an argument whose None has a meaning of its own ("never",
#: "unlimited"): the engine's setting applies, e.g. ``create_session(idle_timeout=...)``.
FROM_SETTINGS: Final[Literal[FromSettings.FROM_SETTINGS]] = FromSettings.FROM_SETTINGS


class QuotaType(StrEnum):
    """Resource types a quota can limit."""

    API_CALLS = "api_calls"
    TOKENS = "tokens"
    STORAGE = "storage"
    BANDWIDTH = "bandwidth"
    COMPUTE_TIME = "compute_time"
    CONCURRENT_REQUESTS = "concurrent_requests"


class RateLimitType(StrEnum):
    """Standard rate-limit windows."""

    PER_SECOND = "per_second"
    PER_MINUTE = "per_minute"
    PER_HOUR = "per_hour"
    PER_DAY = "per_day"


# The slots of a pydantic model, set as ``model_construct`` does but through their
# descriptors directly (a frozen model refuses ``setattr``): faster than
# ``object.__setattr__`` by name (a Message: 0.78 -> 0.58 µs), on long reads.
_set_dict = BaseModel.__dict__["__dict__"].__set__
_set_fields_set = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_set_extra = BaseModel.__dict__["__pydantic_extra__"].__set__
_set_private = BaseModel.__dict__["__pydantic_private__"].__set__
#: The names of each model's fields, as the fields set of every instance built by
#: ``_trusted``: one set shared by them all (a frozen model never adds to it, and
#: pydantic copies it before changing a copy's). Long reads keep one object fewer
#: per row for the garbage collector to count and traverse.
_ALL_FIELDS: dict[type[BaseModel], set[str]] = {}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe data (datetimes as ISO 8601 strings)."""
        return self.model_dump(mode="json")

    @classmethod
    def _trusted(cls, values: dict[str, Any]) -> Self:
        """An instance from values that are already valid and complete (every field),
        such as a row read back from the database: like ``model_construct`` without its
        per-field bookkeeping, which dominates reading long histories."""
        fields = _ALL_FIELDS.get(cls)
        if fields is None:
            fields = _ALL_FIELDS[cls] = set(cls.model_fields)
        instance = cls.__new__(cls)
        _set_dict(instance, values)
        _set_fields_set(instance, fields)
        _set_extra(instance, None)
        _set_private(instance, None)
        return instance


class Session(_Frozen):
    """A snapshot of one session, read at ``observed_at``."""

    session_id: str
    user_id: str
    tenant_id: str = "default"
    tier: str = "free"
    status: SessionStatus
    name: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    tags: list[str] = Field(default_factory=list)
    preferences: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime
    last_activity: datetime
    ended_at: datetime | None = None
    expires_at: datetime | None = None
    request_count: int = 0
    error_count: int = 0
    total_processing_time: float = 0.0
    concurrent_operations: int = 0
    current_chat_id: str | None = None
    #: Seconds of idleness after which the session expires; None = never for idleness.
    idle_timeout: float | None = None
    observed_at: datetime

    @property
    def is_active(self) -> bool:
        """True when the stored status is active."""
        return self.status is SessionStatus.ACTIVE

    @property
    def is_paused(self) -> bool:
        """True when the stored status is paused."""
        return self.status is SessionStatus.PAUSED

    @property
    def age_seconds(self) -> float:
        """Seconds from creation to ``observed_at`` (0.0 if a clock stepped back)."""
        return max((self.observed_at - self.created_at).total_seconds(), 0.0)

    @property
    def idle_seconds(self) -> float:
        """Seconds from the last activity to ``observed_at`` (0.0 if a clock stepped back)."""
        return max((self.observed_at - self.last_activity).total_seconds(), 0.0)

    @property
    def error_rate(self) -> float:
        """Errors per request (0.0 with no requests)."""
        return self.error_count / self.request_count if self.request_count else 0.0

    @property
    def average_processing_time(self) -> float:
        """Mean processing time per request in seconds (0.0 with no requests)."""
        return self.total_processing_time / self.request_count if self.request_count else 0.0

    def is_expired(self, max_idle_seconds: float | None = None) -> bool:
        """True when expired, or active/paused and, at ``observed_at``, past
        ``expires_at`` or idle longer than ``max_idle_seconds`` (default: the session's
        own ``idle_timeout``; with neither, idleness never expires it)."""
        if self.status is SessionStatus.EXPIRED:
            return True
        if self.status not in OPEN_STATUSES:
            return False
        # the rule of ctxengine.lifecycle, which the engine's statements apply
        idle_limit = self.idle_timeout if max_idle_seconds is None else max_idle_seconds
        return not is_live(self.last_activity, idle_limit, self.expires_at, self.observed_at)


class Event(_Frozen):
    """Something that happened, published after it was committed."""

    type: str
    session_id: str | None = None
    user_id: str | None = None
    tenant_id: str = "default"
    at: datetime
    data: dict[str, Any] = Field(default_factory=dict)


class Statistics(_Frozen):
    """Aggregates over every session of a tenant, computed in SQL."""

    total_sessions: int
    sessions_by_status: dict[str, int]
    active_sessions: int
    total_users: int
    average_sessions_per_user: float
    total_requests: int
    total_errors: int
    error_rate: float
    average_processing_time: float
    total_messages: int = 0
    usage_by_resource: dict[str, float] = Field(default_factory=dict)


class SessionStats(_Frozen):
    """Per-session conversation statistics."""

    session_id: str
    chat_count: int
    total_messages: int
    created_at: datetime
    last_activity: datetime
    is_active: bool
    is_paused: bool


class Chat(_Frozen):
    """A conversation thread inside a session."""

    chat_id: str
    session_id: str
    name: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    max_messages: int | None = None
    created_at: datetime
    message_count: int = 0


class Message(_Frozen):
    """One message of a chat; ``seq`` orders messages exactly. ``compacted``: replaced
    by a summary (``compact_history``), shown only with ``include_compacted=True``."""

    message_id: str
    chat_id: str
    session_id: str
    seq: int
    role: str
    content: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    tokens: int | None = None
    created_at: datetime
    compacted: bool = False


class ContextWindow(_Frozen):
    """What ``get_context`` returns: the ``messages`` to send, in order (system messages
    and the latest summary first, then the newest whole turns), their ``tokens`` in all,
    the ``max_tokens`` asked for, and whether the chat's whole history is in it
    (``complete``; False: older turns were left out). ``tokens`` passes ``max_tokens``
    only when the system messages and the summary alone do."""

    messages: list[Message]
    tokens: int
    max_tokens: int
    complete: bool


class Checkpoint(_Frozen):
    """A saved copy of a session's messages and metadata."""

    checkpoint_id: str
    session_id: str
    description: str = ""
    created_at: datetime


class MemoryItem(_Frozen):
    """One key-value memory (SPEC §13) and its scope: ``user_id`` None is the tenant-wide
    scope, ``session_id`` None is not narrowed to a session. ``version`` counts the
    writes since the item was created (the first is 1); ``expires_at`` None: never."""

    key: str
    value: Any
    version: int
    user_id: str | None = None
    session_id: str | None = None
    namespace: str = "default"
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None = None


class MemoryRecord(_Frozen):
    """One semantic memory (SPEC §13): a text found by meaning, in a scope as
    :class:`MemoryItem`'s. ``importance`` ranks memories for retention;
    ``last_accessed_at`` is when a search last returned it; ``source`` names where it
    came from (a tenant holds one memory per source)."""

    memory_id: str
    text: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    importance: float = 1.0
    user_id: str | None = None
    session_id: str | None = None
    namespace: str = "default"
    created_at: datetime
    last_accessed_at: datetime
    expires_at: datetime | None = None
    source: str | None = None


class MemoryHit(_Frozen):
    """A memory a search found, and its cosine similarity to the query (-1 to 1)."""

    record: MemoryRecord
    score: float


class MemoryImportResult(_Frozen):
    """What ``import_memories`` did: the user the memories went to (None: the
    tenant-wide scope), key-value items written or already stored alike, semantic
    memories added or already present, and entries not written because they expired
    since the export."""

    user_id: str | None
    items_written: int
    items_unchanged: int
    memories_added: int
    memories_present: int
    expired: int


class UsageRecord(_Frozen):
    """One accepted use of a resource."""

    record_id: str
    session_id: str
    user_id: str
    operation: str
    resource_type: QuotaType
    amount: float
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime


class QuotaStatus(_Frozen):
    """Use of one quota; ``limit`` and ``remaining`` are None when unlimited."""

    used: float
    limit: float | None
    remaining: float | None
    usage_percentage: float

    @classmethod
    def of(cls, used: float, limit: float | None) -> QuotaStatus:
        """Build the status of a quota from what is used and its limit."""
        if limit is None:
            return cls(used=used, limit=None, remaining=None, usage_percentage=0.0)
        pct = 100.0 * used / limit if limit > 0 else (0.0 if used == 0 else math.inf)
        return cls(used=used, limit=limit, remaining=max(limit - used, 0), usage_percentage=pct)


class RateLimitStatus(_Frozen):
    """Where a rate limit stands after (or before) a call; ``limit`` and ``remaining``
    are None when no limit applies."""

    limit: int | None
    remaining: int | None
    reset_after: float


class UserAnalytics(_Frozen):
    """Aggregates over one user's sessions and usage."""

    user_id: str
    total_sessions: int
    active_sessions: int
    total_operations: int
    operation_breakdown: dict[str, int]
    resource_usage: dict[QuotaType, float]
    most_used_operation: str | None


class SessionTemplate(_Frozen):
    """Defaults for creating similar sessions."""

    name: str
    system_prompt: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    tier: str = "free"
    tags: list[str] = Field(default_factory=list)
