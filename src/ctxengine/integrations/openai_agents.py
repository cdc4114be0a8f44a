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
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from agents.memory.session_settings import (
    SessionSettings,
    coerce_session_settings,
    resolve_session_limit,
)

from ._adapter import Closable

if TYPE_CHECKING:
    from agents.items import TResponseInputItem

    from ..tenant import TenantView

__all__ = ["ContextEngineSession"]

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
    ) -> None:
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
