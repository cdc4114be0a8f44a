"""A session's chats at creation: the default chat, a new chat's row and cap, and the
messages that wait for their sequence numbers (shared by sessions and conversation)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .. import validation as v
from ..ids import new_id
from ..models import FROM_SETTINGS, Chat
from ..storage.connection import Connection
from ..storage.repositories.conversation import ConversationRepository

#: The id of the chat every session starts with.
DEFAULT_CHAT_ID = "default"


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A validated message waiting for its sequence number."""

    role: str
    content: str
    metadata: dict[str, Any]
    tokens: int | None


def chat_values(
    tenant: str,
    session_id: str,
    chat_id: str,
    now: datetime,
    *,
    name: str | None = None,
    metadata: dict[str, Any] | None = None,
    max_messages: int | None = None,
    messages: int = 0,
) -> dict[str, Any]:
    """The row of a new chat that starts with ``messages`` messages (its system prompt)."""
    return {
        "tenant_id": tenant,
        "session_id": session_id,
        "chat_id": chat_id,
        "name": name,
        "metadata": metadata or {},
        "max_messages": max_messages,
        "created_at": now,
        "next_seq": messages,
        "message_count": messages,
        "compacted_through": 0,
    }


def message_values(
    tenant: str, session_id: str, chat_id: str, seq: int, message: NewMessage, now: datetime
) -> dict[str, Any]:
    return {
        "tenant_id": tenant,
        "session_id": session_id,
        "chat_id": chat_id,
        "seq": seq,
        "message_id": new_id(),
        "role": message.role,
        "content": message.content,
        "metadata": message.metadata,
        "tokens": message.tokens,
        "created_at": now,
        "compacted": False,
    }


async def insert_chat(
    repo: ConversationRepository,
    conn: Connection,
    now: datetime,
    tenant: str,
    session_id: str,
    chat_id: str,
    system_prompt: NewMessage | None,
    name: str | None = None,
    metadata: dict[str, Any] | None = None,
    max_messages: int | None = None,
) -> Chat | None:
    """Insert a chat (and its system prompt as message 1); None if the id is taken."""
    chat = await repo.insert_chat(
        conn,
        chat_values(
            tenant,
            session_id,
            chat_id,
            now,
            name=name,
            metadata=metadata,
            max_messages=max_messages,
            messages=0 if system_prompt is None else 1,
        ),
    )
    if chat is None:
        return None
    if system_prompt is not None:
        await repo.insert_messages(
            conn, [message_values(tenant, session_id, chat_id, 1, system_prompt, now)]
        )
    return chat


def message_cap(max_messages: object, setting: int | None) -> int | None:
    """The cap a new chat gets: ``max_messages`` (None: no cap), or the ``setting``."""
    if max_messages is FROM_SETTINGS:
        return setting
    return None if max_messages is None else v.limit(max_messages, "max_messages")
