"""An OpenAI Agents SDK session stored by ctxengine.

    from agents import Agent, Runner
    from ctxengine.integrations.openai_agents import ContextEngineSession

    session = ContextEngineSession(engine, "conversation-42", user_id="ada")
    result = await Runner.run(agent, "Hello", session=session)

Items are stored as messages of the session's chat, each the item's JSON (redacted
with ``redact_patterns`` like any message), and come back in write order: the chat's
sequence numbers, not timestamps, order them. The engine session is created on first
use; its lifecycle, metrics and limits apply (adding items to an expired session
raises :class:`~ctxengine.errors.SessionExpiredError`).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from agents.memory.session_settings import SessionSettings, resolve_session_limit

if TYPE_CHECKING:
    from agents.items import TResponseInputItem

    from ..tenant import TenantView

__all__ = ["ContextEngineSession"]

_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


def _role(item: Any) -> str:
    """The message role an item is stored under; items without a chat role (tool calls,
    their outputs, reasoning) are stored as tool messages."""
    role = item.get("role") if isinstance(item, dict) else None
    return _ROLES.get(role, "tool") if isinstance(role, str) else "tool"


class ContextEngineSession:
    """Satisfies the OpenAI Agents SDK ``Session`` protocol on a ctxengine session.

    ``engine`` is a :class:`~ctxengine.ContextEngine` or a tenant view of one;
    ``user_id`` (default: the session id) and ``tier`` are used when the session is
    created; ``chat_id`` selects a chat other than the session's current one.
    """

    def __init__(
        self,
        engine: TenantView,
        session_id: str,
        *,
        user_id: str | None = None,
        tier: str = "free",
        chat_id: str | None = None,
        session_settings: SessionSettings | None = None,
    ) -> None:
        self.engine = engine
        self.session_id = session_id
        self.session_settings = session_settings
        self._user_id = session_id if user_id is None else user_id
        self._tier = tier
        self._chat_id = chat_id
        self._created = False

    async def _ensure(self) -> None:
        if not self._created:
            await self.engine.get_or_create_session(self.session_id, self._user_id, tier=self._tier)
            self._created = True

    async def get_items(self, limit: int | None = None) -> list[TResponseInputItem]:
        """The latest ``limit`` items (all with None), oldest first."""
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
            return
        await self._ensure()
        await self.engine.add_messages(
            self.session_id,
            [{"role": _role(item), "content": json.dumps(item)} for item in items],
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
