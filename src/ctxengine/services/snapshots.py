"""Snapshots of a session's conversation (SPEC §4): checkpoints and restore, export and
import."""

from __future__ import annotations

import math
from collections import Counter
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from .. import validation as v
from ..errors import (
    CheckpointNotFoundError,
    SessionExistsError,
    SessionNotFoundError,
    ValidationError,
)
from ..ids import new_id
from ..lifecycle import OPEN_STATUSES, idle_deadline
from ..models import Checkpoint, Session
from ..storage.connection import Connection
from ..storage.repositories.conversation import ConversationRepository
from ..storage.repositories.quotas import QuotaRepository
from . import documents as d
from .base import Context, Effects

if TYPE_CHECKING:
    from .sessions import SessionService

D = TypeVar("D", bound=d.ConversationDoc)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


class SnapshotService:
    """Checkpoints and export/import of a session's chats, messages and metadata."""

    def __init__(self, ctx: Context, sessions: SessionService) -> None:
        self.ctx = ctx
        self.sessions = sessions
        self.repo = ConversationRepository(ctx.store.backend)
        self.quotas = QuotaRepository(ctx.store.backend)

    async def _conversation(
        self, conn: Connection, tenant: str, session_id: str, session: Session
    ) -> dict[str, Any]:
        """The conversation part of a checkpoint or export, JSON-safe."""
        chats = await self.repo.stored_chats(conn, tenant, session_id)
        messages = await self.repo.all_messages(conn, tenant, session_id)
        return {
            "metadata": session.metadata,
            "current_chat_id": session.current_chat_id,
            "chats": [
                {
                    "chat_id": c.chat_id,
                    "name": c.name,
                    "metadata": c.metadata,
                    "max_messages": c.max_messages,
                    "created_at": _iso(c.created_at),
                    "next_seq": c.next_seq,
                }
                for c in chats
            ],
            "messages": [
                {
                    "chat_id": m.chat_id,
                    "seq": m.seq,
                    "message_id": m.message_id,
                    "role": m.role,
                    "content": m.content,
                    "metadata": m.metadata,
                    "tokens": m.tokens,
                    "created_at": _iso(m.created_at),
                    # only when true: documents of chats never compacted stay as they were
                    **({"compacted": True} if m.compacted else {}),
                }
                for m in messages
            ],
        }

    async def _put_conversation(
        self, conn: Connection, tenant: str, session_id: str, doc: d.ConversationDoc
    ) -> None:
        """Replace the session's chats, messages, metadata and current chat with ``doc``
        (the session row must already be locked or new)."""
        await self.repo.restore_session_columns(
            conn,
            tenant,
            session_id,
            metadata=doc.metadata,
            current_chat_id=doc.current_chat_id,
            chat_count=len(doc.chats),
        )
        await self.repo.delete_chats(conn, tenant, session_id)
        counts = Counter(m.chat_id for m in doc.messages if not m.compacted)
        await self.repo.insert_chats(
            conn,
            [
                {
                    "tenant_id": tenant,
                    "session_id": session_id,
                    **c.model_dump(),
                    "message_count": counts[c.chat_id],
                    "compacted_through": _compacted_through(doc.messages, c.chat_id),
                }
                for c in doc.chats
            ],
        )
        await self.repo.insert_messages(
            conn,
            [
                {"tenant_id": tenant, "session_id": session_id, **m.model_dump()}
                for m in doc.messages
            ],
        )

    def _checked(self, doc: D) -> D:
        """Metadata of every level is JSON within max_metadata_bytes; content redacted."""
        max_bytes = self.ctx.settings.max_metadata_bytes
        v.json_object(doc.metadata, "metadata", max_bytes)
        for chat in doc.chats:
            v.json_object(chat.metadata, "chat metadata", max_bytes)
        messages = []
        for m in doc.messages:
            v.json_object(m.metadata, "message metadata", max_bytes)
            text = v.text(m.content, "content", self.ctx.settings.max_message_bytes)
            messages.append(m.model_copy(update={"content": self.ctx.redactor.redact(text)}))
        return doc.model_copy(update={"messages": messages})

    async def checkpoint(self, tenant: str, session_id: str, description: object) -> Checkpoint:
        v.identifier(session_id)
        if not isinstance(description, str):
            raise ValidationError("description must be a string", field="description")

        async def work(conn: Connection, fx: Effects) -> Checkpoint:
            if not await self.repo.lock_session(conn, tenant, session_id):
                raise SessionNotFoundError(session_id, tenant)
            session = await self.sessions.read(conn, fx.now, tenant, session_id)
            return await self.repo.insert_checkpoint(
                conn,
                {
                    "tenant_id": tenant,
                    "session_id": session_id,
                    "checkpoint_id": new_id(),
                    "description": description,
                    "created_at": fx.now,
                    "content": await self._conversation(conn, tenant, session_id, session),
                },
            )

        return await self.ctx.transact(work, operation="checkpoint")

    async def list_checkpoints(self, tenant: str, session_id: str) -> list[Checkpoint]:
        v.identifier(session_id)

        async def work(conn: Connection, fx: Effects) -> list[Checkpoint]:
            checkpoints = await self.repo.checkpoints(conn, tenant, session_id)
            if not checkpoints and await self.repo.current_chat(conn, tenant, session_id) is None:
                raise SessionNotFoundError(session_id, tenant)
            return checkpoints

        return await self.ctx.transact(work, write=False, operation="list_checkpoints")

    async def restore_checkpoint(self, tenant: str, session_id: str, checkpoint_id: str) -> Session:
        v.identifier(session_id)
        v.identifier(checkpoint_id, "checkpoint_id")

        async def work(conn: Connection, fx: Effects) -> Session:
            if not await self.repo.lock_session(conn, tenant, session_id):
                raise SessionNotFoundError(session_id, tenant)
            content = await self.repo.checkpoint_content(conn, tenant, session_id, checkpoint_id)
            if content is None:
                raise CheckpointNotFoundError(session_id, checkpoint_id)
            doc = d.parse(d.ConversationDoc, content, "checkpoint")
            await self._put_conversation(conn, tenant, session_id, doc)
            return await self.sessions.read(conn, fx.now, tenant, session_id)

        return await self.ctx.transact(work, operation="restore_checkpoint")

    # -- export and import ----------------------------------------------------------------
    async def export(self, tenant: str, session_id: str) -> dict[str, Any]:
        v.identifier(session_id)

        async def work(conn: Connection, fx: Effects) -> dict[str, Any]:
            # Holding the session row keeps concurrent writers out of the copy.
            if not await self.repo.lock_session(conn, tenant, session_id):
                raise SessionNotFoundError(session_id, tenant)
            session = await self.sessions.read(conn, fx.now, tenant, session_id)
            quotas = await self.quotas.quota_rows(conn, tenant, session_id)
            s = session.to_dict()
            return {
                "format_version": d.FORMAT_VERSION,
                "session": {field: s[field] for field in d.SessionDoc.model_fields},
                **await self._conversation(conn, tenant, session_id, session),
                "quotas": [
                    {"resource_type": kind, "used": used, "limit": limit, "custom": custom}
                    for kind, (used, limit, custom) in sorted(quotas.items())
                ],
            }

        return await self.ctx.transact(work, operation="export_session")

    async def import_(self, tenant: str, data: object, new_session_id: str | None) -> Session:
        doc = self._checked(d.parse(d.ExportDoc, data, "export"))
        source = doc.session
        sid = source.session_id if new_session_id is None else v.identifier(new_session_id)
        settings = self.ctx.settings
        v.tier(source.tier, settings.tiers)
        v.json_object(source.preferences, "preferences", settings.max_metadata_bytes)
        if not math.isfinite(source.total_processing_time):
            raise ValidationError("total_processing_time must be finite", field="data")

        timeout = (
            source.idle_timeout
            if "idle_timeout" in source.model_fields_set
            else settings.session_timeout
        )

        async def work(conn: Connection, fx: Effects) -> Session:
            if source.status in OPEN_STATUSES:
                await self.sessions.check_limits(conn, tenant, source.user_id, fx.now)
            values = {
                **source.model_dump(),
                "idle_timeout": timeout,
                "idle_deadline": idle_deadline(source.last_activity, timeout),
                "session_id": sid,
                "tenant_id": tenant,
                "status": source.status.value,
                "metadata": {},
                "current_chat_id": None,
                "chat_count": 0,
            }
            if await self.sessions.repo.insert(conn, values, fx.now) is None:
                raise SessionExistsError(sid, tenant)
            await self._put_conversation(conn, tenant, sid, doc)
            await self.quotas.restore_quotas(
                conn,
                tenant,
                sid,
                [(q.resource_type.value, q.used, q.limit, q.custom) for q in doc.quotas],
            )
            session = await self.sessions.read(conn, fx.now, tenant, sid)
            fx.emit(
                "session.created", tenant, sid, session.user_id, tier=session.tier, imported=True
            )
            return session

        return await self.ctx.transact(work, operation="import_session")


def _compacted_through(messages: list[d.MessageDoc], chat_id: str) -> int:
    """The chat's floor, as compaction leaves it: the end of its latest summary's range,
    or the newest compacted message (system messages aside) below every message not
    compacted, whichever is higher (0: never compacted)."""
    mine = [m for m in messages if m.chat_id == chat_id]
    conversation = [m for m in mine if m.role != "system"]
    first_shown = min((m.seq for m in conversation if not m.compacted), default=2**63 - 1)
    ends = [
        m.metadata["summary_of"][1] for m in mine if "summary_of" in m.metadata and not m.compacted
    ]
    compacted = (m.seq for m in conversation if m.compacted and m.seq < first_shown)
    return max([*compacted, *(end for end in ends if end < first_shown)], default=0)
