"""Engine settings (from code or ``CTXENGINE_*`` environment variables) and tiers."""

from __future__ import annotations

import difflib
import re
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic import ValidationError as PydanticValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from .embeddings import Embedder
from .errors import ValidationError
from .models import QuotaType, RateLimitType
from .tokens import Summarizer, TokenCounter

__all__ = ["DEFAULT_TIERS", "EngineSettings", "TierPolicy"]


class TierPolicy(BaseModel):
    """The limits a tier grants: quotas, rate limits and a concurrency cap (None = unlimited)."""

    model_config = ConfigDict(frozen=True)

    name: str
    quotas: dict[QuotaType, int | None] = Field(default_factory=dict)
    rate_limits: dict[RateLimitType, int | None] = Field(default_factory=dict)
    max_concurrent: int | None = None


def _tier(name: str, scale: int | None, concurrent: int | None) -> TierPolicy:
    if scale is None:
        return TierPolicy(
            name=name,
            quotas=dict.fromkeys(QuotaType),
            rate_limits=dict.fromkeys(RateLimitType),
            max_concurrent=None,
        )
    return TierPolicy(
        name=name,
        quotas={
            QuotaType.API_CALLS: 1_000 * scale,
            QuotaType.TOKENS: 100_000 * scale,
            QuotaType.STORAGE: 100_000_000 * scale,
            QuotaType.BANDWIDTH: 1_000_000_000 * scale,
            QuotaType.COMPUTE_TIME: 3_600 * scale,
            QuotaType.CONCURRENT_REQUESTS: concurrent,
        },
        rate_limits={
            RateLimitType.PER_SECOND: 2 * scale,
            RateLimitType.PER_MINUTE: 60 * scale,
            RateLimitType.PER_HOUR: 1_000 * scale,
            RateLimitType.PER_DAY: 10_000 * scale,
        },
        max_concurrent=concurrent,
    )


DEFAULT_TIERS: dict[str, TierPolicy] = {
    "free": _tier("free", 1, 2),
    "basic": _tier("basic", 5, 5),
    "pro": _tier("pro", 25, 20),
    "enterprise": _tier("enterprise", None, None),
}


class EngineSettings(BaseSettings):
    """Settings of a :class:`~ctxengine.ContextEngine`; every field reads ``CTXENGINE_<NAME>``.

    An unknown name or a bad value raises :class:`ctxengine.errors.ValidationError`
    (other ``CTXENGINE_*`` environment variables are not settings and are ignored).
    """

    model_config = SettingsConfigDict(
        env_prefix="CTXENGINE_",
        frozen=True,
        extra="forbid",
        env_parse_none_str="none",
        arbitrary_types_allowed=True,
    )

    database_url: str | None = Field(
        default=None,
        description="the URL used when ContextEngine() is given none; None = ./ctxengine.db",
    )

    session_timeout: float | None = Field(
        default=1800.0,
        gt=0,
        allow_inf_nan=False,
        description="seconds of idleness after which a session expires; None = never",
    )
    auto_cleanup: bool = True
    cleanup_interval: float = Field(default=60.0, gt=0, allow_inf_nan=False)
    max_active_sessions: int | None = Field(default=None, ge=0)
    max_sessions_per_user: int | None = Field(default=None, ge=0)
    max_chats_per_session: int | None = Field(default=None, ge=1)
    max_messages_per_chat: int | None = Field(default=1000, ge=1)
    history_overflow: Literal["trim", "reject", "compact"] = Field(
        default="trim",
        description="past a chat's cap: drop the oldest whole turns, refuse the append, "
        "or (with a summarizer) commit it and compact the chat in the background",
    )
    summarizer: Summarizer | None = Field(
        default=None,
        exclude=True,
        description="what history_overflow='compact' summarizes old turns with: "
        "await summarizer(messages) -> str",
    )
    token_counter: TokenCounter | None = Field(
        default=None,
        exclude=True,
        description="counts the tokens of a message given none (get_context, "
        "max_context_tokens); None: ctxengine.tokens.estimate_tokens",
    )
    max_context_tokens: int | None = Field(
        default=None,
        ge=1,
        description="with history_overflow='compact': a chat whose history passes this "
        "many tokens is compacted too",
    )
    compact_keep_last_turns: int = Field(
        default=4,
        ge=0,
        description="the newest whole turns an automatic compaction leaves as they are",
    )
    auto_migrate: bool = True
    tiers: dict[str, TierPolicy] = Field(default_factory=lambda: dict(DEFAULT_TIERS))
    redact_patterns: tuple[str, ...] = ()
    embedder: Embedder | None = Field(
        default=None,
        exclude=True,
        description="what embeds the texts of semantic memory (ctxengine.embeddings); "
        "None: add_memory and search_memory need an embedding given",
    )
    max_memories_per_user: int | None = Field(
        default=None,
        ge=1,
        description="most semantic memories a user keeps (every namespace); adding one "
        "more evicts the lowest importance, then the least recently accessed",
    )
    max_metadata_bytes: int = Field(default=65536, ge=2)
    max_message_bytes: int = Field(
        default=1_048_576, ge=1, description="largest message content, in bytes of UTF-8"
    )
    lease_ttl: float = Field(default=30.0, gt=0, allow_inf_nan=False)
    pool_size: int = Field(
        default=10,
        ge=1,
        description="connections a process keeps open (PostgreSQL; SQLite files: kept "
        "idle); calls beyond them wait for one, up to pool_timeout",
    )
    max_overflow: int = Field(
        default=0,
        ge=0,
        description="PostgreSQL: connections opened above pool_size under load and closed "
        "when returned (a connection opened and closed per call when calls outnumber "
        "pool_size); 0 = calls wait for one of pool_size instead",
    )
    pool_timeout: float = Field(default=30.0, gt=0)
    pool_recycle: float = Field(default=1800.0, gt=0)
    pool_pre_ping: bool = Field(
        default=False,
        description="PostgreSQL: ping every pooled connection before use (one round trip); "
        "off, only connections idle for over 10 s are pinged and closed ones are replaced",
    )
    cross_process_events: bool = Field(
        default=False,
        description="PostgreSQL: also deliver events committed by other engines on the database",
    )
    events_url: str | None = Field(
        default=None,
        description="PostgreSQL: the URL cross_process_events listens on, a direct "
        "connection to the server when the engine's URL goes through a pooler in "
        "transaction mode (LISTEN needs a session of its own); None = the engine's URL",
    )
    transaction_pooling: bool = Field(
        default=False,
        description="PostgreSQL: the engine's URL reaches the server through a pooler in "
        "transaction mode (PgBouncer pool_mode=transaction): no statement stays prepared "
        "on a server connection (one more round trip per statement) and no setting is "
        "sent when connecting (statement_timeout is then bounded by the client only); "
        "cross_process_events needs events_url",
    )
    connect_timeout: float = Field(
        default=10.0,
        gt=0,
        allow_inf_nan=False,
        description="PostgreSQL: seconds to open a connection, or to wait for a pooled one "
        "(pool_timeout counts at most this long); SQLite: does not apply",
    )
    statement_timeout: float | None = Field(
        default=30.0,
        gt=0,
        allow_inf_nan=False,
        description="PostgreSQL: seconds a statement may run (the server cancels it) or "
        "go unanswered (the client gives up); a call, its retries included, raises "
        "StorageTimeoutError within connect_timeout + statement_timeout; None = no "
        "statement timeout and no bound on a call; SQLite: does not apply",
    )
    sqlite_busy_timeout: float = Field(
        default=30.0,
        gt=0,
        description="seconds SQLite waits for a lock another connection or process holds",
    )
    transient_retries: int = Field(
        default=5, ge=0, description="retries of a transaction on a transient error"
    )

    if not TYPE_CHECKING:  # type checkers keep the typed constructor derived from the fields

        def __init__(self, **values: Any) -> None:
            try:
                super().__init__(**values)
            except PydanticValidationError as exc:
                raise _settings_error(exc) from None

    @field_validator("redact_patterns")
    @classmethod
    def _patterns_compile(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(
                    f"redact pattern {pattern!r} is not a valid regex: {exc}"
                ) from None
        return patterns

    @model_validator(mode="after")
    def _events_need_a_session(self) -> EngineSettings:
        if self.cross_process_events and self.transaction_pooling and self.events_url is None:
            raise ValueError(
                "cross_process_events through a pooler in transaction mode needs events_url, "
                "a direct connection to the server (LISTEN keeps a session of its own)"
            )
        return self

    @model_validator(mode="after")
    def _compaction_needs_a_summarizer(self) -> EngineSettings:
        if self.history_overflow == "compact" and self.summarizer is None:
            raise ValueError("history_overflow='compact' needs a summarizer")
        if self.max_context_tokens is not None and self.history_overflow != "compact":
            raise ValueError(
                "max_context_tokens applies with history_overflow='compact' (and a "
                "summarizer); get_context(max_tokens=...) takes a budget per call"
            )
        return self

    @field_validator("tiers")
    @classmethod
    def _tier_names_match(cls, tiers: dict[str, TierPolicy]) -> dict[str, TierPolicy]:
        for key, policy in tiers.items():
            if key != policy.name:
                raise ValueError(f"tier key {key!r} differs from its policy name {policy.name!r}")
        return tiers


def _settings_error(exc: PydanticValidationError) -> ValidationError:
    """Pydantic's error as ours, naming the first offending setting."""
    first = exc.errors()[0]
    name = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        close = difflib.get_close_matches(name, EngineSettings.model_fields, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        message = f"unknown setting {name!r}{hint}"
    elif not name:  # a rule across settings
        message = f"settings: {first['msg'].removeprefix('Value error, ')}"
    else:
        message = f"setting {name!r}: {first['msg']} (got {first.get('input')!r})"
    more = exc.error_count() - 1
    if more:
        message += f" (and {more} more error{'s' if more > 1 else ''})"
    return ValidationError(message, field=name, value=first.get("input"))
