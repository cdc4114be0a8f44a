"""A Google ADK memory service on ctxengine's semantic memory (SPEC §13).

    from google.adk.runners import Runner
    from google.adk.tools import load_memory
    from ctxengine.integrations.adk import ContextEngineMemoryService

    memory = ContextEngineMemoryService(engine)
    runner = Runner(agent=agent, app_name="travel", session_service=sessions,
                    memory_service=memory)

See :class:`ContextEngineMemoryService` for the mapping.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from google.adk.memory.base_memory_service import BaseMemoryService, SearchMemoryResponse
from google.adk.memory.memory_entry import MemoryEntry
from google.genai import types

from ._adapter import Closable

if TYPE_CHECKING:
    from google.adk.events.event import Event
    from google.adk.sessions.session import Session

    from .. import MemoryHit
    from ..tenant import TenantView

__all__ = ["ContextEngineMemoryService", "memory_source"]

#: The longest source ctxengine stores, in bytes of UTF-8; longer keys are hashed.
_MAX_SOURCE_BYTES = 2048
#: The keys of ``custom_metadata`` this service acts on (the rest is stored).
_SETTINGS = ("ttl", "importance")


def memory_source(app_name: str, user_id: str, *parts: str | None) -> str:
    """The idempotency key (``source``) of a memory: ``["adk", app, user, *parts]`` as
    compact JSON, or ``adk#`` and its SHA-256 when that passes 2048 bytes."""
    key = json.dumps(["adk", app_name, user_id, *parts], separators=(",", ":"))
    if len(key.encode()) > _MAX_SOURCE_BYTES:
        return "adk#" + hashlib.sha256(key.encode()).hexdigest()
    return key


def _text(content: types.Content | None) -> str:
    """The text parts of ``content`` joined by newlines, thoughts left out ("" when none)."""
    if content is None or not content.parts:
        return ""
    texts = [p.text for p in content.parts if p.text and p.text.strip() and not p.thought]
    return "\n".join(texts)


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat()


def _split(custom_metadata: Mapping[str, object] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``custom_metadata`` split into the settings (``ttl``, ``importance``) and the
    rest, which every memory written keeps."""
    settings: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for key, value in (custom_metadata or {}).items():
        (settings if key in _SETTINGS else rest)[key] = value
    return settings, rest


class ContextEngineMemoryService(Closable, BaseMemoryService):
    """ADK's ``BaseMemoryService`` on ctxengine's semantic memory: a ``memory_service``
    for a ``Runner``, searched by meaning (``EngineSettings.embedder``) and used by
    ADK's ``load_memory`` and ``preload_memory`` tools.

    ``engine`` is a :class:`~ctxengine.ContextEngine` or a tenant view of one. A search
    returns at most ``limit`` memories (default 10, as ADK's in-memory service), those
    scoring at least ``min_score`` when given, best first; with ``include_shared`` it
    also returns the app's tenant-wide memories (``user_id=None``), which this service
    never writes.

    Mapping (public ctxengine API only):

    - ADK ``app_name`` is the memory ``namespace``, ``user_id`` the memory's user; the
      memories are the user's, not narrowed to a session (they outlive it);
    - each event with text becomes one memory: the text of its parts joined by
      newlines (thoughts left out); events without text, and partial events, are
      skipped; metadata ``session_id``, ``event_id``, ``author``, ``role`` and
      ``timestamp`` (ISO 8601, UTC) name where it came from;
    - its ``source`` (idempotency key) is :func:`memory_source` of the app, user,
      session and event ids, so adding a session again stores only events not stored
      yet; ``add_memory`` entries with an ``id`` get ``[..., "entry", id]`` (without
      one, each call stores a new memory);
    - ``custom_metadata``: ``ttl`` (seconds) and ``importance`` apply to the memories
      written, other keys are stored with them and returned in
      ``MemoryEntry.custom_metadata``;
    - a search returns ``MemoryEntry(id=<ctxengine memory id>, content=Content(role,
      [Part(text)]), author, timestamp, custom_metadata)`` with ``session_id``,
      ``event_id`` (for memories of events) and ``score`` (cosine similarity) in the
      custom metadata; a blank query finds nothing;
    - ``delete_memory`` deletes by that id (no id, or a memory gone: nothing happens),
      within the engine's tenant: ctxengine has no lookup by id, so ``app_name`` and
      ``user_id`` are not checked (ids are random, and only the user's searches return
      them). Adding the memory's event again stores it again (ADK's in-memory service
      remembers deleted event ids; this service does not).

    Each memory is its own write: when one fails, those before it stay stored, and
    adding again stores the rest. Engine errors are raised as they are
    (``ValidationError`` for a bad ``ttl``, metadata that is not JSON, no embedder...).
    ``close()`` ends the use of the service, not of the engine.
    """

    def __init__(
        self,
        engine: TenantView,
        *,
        limit: int = 10,
        min_score: float | None = None,
        include_shared: bool = False,
    ) -> None:
        self.engine = engine
        self.limit = limit
        self.min_score = min_score
        self.include_shared = include_shared

    async def add_session_to_memory(self, session: Session) -> None:
        """Store each event of ``session`` with text not stored yet (idempotent)."""
        await self.add_events_to_memory(
            app_name=session.app_name,
            user_id=session.user_id,
            events=session.events,
            session_id=session.id,
        )

    async def add_events_to_memory(
        self,
        *,
        app_name: str,
        user_id: str,
        events: Sequence[Event],
        session_id: str | None = None,
        custom_metadata: Mapping[str, object] | None = None,
    ) -> None:
        """Store each of ``events`` with text as a memory of the user (idempotent per
        event of a session: ``session_id`` is part of the key)."""
        self._check_open()
        settings, extra = _split(custom_metadata)
        for event in events:
            text = _text(event.content)
            if not text or event.partial:
                continue
            metadata: dict[str, Any] = {
                "session_id": session_id,
                "event_id": event.id,
                "author": event.author,
                "role": (event.content.role if event.content else None) or _role(event.author),
                "timestamp": _iso(event.timestamp),
            }
            if extra:
                metadata["custom_metadata"] = extra
            await self.engine.add_memory(
                text,
                user_id=user_id,
                namespace=app_name,
                metadata={k: v for k, v in metadata.items() if v is not None},
                source=memory_source(app_name, user_id, session_id, event.id),
                **settings,
            )

    async def add_memory(
        self,
        *,
        app_name: str,
        user_id: str,
        memories: Sequence[MemoryEntry],
        custom_metadata: Mapping[str, object] | None = None,
    ) -> None:
        """Store each entry's text as a memory of the user (entries with an ``id`` once);
        ValueError, before anything is written, when an entry has no text."""
        self._check_open()
        settings, extra = _split(custom_metadata)
        texts = [_text(entry.content) for entry in memories]
        for i, text in enumerate(texts):
            if not text:
                raise ValueError(
                    f"memories[{i}] has no text part: ctxengine memories are texts "
                    "(found by the embedding of their text); nothing was written"
                )
        for entry, text in zip(memories, texts, strict=True):
            metadata: dict[str, Any] = {
                "author": entry.author,
                "role": entry.content.role or _role(entry.author),
                "timestamp": entry.timestamp,
            }
            custom = {**extra, **entry.custom_metadata}
            if custom:
                metadata["custom_metadata"] = custom
            await self.engine.add_memory(
                text,
                user_id=user_id,
                namespace=app_name,
                metadata={k: v for k, v in metadata.items() if v is not None},
                source=_entry_source(app_name, user_id, entry),
                **settings,
            )

    async def search_memory(
        self, *, app_name: str, user_id: str, query: str
    ) -> SearchMemoryResponse:
        """The user's memories in the app nearest ``query`` by meaning, best first."""
        self._check_open()
        if not query or not query.strip():
            return SearchMemoryResponse()
        hits = await self.engine.search_memory(
            query,
            user_id=user_id,
            namespace=app_name,
            limit=self.limit,
            min_score=self.min_score,
            include_shared=self.include_shared,
        )
        return SearchMemoryResponse(memories=[_entry(hit) for hit in hits])

    async def delete_memory(
        self, *, app_name: str, user_id: str, memory_id: str | None = None
    ) -> None:
        """Delete the memory whose ``MemoryEntry.id`` is ``memory_id`` (the ctxengine
        memory id; nothing happens when it is None or the memory is gone)."""
        self._check_open()
        if memory_id:
            await self.engine.delete_memory(memory_id)


def _entry_source(app_name: str, user_id: str, entry: MemoryEntry) -> str | None:
    return None if entry.id is None else memory_source(app_name, user_id, "entry", entry.id)


def _role(author: str | None) -> str:
    return "user" if author in (None, "user") else "model"


def _entry(hit: MemoryHit) -> MemoryEntry:
    record = hit.record
    meta = record.metadata
    custom = meta.get("custom_metadata")
    found: dict[str, Any] = dict(custom) if isinstance(custom, dict) else {}
    for key in ("session_id", "event_id"):
        if meta.get(key) is not None:
            found[key] = meta[key]
    found["score"] = hit.score
    author = meta.get("author")
    role = meta.get("role")
    timestamp = meta.get("timestamp")
    return MemoryEntry(
        id=record.memory_id,
        content=types.Content(
            role=role if isinstance(role, str) else _role(None),
            parts=[types.Part(text=record.text)],
        ),
        author=author if isinstance(author, str) else None,
        timestamp=timestamp if isinstance(timestamp, str) else record.created_at.isoformat(),
        custom_metadata=found,
    )
