"""The session API, bound to one tenant. ``ContextEngine`` is the view of "default"."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from types import EllipsisType
from typing import TYPE_CHECKING, Any, overload

from . import validation as v
from .errors import EngineClosedError, ValidationError, WrongEventLoopError
from .events import EVENT_TYPES, EventStream, Handler
from .lifecycle import END_STATUSES
from .models import (
    FROM_SETTINGS,
    Chat,
    Checkpoint,
    ContextWindow,
    FromSettings,
    MemoryHit,
    MemoryImportResult,
    MemoryItem,
    MemoryRecord,
    Message,
    QuotaStatus,
    QuotaType,
    RateLimitStatus,
    RateLimitType,
    Session,
    SessionStats,
    SessionStatus,
    SessionTemplate,
    Statistics,
    UsageRecord,
    UserAnalytics,
)
from .services.chats import NewMessage
from .services.conversation import ConversationService
from .services.memory import scope as _memory_scope
from .services.usage import quota_type, usage_callback
from .tokens import Summarizer
from .tracking import RequestTracker, track_request

if TYPE_CHECKING:
    from .runtime import Host, Runtime

_TEMPLATE_OVERRIDES = frozenset(
    {
        "session_id",
        "tier",
        "metadata",
        "name",
        "tags",
        "preferences",
        "expires_at",
        "idle_timeout",
        "max_messages",
        "system_prompt",
    }
)


def _new_message(conversation: ConversationService, item: Mapping[str, Any]) -> NewMessage:
    if not isinstance(item, Mapping) or not {"role", "content"} <= set(item):
        raise ValidationError(
            "each message must be a mapping with 'role' and 'content'", field="messages"
        )
    return conversation.new_message(
        item["role"], item["content"], item.get("metadata"), item.get("tokens")
    )


#: Capacity of an ``events()`` stream before the oldest events are dropped.
STREAM_CAPACITY = 1000


def _event_types(types: Sequence[str]) -> tuple[str, ...]:
    unknown = [t for t in types if t not in EVENT_TYPES]
    if unknown:
        raise ValidationError(
            f"unknown event types {unknown}; known: {', '.join(sorted(EVENT_TYPES))}",
            field="event_types",
        )
    return tuple(types)


class TenantView:
    """Every session call, confined to one tenant: reads, writes, counts and expiry
    never see another tenant's rows. Get one with ``engine.tenant("acme")``."""

    def __init__(self, engine: Host, tenant_id: str) -> None:
        self._engine = engine
        self._tenant = v.identifier(tenant_id, "tenant_id")

    @property
    def tenant_id(self) -> str:
        """The tenant this view reads and writes."""
        return self._tenant

    def _runtime(self) -> Runtime:
        """The open engine's services, for a call on the event loop that opened it
        (EngineClosedError, WrongEventLoopError). Every public call passes here."""
        runtime = self._engine._live
        if runtime is None:
            raise EngineClosedError(self._engine._state)
        try:
            if asyncio.get_running_loop() is runtime.loop:
                return runtime
        except RuntimeError:  # no loop running: a plain member called by the loop's thread
            if threading.get_ident() == runtime.thread:
                return runtime
        raise WrongEventLoopError()

    def tenant(self, tenant_id: str) -> TenantView:
        """A view of the same engine confined to ``tenant_id``."""
        return TenantView(self._engine, tenant_id)

    # -- sessions -----------------------------------------------------------------------
    async def create_session(
        self,
        session_id: str | None = None,
        user_id: str | None = None,
        *,
        tier: str = "free",
        metadata: dict[str, Any] | None = None,
        name: str | None = None,
        tags: Sequence[str] | None = None,
        preferences: dict[str, Any] | None = None,
        expires_at: datetime | None = None,
        idle_timeout: float | FromSettings | None = FROM_SETTINGS,
        max_messages: int | FromSettings | None = FROM_SETTINGS,
        system_prompt: str | None = None,
    ) -> Session:
        """Create an active session (a time-ordered id is generated when none is given)
        with its default chat; ``system_prompt`` becomes that chat's first message.

        ``idle_timeout``: seconds of idleness after which the session expires (None:
        never for idleness; ``expires_at`` still applies); ``max_messages``: the default
        chat's message cap (None: no cap). Both default to the engine's settings
        (``session_timeout``, ``max_messages_per_chat``) and are fixed at creation.

        Raises SessionExistsError, SessionLimitError, ValidationError."""
        if user_id is None:
            raise ValidationError("user_id is required", field="user_id")
        return await self._create(
            session_id,
            user_id,
            exist_ok=False,
            tier=tier,
            metadata=metadata,
            name=name,
            tags=tags,
            preferences=preferences,
            expires_at=expires_at,
            idle_timeout=idle_timeout,
            max_messages=max_messages,
            system_prompt=system_prompt,
        )

    async def _create(
        self, session_id: str | None, user_id: str, *, system_prompt: str | None, **kw: Any
    ) -> Session:
        runtime = self._runtime()
        prompt = (
            None
            if system_prompt is None
            else runtime.conversation.new_message("system", system_prompt)
        )
        return await runtime.sessions.create(
            self._tenant, session_id, user_id, system_prompt=prompt, **kw
        )

    async def create_session_from_template(
        self, template: SessionTemplate, user_id: str, **overrides: Any
    ) -> Session:
        """Create a session from ``template``: its tier, tags, metadata and system prompt,
        and its name as the session's name. ``overrides`` are create_session()
        arguments that replace the template's values; ``metadata`` is merged over the
        template's metadata."""
        if not isinstance(template, SessionTemplate):
            raise ValidationError("template must be a SessionTemplate", field="template")
        unknown = set(overrides) - _TEMPLATE_OVERRIDES
        if unknown:
            raise ValidationError(
                f"unknown overrides {sorted(unknown)}; allowed: {sorted(_TEMPLATE_OVERRIDES)}",
                field="overrides",
            )
        options: dict[str, Any] = {
            "tier": template.tier,
            "tags": template.tags,
            "name": template.name,
            "system_prompt": template.system_prompt,
            **overrides,
            "metadata": {**template.metadata, **(overrides.get("metadata") or {})},
        }
        return await self.create_session(user_id=user_id, **options)

    async def get_or_create_session(
        self,
        session_id: str,
        user_id: str,
        *,
        tier: str = "free",
        metadata: dict[str, Any] | None = None,
        name: str | None = None,
        tags: Sequence[str] | None = None,
        preferences: dict[str, Any] | None = None,
        expires_at: datetime | None = None,
        idle_timeout: float | FromSettings | None = FROM_SETTINGS,
        max_messages: int | FromSettings | None = FROM_SETTINGS,
        system_prompt: str | None = None,
    ) -> Session:
        """The session with this id as stored, or created with these create_session()
        arguments if it does not exist yet (safe under concurrent callers)."""
        v.identifier(session_id)
        return await self._create(
            session_id,
            user_id,
            exist_ok=True,
            tier=tier,
            metadata=metadata,
            name=name,
            tags=tags,
            preferences=preferences,
            expires_at=expires_at,
            idle_timeout=idle_timeout,
            max_messages=max_messages,
            system_prompt=system_prompt,
        )

    async def get_session(self, session_id: str) -> Session | None:
        """The stored session, or None. Never changes state."""
        return await self._runtime().sessions.get(self._tenant, session_id)

    async def update_session(
        self,
        session_id: str,
        *,
        increment_requests: bool = False,
        add_processing_time: float = 0.0,
        mark_error: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> Session:
        """Add to the counters and merge ``metadata`` atomically; touches last_activity.

        The session must be active (SessionNotActiveError, SessionExpiredError)."""
        return await self._runtime().sessions.record(
            self._tenant,
            session_id,
            requests=int(bool(increment_requests)),
            errors=int(bool(mark_error)),
            processing_time=add_processing_time,
            metadata=metadata,
        )

    async def touch(self, session_id: str) -> Session:
        """Record activity on an active session."""
        return await self._runtime().sessions.record(self._tenant, session_id, operation="touch")

    async def pause_session(self, session_id: str) -> Session:
        """active → paused."""
        return await self._runtime().sessions.transition(
            self._tenant, session_id, SessionStatus.PAUSED
        )

    async def resume_session(self, session_id: str) -> Session:
        """paused → active."""
        return await self._runtime().sessions.transition(
            self._tenant, session_id, SessionStatus.ACTIVE
        )

    async def end_session(
        self, session_id: str, status: SessionStatus | str = SessionStatus.COMPLETED
    ) -> Session:
        """Move to completed, failed or expired (final). Ending again with the same
        status returns the session unchanged."""
        target = v.end_status(status)
        return await self._runtime().sessions.transition(self._tenant, session_id, target)

    async def delete_session(self, session_id: str) -> bool:
        """Remove the session and everything it owns; False when it did not exist."""
        return await self._runtime().sessions.delete(self._tenant, session_id)

    async def list_sessions(
        self,
        *,
        user_id: str | None = None,
        status: SessionStatus | str | None = None,
        tier: str | None = None,
        tags: Sequence[str] | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        idle_for: float | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> list[Session]:
        """One page of sessions, newest first. ``cursor`` is the ``session_id`` of the
        last session of the previous page (keyset paging)."""
        f = self._runtime().sessions.make_filter(
            user_id, status, tier, tags, created_after, created_before, idle_for
        )
        return await self._runtime().sessions.page(self._tenant, f, limit, cursor)

    async def iter_sessions(
        self,
        *,
        user_id: str | None = None,
        status: SessionStatus | str | None = None,
        tier: str | None = None,
        tags: Sequence[str] | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        idle_for: float | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> AsyncIterator[Session]:
        """Every matching session, newest first, fetched ``limit`` at a time."""
        sessions = self._runtime().sessions
        f = sessions.make_filter(
            user_id, status, tier, tags, created_after, created_before, idle_for
        )
        async for session in sessions.iterate(self._tenant, f, limit, cursor):
            yield session

    async def count_sessions(
        self,
        *,
        user_id: str | None = None,
        status: SessionStatus | str | None = None,
        tier: str | None = None,
        tags: Sequence[str] | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        idle_for: float | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> int:
        """How many sessions match the filters (``limit`` and ``cursor`` are ignored)."""
        sessions = self._runtime().sessions
        f = sessions.make_filter(
            user_id, status, tier, tags, created_after, created_before, idle_for
        )
        return await sessions.count(self._tenant, f)

    async def get_user_sessions(self, user_id: str) -> list[Session]:
        """Every session of ``user_id``, newest first."""
        sessions = self._runtime().sessions
        f = sessions.make_filter(user_id=v.identifier(user_id, "user_id"))
        return await sessions.page(self._tenant, f, None, None)

    async def cleanup_inactive_sessions(self, max_idle_seconds: float | None = None) -> int:
        """Expire every active or paused session idle longer than its own
        ``idle_timeout`` (or, when given, than ``max_idle_seconds``, which applies to
        every session, those without a timeout included) or past its ``expires_at``;
        the number expired."""
        return await self._runtime().sessions.expire_stale(self._tenant, max_idle_seconds)

    async def purge_sessions(
        self,
        *,
        ended_before: datetime,
        statuses: Sequence[SessionStatus | str] = tuple(sorted(END_STATUSES)),
    ) -> int:
        """Delete ended sessions whose end is older than ``ended_before``; the number deleted."""
        return await self._runtime().sessions.purge(self._tenant, ended_before, statuses)

    # -- conversation -------------------------------------------------------------------
    async def create_chat(
        self,
        session_id: str,
        name: str | None = None,
        *,
        system_prompt: str | None = None,
        metadata: dict[str, Any] | None = None,
        max_messages: int | FromSettings | None = FROM_SETTINGS,
        chat_id: str | None = None,
    ) -> Chat:
        """Add a chat to an active session (ChatLimitError past max_chats_per_session);
        ``system_prompt`` becomes its first message; ``max_messages`` caps it (None: no
        cap; default ``max_messages_per_chat``). The current chat stays as it is: use
        switch_chat() to write to the new one by default."""
        return await self._runtime().conversation.create_chat(
            self._tenant,
            session_id,
            chat_id=chat_id,
            name=name,
            system_prompt=system_prompt,
            metadata=metadata,
            max_messages=max_messages,
        )

    async def list_chats(self, session_id: str) -> list[Chat]:
        """The session's chats, oldest first."""
        return await self._runtime().conversation.list_chats(self._tenant, session_id)

    async def get_chat(self, session_id: str, chat_id: str) -> Chat | None:
        """One chat of the session, or None."""
        return await self._runtime().conversation.get_chat(self._tenant, session_id, chat_id)

    async def switch_chat(self, session_id: str, chat_id: str) -> Session:
        """Make ``chat_id`` the chat that calls without a ``chat_id`` use."""
        return await self._runtime().conversation.switch_chat(self._tenant, session_id, chat_id)

    async def delete_chat(self, session_id: str, chat_id: str) -> bool:
        """Delete a chat and its messages; False when it did not exist. When it was the
        current chat, the newest remaining chat becomes current."""
        return await self._runtime().conversation.delete_chat(self._tenant, session_id, chat_id)

    async def add_message(
        self,
        session_id: str,
        role: str,
        content: str | Mapping[str, Any] | list[Any],
        *,
        chat_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        tokens: int | None = None,
        if_last_seq: int | None = None,
    ) -> Message:
        """Append a message (role system, user, assistant or tool) to a chat of an active
        session: the current chat unless ``chat_id`` is given. ``content`` is text, or
        JSON data (a dict or a list, such as an agent framework's item) stored as its
        compact JSON text. It is redacted with ``redact_patterns`` first (JSON data
        value by value, so it always parses back). Past the chat's cap the oldest whole
        turns are dropped ("trim": a turn starts at a user message, so a tool result
        never loses its call) or HistoryLimitError is raised ("reject").

        ``if_last_seq``: append only if the chat's newest message has this seq (0: the
        chat is empty), checked under the chat's lock; else ConflictError and nothing
        is written (one writer per turn, whatever the number of processes)."""
        conversation = self._runtime().conversation
        message = conversation.new_message(role, content, metadata, tokens)
        (added,) = await conversation.add_messages(
            self._tenant, session_id, [message], chat_id, if_last_seq
        )
        return added

    add_conversation_message = add_message

    async def add_messages(
        self,
        session_id: str,
        messages: Sequence[Mapping[str, Any]],
        *,
        chat_id: str | None = None,
        if_last_seq: int | None = None,
    ) -> list[Message]:
        """Append several messages (mappings with ``role``, ``content`` and optionally
        ``metadata`` and ``tokens``) in order, in one transaction; ``if_last_seq`` as
        for add_message()."""
        conversation = self._runtime().conversation
        batch = [_new_message(conversation, item) for item in messages]
        if not batch:
            return []
        return await conversation.add_messages(
            self._tenant, session_id, batch, chat_id, if_last_seq
        )

    async def get_messages(
        self,
        session_id: str,
        *,
        chat_id: str | None = None,
        limit: int | None = 50,
        before_seq: int | None = None,
        include_compacted: bool = False,
    ) -> list[Message]:
        """The last ``limit`` messages (all with None) of a chat, oldest first; with
        ``before_seq``, those before the message with that sequence number (paging
        backwards: ``before_seq=page[0].seq``). Once compacted, the chat's latest
        summary stands where the messages it replaced stood (after the system prompt)
        and those are left out; ``include_compacted=True`` returns every stored
        message, compacted ones too, by sequence number."""
        return await self._runtime().conversation.get_messages(
            self._tenant, session_id, chat_id, limit, before_seq, include_compacted
        )

    get_conversation_history = get_messages

    async def count_messages(self, session_id: str, *, chat_id: str | None = None) -> int:
        """How many messages the chat holds."""
        return await self._runtime().conversation.count_messages(self._tenant, session_id, chat_id)

    async def pop_message(self, session_id: str, *, chat_id: str | None = None) -> Message | None:
        """Remove and return the chat's newest message (None when it is empty); the true
        last one even while others append."""
        return await self._runtime().conversation.pop_message(self._tenant, session_id, chat_id)

    async def clear_messages(
        self, session_id: str, *, chat_id: str | None = None, keep_system: bool = False
    ) -> int:
        """Delete the chat's messages (all but system messages with ``keep_system``); the
        number deleted. Sequence numbers are never reused."""
        return await self._runtime().conversation.clear_messages(
            self._tenant, session_id, chat_id, keep_system
        )

    async def trim_history(
        self,
        session_id: str,
        keep_last: int,
        *,
        keep_system: bool = True,
        chat_id: str | None = None,
    ) -> int:
        """Keep the newest ``keep_last`` messages (not counting system messages, which
        all stay, with ``keep_system``); the number deleted."""
        return await self._runtime().conversation.trim_history(
            self._tenant, session_id, keep_last, keep_system, chat_id
        )

    async def get_context(
        self,
        session_id: str,
        *,
        chat_id: str | None = None,
        max_tokens: int,
        keep_system: bool = True,
    ) -> ContextWindow:
        """What to send a model: the newest whole turns of the chat (a turn starts at a
        user message, so a tool result never comes without its call) within
        ``max_tokens``, the chat's system messages and latest summary first (with
        ``keep_system``; they count toward ``max_tokens`` and are kept even when they
        alone pass it). A message counts its ``tokens`` when given, else
        ``EngineSettings.token_counter``'s count of its content."""
        return await self._runtime().context.get_context(
            self._tenant, session_id, chat_id, max_tokens, keep_system
        )

    async def compact_history(
        self,
        session_id: str,
        summarizer: Summarizer,
        *,
        chat_id: str | None = None,
        keep_last_turns: int = 4,
    ) -> Message | None:
        """Replace the chat's turns before the last ``keep_last_turns`` (and its previous
        summary, folded in) with one summary: a system message written by ``await
        summarizer(messages) -> str``, with the next sequence number and
        ``metadata["summary_of"] = [first_seq, last_seq]``. The summarizer runs outside
        any transaction; the replacement commits only if what it read is unchanged,
        else ConflictError and nothing is written (messages appended meanwhile are
        never touched). Replaced messages are flagged compacted, not deleted (see
        get_messages(include_compacted=True), purge_compacted()). Returns the summary,
        or None when there was nothing to compact."""
        return await self._runtime().context.compact(
            self._tenant, session_id, summarizer, chat_id, keep_last_turns
        )

    async def purge_compacted(self, session_id: str) -> int:
        """Delete the session's compacted messages (every chat); the number deleted."""
        return await self._runtime().context.purge_compacted(self._tenant, session_id)

    async def set_metadata(self, session_id: str, key: str, value: Any) -> dict[str, Any]:
        """Set one metadata key (in SQL: concurrent writers of other keys are kept);
        the whole metadata after the change."""
        v.identifier(key, "key")
        return await self._runtime().metadata.change_metadata(
            self._tenant, session_id, {key: value}
        )

    async def update_metadata(self, session_id: str, patch: dict[str, Any]) -> dict[str, Any]:
        """Set every key of ``patch`` at once; the whole metadata after the change."""
        return await self._runtime().metadata.change_metadata(self._tenant, session_id, patch)

    async def delete_metadata(self, session_id: str, key: str) -> dict[str, Any]:
        """Remove one metadata key (absent keys are fine); the metadata after the change."""
        v.identifier(key, "key")
        return await self._runtime().metadata.change_metadata(
            self._tenant, session_id, None, remove=key
        )

    async def get_metadata(self, session_id: str, key: str, default: Any = None) -> Any:
        """One metadata value, or ``default``."""
        return (await self.get_all_metadata(session_id)).get(key, default)

    async def get_all_metadata(self, session_id: str) -> dict[str, Any]:
        """The session's metadata."""
        return await self._runtime().metadata.metadata(self._tenant, session_id)

    async def get_shared_state(self, key: str) -> dict[str, Any]:
        """The JSON document ``key`` shared by the tenant's sessions ({} when unset)."""
        return await self._runtime().metadata.shared_state(self._tenant, key)

    async def update_shared_state(self, key: str, patch: dict[str, Any]) -> dict[str, Any]:
        """Set the keys of ``patch`` in the shared document ``key`` (created when missing),
        merged in SQL like session metadata; the document after the change."""
        return await self._runtime().metadata.update_shared_state(self._tenant, key, patch)

    # -- key-value memory ---------------------------------------------------------------
    async def remember(
        self,
        key: str,
        value: Any,
        *,
        user_id: str | None = None,
        session_id: str | None = None,
        namespace: str = "default",
        ttl: float | None = None,
        expected_version: int | None = None,
    ) -> MemoryItem:
        """Store the JSON ``value`` under ``key`` in the scope (``user_id`` None: shared
        by the tenant; ``session_id`` narrows a user's scope), in one statement. Each
        write bumps ``version`` (the first is 1). ``ttl``: seconds until the item
        expires (None: never; each write sets it anew). ``expected_version``: write
        only if the stored version is this one (0: only if nothing is stored), else
        ConflictError and nothing written. Raises ValidationError."""
        memory = self._runtime().memory
        where = _memory_scope(self._tenant, user_id, session_id, namespace)
        return await memory.remember(where, key, value, ttl, expected_version)

    async def recall(
        self,
        key: str,
        *,
        user_id: str | None = None,
        session_id: str | None = None,
        namespace: str = "default",
    ) -> Any:
        """The value stored under ``key`` in the scope, or None (never stored, forgotten
        or expired). Scopes are exact: a user's scope does not see the tenant-wide one."""
        memory = self._runtime().memory
        item = await memory.get(_memory_scope(self._tenant, user_id, session_id, namespace), key)
        return None if item is None else item.value

    async def get_memory(
        self,
        key: str,
        *,
        user_id: str | None = None,
        session_id: str | None = None,
        namespace: str = "default",
    ) -> MemoryItem | None:
        """The whole item under ``key`` in the scope (its version for a compare-and-set),
        or None."""
        memory = self._runtime().memory
        return await memory.get(_memory_scope(self._tenant, user_id, session_id, namespace), key)

    async def forget(
        self,
        key: str,
        *,
        user_id: str | None = None,
        session_id: str | None = None,
        namespace: str = "default",
    ) -> bool:
        """Delete the item under ``key`` in the scope; False when there was none."""
        memory = self._runtime().memory
        return await memory.forget(_memory_scope(self._tenant, user_id, session_id, namespace), key)

    async def list_memories(
        self,
        *,
        user_id: str | None = None,
        session_id: str | None = None,
        namespace: str = "default",
        prefix: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> list[MemoryItem]:
        """One page (at most ``limit``, up to 1000) of the scope's items in key order
        (code point order on every backend), those whose key starts with ``prefix``
        when given. ``cursor`` is the key of the last item of the previous page (keyset
        paging: items added or removed meanwhile never shift a page)."""
        memory = self._runtime().memory
        where = _memory_scope(self._tenant, user_id, session_id, namespace)
        return await memory.page(where, prefix, limit, cursor)

    async def forget_user(self, user_id: str) -> int:
        """Delete every memory of ``user_id`` in this tenant, key-value items and
        semantic memories, in every namespace, those narrowed to the user's sessions
        included, in one transaction; the number deleted."""
        return await self._runtime().memory.forget_user(self._tenant, user_id)

    # -- semantic memory ----------------------------------------------------------------
    async def add_memory(
        self,
        text: str,
        *,
        user_id: str | None = None,
        session_id: str | None = None,
        namespace: str = "default",
        metadata: dict[str, Any] | None = None,
        ttl: float | None = None,
        importance: float = 1.0,
        embedding: Sequence[float] | None = None,
        source: str | None = None,
    ) -> MemoryRecord:
        """Store ``text`` to be found by meaning, embedded by ``EngineSettings.embedder``
        unless ``embedding`` is given (a namespace holds vectors of one dimension).
        ``ttl`` in seconds; ``importance`` (>= 0) ranks memories for retention (see
        ``EngineSettings.max_memories_per_user``). ``source`` names where the text came
        from: when a live memory of the tenant has it already, nothing is written and
        that memory is returned (adding is idempotent per source)."""
        where = _memory_scope(self._tenant, user_id, session_id, namespace)
        semantic = self._runtime().semantic
        return await semantic.add(where, text, metadata, ttl, importance, embedding, source)

    async def search_memory(
        self,
        query: str,
        *,
        user_id: str | None = None,
        namespace: str = "default",
        limit: int = 5,
        min_score: float | None = None,
        metadata: dict[str, Any] | None = None,
        include_shared: bool = True,
    ) -> list[MemoryHit]:
        """The memories nearest ``query`` by cosine similarity, best first (exact): the
        user's (those narrowed to their sessions included) and, with ``include_shared``,
        the tenant-wide ones; only tenant-wide ones when ``user_id`` is None. Only
        memories whose metadata holds every pair of ``metadata``, scoring at least
        ``min_score`` (-1 to 1). The memories returned are marked accessed."""
        return await self._runtime().semantic.search(
            self._tenant, user_id, namespace, query, limit, min_score, metadata, include_shared
        )

    async def memorize_session(
        self, session_id: str, *, chat_id: str | None = None, namespace: str = "default"
    ) -> list[MemoryRecord]:
        """Store the session's messages (of one chat, or of all; system prompts aside)
        not memorized yet as semantic memories of its user, not narrowed to the session,
        so they outlive it; each one's metadata names its source session, chat, seq and
        role. Idempotent per message: running it again stores only newer messages.
        Returns the memories stored now."""
        semantic = self._runtime().semantic
        return await semantic.memorize(self._tenant, session_id, chat_id, namespace)

    async def delete_memory(self, memory_id: str) -> bool:
        """Delete one semantic memory; False when there was none."""
        return await self._runtime().semantic.delete(self._tenant, memory_id)

    async def count_memories(
        self,
        *,
        user_id: str | None = None,
        session_id: str | None = None,
        namespace: str = "default",
    ) -> int:
        """Live semantic memories of the scope: with ``session_id`` None, a user's count
        includes those narrowed to their sessions; ``user_id`` None: tenant-wide ones."""
        where = _memory_scope(self._tenant, user_id, session_id, namespace)
        return await self._runtime().semantic.count(where, all_sessions=session_id is None)

    async def export_memories(
        self, user_id: str | None, *, namespace: str | None = None
    ) -> dict[str, Any]:
        """Every live memory of ``user_id`` (None: the tenant-wide scope's), key-value
        items and semantic memories with their vectors, those narrowed to the user's
        sessions included, of one ``namespace`` or all, as JSON-safe data
        (``"format": "ctxengine.memories"``, ``format_version`` 1) that
        import_memories() takes back."""
        return await self._runtime().transfer.export(self._tenant, user_id, namespace)

    async def import_memories(
        self, data: Mapping[str, Any], *, user_id: str | EllipsisType | None = ...
    ) -> MemoryImportResult:
        """Put the memories of an export back, under ``user_id`` if given (None: the
        tenant-wide scope), in one transaction. Idempotent: items stored alike and
        memories present (same id, or same source in the user's scopes) are left as
        they are; other items are overwritten by key. ValidationError, and nothing
        written, for an unknown format or format_version, malformed data, or vectors
        whose dimension differs from their namespace's."""
        return await self._runtime().transfer.import_(self._tenant, data, user_id)

    async def checkpoint(self, session_id: str, description: str = "") -> Checkpoint:
        """Save a copy of every chat, message and the metadata of the session."""
        return await self._runtime().snapshots.checkpoint(self._tenant, session_id, description)

    async def list_checkpoints(self, session_id: str) -> list[Checkpoint]:
        """The session's checkpoints, oldest first."""
        return await self._runtime().snapshots.list_checkpoints(self._tenant, session_id)

    async def restore_checkpoint(self, session_id: str, checkpoint_id: str) -> Session:
        """Put the chats, messages, metadata and current chat of a checkpoint back
        exactly, replacing what the session holds now."""
        return await self._runtime().snapshots.restore_checkpoint(
            self._tenant, session_id, checkpoint_id
        )

    async def export_session(self, session_id: str) -> dict[str, Any]:
        """The session, its chats, messages, metadata and quotas as JSON-safe data with a
        ``format_version``; import_session() takes it back losslessly."""
        return await self._runtime().snapshots.export(self._tenant, session_id)

    async def import_session(
        self, data: Mapping[str, Any], *, new_session_id: str | None = None
    ) -> Session:
        """Recreate an exported session (under ``new_session_id`` if given) in this
        tenant, all or nothing. ValidationError for an unknown format_version or
        malformed data, SessionExistsError when the id is taken."""
        return await self._runtime().snapshots.import_(self._tenant, data, new_session_id)

    async def get_session_stats(self, session_id: str) -> SessionStats:
        """Chats, messages and activity of one session."""
        return await self._runtime().conversation.stats(self._tenant, session_id)

    # -- requests and metrics -----------------------------------------------------------
    def track_request(
        self, session_id: str, operation: str = "request"
    ) -> AbstractAsyncContextManager[RequestTracker]:
        """``async with``: check the session can work, then count one request, its time,
        and an error if the block raised (the exception propagates)."""
        self._runtime()
        return track_request(self._runtime(), self._tenant, session_id, operation)

    async def get_statistics(self) -> Statistics:
        """Aggregates over this tenant's sessions, computed in SQL."""
        return await self._runtime().sessions.statistics(self._tenant)

    async def get_metrics(self) -> dict[str, Any]:
        """``get_statistics()`` as a dict."""
        return (await self.get_statistics()).model_dump(mode="json")

    # -- tiers, quotas, usage ------------------------------------------------------------
    async def track_usage(
        self,
        session_id: str,
        operation: str,
        resource_type: QuotaType | str,
        amount: float = 1,
        metadata: dict[str, Any] | None = None,
    ) -> UsageRecord:
        """Record use of a resource: the quota check, the counter, the usage record and
        the session touch in one transaction. Raises QuotaExceededError (writing
        nothing) when ``used + amount`` would pass the limit."""
        return await self._runtime().usage.track(
            self._tenant, session_id, operation, resource_type, amount, metadata
        )

    @overload
    async def get_quota(self, session_id: str) -> dict[QuotaType, QuotaStatus]: ...

    @overload
    async def get_quota(self, session_id: str, resource_type: QuotaType | str) -> QuotaStatus: ...

    async def get_quota(
        self, session_id: str, resource_type: QuotaType | str | None = None
    ) -> dict[QuotaType, QuotaStatus] | QuotaStatus:
        """Every quota of the session, or the one of ``resource_type``."""
        quotas = await self._runtime().usage.quotas(self._tenant, session_id)
        if resource_type is None:
            return quotas
        return quotas[quota_type(resource_type)]

    async def set_quota(
        self, session_id: str, resource_type: QuotaType | str, limit: float | None
    ) -> QuotaStatus:
        """Give the session its own limit for ``resource_type`` (None = unlimited); usage
        so far is kept and the limit survives change_tier()."""
        return await self._runtime().usage.set_quota(self._tenant, session_id, resource_type, limit)

    async def change_tier(self, session_id: str, tier: str) -> Session:
        """Move the session to another tier; its limits change now, usage is kept."""
        return await self._runtime().usage.change_tier(self._tenant, session_id, tier)

    async def get_usage_history(
        self,
        *,
        user_id: str | None = None,
        session_id: str | None = None,
        resource_type: QuotaType | str | None = None,
        operation: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> list[UsageRecord]:
        """Usage records, newest first."""
        return await self._runtime().usage.history(
            self._tenant,
            user_id=user_id,
            session_id=session_id,
            resource_type=resource_type,
            operation=operation,
            since=since,
            limit=limit,
        )

    async def predict_quota_exhaustion(
        self, session_id: str, *, lookback: float = 3600
    ) -> dict[QuotaType, dict[str, Any]]:
        """Per quota type: the consumption rate per hour over ``lookback`` seconds, what
        remains, and when it runs out at that rate (None when the rate is 0 or the
        quota unlimited)."""
        return await self._runtime().usage.predict(self._tenant, session_id, lookback)

    async def get_user_analytics(self, user_id: str) -> UserAnalytics:
        """Sessions and usage of one user, from SQL aggregates."""
        return await self._runtime().usage.analytics(self._tenant, user_id)

    def add_usage_callback(self, callback: Callable[[UsageRecord], Any]) -> Callable[[], None]:
        """Call ``callback(record)`` after each recorded usage; returns the unsubscriber."""
        return self.subscribe(usage_callback(callback), "usage.recorded")

    # -- rate limits ----------------------------------------------------------------------
    async def enforce_rate_limit(
        self,
        session_id: str,
        operation: str = "default",
        limit_type: RateLimitType | str = RateLimitType.PER_MINUTE,
        cost: int = 1,
    ) -> RateLimitStatus:
        """Consume ``cost`` calls, or raise RateLimitError (consuming nothing). The limit
        is the custom one set for ``operation`` (session, then user), else the tier's
        rule for ``limit_type``."""
        return await self._runtime().rates.enforce(
            self._tenant, session_id, operation, limit_type, cost, consume=True
        )

    async def check_rate_limit(
        self,
        session_id: str,
        operation: str = "default",
        limit_type: RateLimitType | str = RateLimitType.PER_MINUTE,
        cost: int = 1,
    ) -> RateLimitStatus:
        """What enforce_rate_limit would say, without consuming or raising for the limit
        (``remaining`` 0 and ``reset_after`` = the wait when it would refuse)."""
        return await self._runtime().rates.enforce(
            self._tenant, session_id, operation, limit_type, cost, consume=False
        )

    async def set_rate_limit(
        self,
        session_id: str | None,
        operation: str,
        max_calls: int,
        window_seconds: float,
        *,
        user_id: str | None = None,
    ) -> None:
        """A custom limit for ``operation``: ``max_calls`` per ``window_seconds`` for one
        session, or (``session_id=None, user_id=...``) shared by a user's sessions. It
        replaces the tier's rules for that operation."""
        await self._runtime().rates.set_rule(
            self._tenant, session_id, user_id, operation, max_calls, window_seconds
        )

    # -- concurrency ----------------------------------------------------------------------
    def concurrency_slot(
        self, session_id: str, operation: str = "default"
    ) -> AbstractAsyncContextManager[str]:
        """``async with``: hold one of the session's concurrency slots while the block
        runs (ConcurrencyLimitError at the cap). The lease is renewed while held and
        expires ``lease_ttl`` seconds after its holder dies."""
        return self._runtime().leases.slot(self._tenant, session_id, operation)

    async def manage_concurrency(
        self, session_id: str, operation: str = "default", increment: bool = True
    ) -> int:
        """Take (``increment=True``) or give back a slot; the number of live leases after."""
        return await self._runtime().leases.manage(self._tenant, session_id, operation, increment)

    # -- events -------------------------------------------------------------------------
    def subscribe(self, handler: Handler, *event_types: str) -> Callable[[], None]:
        """Call ``handler(event)`` after each committed change of this tenant (all types
        when none are named); returns the function that unsubscribes."""
        return self._runtime().ctx.bus.subscribe(
            handler, _event_types(event_types), self._tenant_filter()
        )

    def events(self, *event_types: str, session_id: str | None = None) -> EventStream:
        """An async iterator of events (bounded: the oldest are dropped when the reader
        falls behind), subscribed now; it ends when the engine closes. Also an async
        context manager (``async with engine.events() as stream:``): left, closed with
        ``aclose()`` or dropped by its consumer, it is unsubscribed at once."""
        return self._runtime().ctx.bus.stream(
            _event_types(event_types), self._tenant_filter(), session_id, STREAM_CAPACITY
        )

    def _tenant_filter(self) -> str | None:
        return self._tenant
