"""An OpenAI Agents SDK session stored by ctxengine.

    from agents import Agent, Runner
    from ctxengine.integrations.openai_agents import ContextEngineSession

    async with ContextEngineSession(engine, "conversation-42", user_id="ada") as session:
        result = await Runner.run(agent, "Hello", session=session)

Items are stored as messages of the session's chat, each the item as JSON data
(``redact_patterns`` apply to the strings inside it and to the values of secret-named
keys, so a stored item always parses back), and come back in write order: the chat's
sequence numbers, not timestamps, order them. The engine session is created on first
use with no idle expiry and no item cap unless asked (``idle_timeout``, ``max_items``),
as the SDK's own stores keep a conversation forever.

Given a ``summarizer``, the session is also compaction-aware (the SDK's
``OpenAIResponsesCompactionAwareSession``): after each turn the ``Runner`` calls
:meth:`ContextEngineSession.run_compaction`, which replaces the turns before the last
``keep_last_turns`` with one summary item through ``engine.compact_history``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from agents.memory.session_settings import (
    SessionSettings,
    coerce_session_settings,
    resolve_session_limit,
)

from ..errors import ConflictError, ValidationError
from ._adapter import Closable

if TYPE_CHECKING:
    from agents.items import TResponseInputItem
    from agents.memory.session import OpenAIResponsesCompactionArgs

    from ..models import Message
    from ..tenant import TenantView

__all__ = ["ContextEngineSession", "ItemSummarizer"]

log = logging.getLogger("ctxengine.integrations.openai_agents")

#: Writes the summary of the items a compaction replaces, oldest first (the previous
#: summary item first of all): ``await summarizer(items) -> str``.
ItemSummarizer = Callable[[list["TResponseInputItem"]], Awaitable[str]]

#: The SDK's own default: compact once this many items that are not user input wait.
DEFAULT_COMPACTION_THRESHOLD = 10


def _is_user_input(item: Any) -> bool:
    return isinstance(item, dict) and item.get("role") == "user"


def _is_summary(message: Message) -> bool:
    return "summary_of" in message.metadata


def default_should_trigger_compaction(context: dict[str, Any]) -> bool:
    """The SDK's default decision: compact when at least 10 candidate items (neither
    user input nor a summary) are stored."""
    return len(context["compaction_candidate_items"]) >= DEFAULT_COMPACTION_THRESHOLD


_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


def _role(item: Any) -> str:
    """The message role an item is stored under. Only user input is ``user`` (a turn,
    which trimming keeps or drops whole, starts there); items without a chat role
    (tool calls, their outputs, reasoning) are ``tool``; developer items ``system``."""
    role = item.get("role") if isinstance(item, dict) else None
    return _ROLES.get(role, "tool") if isinstance(role, str) else "tool"


class ContextEngineSession(Closable):
    """Satisfies the OpenAI Agents SDK ``Session`` protocol on a ctxengine session.

    ``engine`` is a :class:`~ctxengine.ContextEngine` or a tenant view of one. When the
    engine session does not exist yet it is created with ``user_id`` (default: the
    session id), ``tier``, ``idle_timeout`` (seconds of idleness before it expires;
    None, the default: never) and ``max_items`` (the cap of its default chat, whose
    oldest whole turns are trimmed past it; None, the default: no cap). An existing
    session keeps its own settings. ``chat_id`` selects a chat other than the
    session's current one. ``session_settings`` (a ``SessionSettings`` or a dict)
    gives the default ``limit`` of :meth:`get_items`.

    ``summarizer`` (``await summarizer(items) -> str``) makes :meth:`run_compaction`
    compact: the turns before the last ``keep_last_turns`` are replaced by one item
    ``{"role": "system", "content": <the summary>}``, shown first by
    :meth:`get_items`; the items replaced stay stored (compacted) until
    ``engine.purge_compacted``. ``should_trigger_compaction(context)`` decides when
    (``context``: ``response_id``, ``compaction_candidate_items``, ``session_items``,
    as the SDK's ``OpenAIResponsesCompactionSession`` passes it); by default, once 10
    items that are neither user input nor a summary are stored.

    ``close()`` (or leaving ``async with``) ends the use of this object, not of the
    engine: later calls raise ``RuntimeError``.
    """

    def __init__(
        self,
        engine: TenantView,
        session_id: str,
        *,
        user_id: str | None = None,
        tier: str = "free",
        chat_id: str | None = None,
        session_settings: SessionSettings | dict[str, Any] | None = None,
        idle_timeout: float | None = None,
        max_items: int | None = None,
        summarizer: ItemSummarizer | None = None,
        keep_last_turns: int = 4,
        should_trigger_compaction: Callable[[dict[str, Any]], bool] | None = None,
    ) -> None:
        if isinstance(keep_last_turns, bool) or not isinstance(keep_last_turns, int):
            raise ValueError(f"keep_last_turns must be a whole number, not {keep_last_turns!r}")
        if keep_last_turns < 0:
            raise ValueError(f"keep_last_turns must be >= 0, not {keep_last_turns}")
        self.engine = engine
        self.session_id = session_id
        self.session_settings: SessionSettings | None = (
            SessionSettings()
            if session_settings is None
            else coerce_session_settings(session_settings)
        )
        self._user_id = session_id if user_id is None else user_id
        self._tier = tier
        self._chat_id = chat_id
        self._idle_timeout = idle_timeout
        self._max_items = max_items
        self._summarizer = summarizer
        self._keep_last_turns = keep_last_turns
        self._should_compact = should_trigger_compaction or default_should_trigger_compaction
        self._created = False

    def _describe(self) -> str:
        return f"ContextEngineSession {self.session_id!r}"

    async def _ensure(self) -> None:
        self._check_open()
        if not self._created:
            await self.engine.get_or_create_session(
                self.session_id,
                self._user_id,
                tier=self._tier,
                idle_timeout=self._idle_timeout,
                max_messages=self._max_items,
            )
            self._created = True

    async def get_items(self, limit: int | None = None) -> list[TResponseInputItem]:
        """The latest ``limit`` items (default: ``session_settings.limit``; all when
        None), oldest first."""
        await self._ensure()
        wanted = resolve_session_limit(limit, self.session_settings)
        if wanted is not None and wanted <= 0:
            return []
        messages = await self.engine.get_messages(
            self.session_id, chat_id=self._chat_id, limit=wanted
        )
        return [json.loads(message.content) for message in messages]

    async def add_items(self, items: list[TResponseInputItem]) -> None:
        """Append ``items`` in order, in one transaction."""
        if not items:
            self._check_open()
            return
        await self._ensure()
        await self.engine.add_messages(
            self.session_id,
            [{"role": _role(item), "content": item} for item in items],
            chat_id=self._chat_id,
        )

    async def pop_item(self) -> TResponseInputItem | None:
        """Remove and return the newest item: the true last one under concurrency."""
        await self._ensure()
        message = await self.engine.pop_message(self.session_id, chat_id=self._chat_id)
        return None if message is None else json.loads(message.content)

    async def clear_session(self) -> None:
        """Remove every item (the engine session itself stays)."""
        await self._ensure()
        await self.engine.clear_messages(self.session_id, chat_id=self._chat_id)

    async def run_compaction(self, args: OpenAIResponsesCompactionArgs | None = None) -> None:
        """Compact the stored history through ``engine.compact_history`` when the
        decision hook says so (or ``args["force"]``): the turns before the last
        ``keep_last_turns`` become one summary item. Without a ``summarizer``, and when
        another writer compacted the same turns first, nothing happens."""
        await self._ensure()
        if self._summarizer is None:
            return
        if not (args or {}).get("force", False):
            messages = await self.engine.get_messages(
                self.session_id, chat_id=self._chat_id, limit=None
            )
            items = [json.loads(m.content) for m in messages]
            candidates = [
                item
                for message, item in zip(messages, items, strict=True)
                if not (_is_user_input(item) or _is_summary(message))
            ]
            context = {
                "response_id": (args or {}).get("response_id"),
                "compaction_candidate_items": candidates,
                "session_items": items,
            }
            if not self._should_compact(context):
                return
        try:
            await self.engine.compact_history(
                self.session_id,
                self._summarize,
                chat_id=self._chat_id,
                keep_last_turns=self._keep_last_turns,
            )
        except ConflictError:
            log.debug("compaction skipped: another writer compacted these turns first")

    async def _summarize(self, messages: list[Message]) -> str:
        """The summary item (JSON, as every stored item) of what the summarizer says of
        the items of ``messages``."""
        assert self._summarizer is not None
        text = await self._summarizer([json.loads(m.content) for m in messages])
        if not isinstance(text, str) or not text.strip():
            raise ValidationError(
                f"the summarizer must return the summary as a non-empty string, got {text!r}",
                field="summarizer",
            )
        return json.dumps({"role": "system", "content": text}, separators=(",", ":"))
