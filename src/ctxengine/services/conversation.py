"""Conversation (SPEC §4): chats and their ordered messages, trimmed by whole turns."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from .. import validation as v
from ..errors import (
    ChatLimitError,
    ChatNotFoundError,
    ConflictError,
    HistoryLimitError,
    SessionNotFoundError,
    ValidationError,
)
from ..ids import new_id
from ..models import Chat, Message, Session, SessionStats
from ..storage.connection import Connection
from ..storage.group import SOLO, Combiner, Solo
from ..storage.repositories.conversation import Appended, ConversationRepository
from . import documents as d
from . import history
from .base import Context, Effects, done
from .chats import NewMessage, insert_chat, message_cap, message_values

if TYPE_CHECKING:
    from .sessions import SessionService

D = TypeVar("D", bound=d.ConversationDoc)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


#: Above every sequence number.
_NO_SEQ_ABOVE = 2**63 - 1

#: The most chats remembered as full (see ``ConversationService._full``); all are
#: forgotten when a new one would pass it.
_FULL_CHATS_KEPT = 10_000

#: The most characters of content an add_messages call brings to a combined batch
#: (the batch's document, a parameter of one statement, stays well within the
#: database's bounds): a call with more appends in a statement of its own.
_COMBINED_CONTENT_MAX = 32_768


class _Call(NamedTuple):
    """An add_messages call that may be combined with others (see ``_append_many``)."""

    tenant: str
    session_id: str
    chat_id: str | None
    new: Sequence[NewMessage]


#: What a combined call appended: its messages, and the append.
_Combined = tuple[list[Message], Appended]


class ConversationService:
    """Business rules of SPEC §4, for any tenant."""

    def __init__(self, ctx: Context, sessions: SessionService) -> None:
        self.ctx = ctx
        self.sessions = sessions
        self.repo = ConversationRepository(ctx.store.backend)
        #: Chats (tenant, session_id, chat_id as asked) whose last append trimmed them:
        #: the next one skips the combined append, which would find no room. A hint
        #: only: the transaction taken instead is right whatever the chat holds.
        self._full: set[tuple[str, str, str | None]] = set()
        #: concurrent appends, written together
        self._appender: Combiner[_Call, _Combined] = Combiner(self._append_many)
        #: With ``history_overflow="compact"``: told after each committed append
        #: (tenant, session_id, chat_id, whether the chat is past its cap).
        self.appended: Callable[[str, str, str, bool], None] | None = None

    # -- input ----------------------------------------------------------------------------
    def new_message(
        self,
        role: object,
        content: object,
        metadata: object = None,
        tokens: object = None,
        *,
        summary: bool = False,
    ) -> NewMessage:
        """Validate a message and redact its content: text as text; JSON data (a dict or
        a list) value by value, then stored as its compact JSON text. Only a ``summary``
        may carry ``summary_of`` metadata."""
        role = v.choice_of(d.ROLES, role, "role")
        redactor = self.ctx.redactor
        if isinstance(content, Mapping | list):
            v.json_text(content, "content")  # JSON data only, before anything reads it
            data = redactor.redact_data(content) if redactor.active else content
            content = v.json_text(data, "content")
        elif isinstance(content, str) and redactor.active:
            content = redactor.redact(content)
        text = v.text(content, "content", self.ctx.settings.max_message_bytes)
        if not text and role in ("system", "user"):
            raise ValidationError(f"a {role} message needs content", field="content")
        data = v.json_object(metadata, "metadata", self.ctx.settings.max_metadata_bytes)
        if history.SUMMARY_OF in data and not summary:
            raise ValidationError(
                f"metadata {history.SUMMARY_OF!r} marks a summary, which only "
                "compact_history writes",
                field="metadata",
            )
        return NewMessage(role, text, data, None if tokens is None else v.count(tokens, "tokens"))

    def _chat_options(
        self, name: object, metadata: object, max_messages: object
    ) -> tuple[str | None, dict[str, Any], int | None]:
        if name is not None and not isinstance(name, str):
            raise ValidationError("chat name must be a string", field="name")
        return (
            name,
            v.json_object(metadata, "metadata", self.ctx.settings.max_metadata_bytes),
            message_cap(max_messages, self.ctx.settings.max_messages_per_chat),
        )

    async def _missing_chat(
        self, conn: Connection, tenant: str, session_id: str, chat_id: str | None
    ) -> ChatNotFoundError:
        """The error for a chat that was not found (SessionNotFoundError is raised when
        the session itself is missing)."""
        if await self.repo.current_chat(conn, tenant, session_id) is None:
            raise SessionNotFoundError(session_id, tenant)
        return ChatNotFoundError(session_id, chat_id)

    async def _resolve_chat(
        self, conn: Connection, tenant: str, session_id: str, chat_id: str | None
    ) -> str:
        """``chat_id``, or the session's current chat when None."""
        if chat_id is not None:
            return chat_id
        current = await self.repo.current_chat(conn, tenant, session_id)
        if current is None:
            raise SessionNotFoundError(session_id, tenant)
        if current.chat_id is None:
            raise ChatNotFoundError(session_id, None)
        return current.chat_id

    async def _lock_chat(
        self, conn: Connection, tenant: str, session_id: str, chat_id: str | None
    ) -> tuple[str, int]:
        """Resolve and lock the chat; (chat_id, message_count)."""
        chat = await self._resolve_chat(conn, tenant, session_id, chat_id)
        taken = await self.repo.take_seqs(conn, tenant, session_id, chat, 0)
        if taken is None:
            raise await self._missing_chat(conn, tenant, session_id, chat)
        return chat, taken.message_count

    # -- chats ----------------------------------------------------------------------------
    async def create_chat(
        self,
        tenant: str,
        session_id: str,
        *,
        chat_id: str | None,
        name: object,
        system_prompt: object,
        metadata: object,
        max_messages: object,
    ) -> Chat:
        v.identifier(session_id)
        cid = new_id() if chat_id is None else v.identifier(chat_id, "chat_id")
        options = self._chat_options(name, metadata, max_messages)
        prompt = None if system_prompt is None else self.new_message("system", system_prompt)
        limit = self.ctx.settings.max_chats_per_session

        async def work(conn: Connection, fx: Effects) -> Chat | None:
            session = await self.sessions.touch_active(conn, fx, tenant, session_id)
            if session is None:
                return None
            if not await self.repo.reserve_chat(conn, tenant, session_id, limit):
                assert limit is not None
                raise ChatLimitError(session_id, limit)
            chat = await insert_chat(
                self.repo, conn, fx.now, tenant, session_id, cid, prompt, *options
            )
            if chat is None:
                raise ValidationError(
                    f"session {session_id!r} already has a chat {cid!r}", field="chat_id"
                )
            return chat

        return done(await self.ctx.transact(work, operation="create_chat"))

    async def list_chats(self, tenant: str, session_id: str) -> list[Chat]:
        v.identifier(session_id)

        async def work(conn: Connection, fx: Effects) -> list[Chat]:
            chats = await self.repo.chats(conn, tenant, session_id)
            if not chats and await self.repo.current_chat(conn, tenant, session_id) is None:
                raise SessionNotFoundError(session_id, tenant)
            return chats

        return await self.ctx.transact(work, write=False, operation="list_chats")

    async def get_chat(self, tenant: str, session_id: str, chat_id: str) -> Chat | None:
        v.identifier(session_id)
        v.identifier(chat_id, "chat_id")

        async def work(conn: Connection, fx: Effects) -> Chat | None:
            chat = await self.repo.get_chat(conn, tenant, session_id, chat_id)
            if chat is None:
                await self._missing_chat(conn, tenant, session_id, chat_id)
            return chat

        return await self.ctx.transact(work, write=False, operation="get_chat")

    async def switch_chat(self, tenant: str, session_id: str, chat_id: str) -> Session:
        v.identifier(session_id)
        v.identifier(chat_id, "chat_id")

        async def work(conn: Connection, fx: Effects) -> Session:
            if await self.repo.get_chat(conn, tenant, session_id, chat_id) is None:
                raise await self._missing_chat(conn, tenant, session_id, chat_id)
            await self.repo.set_current_chat(conn, tenant, session_id, chat_id)
            return await self.sessions.read(conn, fx.now, tenant, session_id)

        return await self.ctx.transact(work, operation="switch_chat")

    async def delete_chat(self, tenant: str, session_id: str, chat_id: str) -> bool:
        v.identifier(session_id)
        v.identifier(chat_id, "chat_id")

        async def work(conn: Connection, fx: Effects) -> bool:
            if not await self.repo.lock_session(conn, tenant, session_id):
                raise SessionNotFoundError(session_id, tenant)
            return await self.repo.delete_chat(conn, tenant, session_id, chat_id)

        return await self.ctx.transact(work, operation="delete_chat")

    # -- messages -------------------------------------------------------------------------
    async def add_messages(
        self,
        tenant: str,
        session_id: str,
        new: Sequence[NewMessage],
        chat_id: str | None,
        if_last_seq: int | None = None,
    ) -> list[Message]:
        """Append ``new`` in order to a chat of an active session, in one transaction
        (only if the chat's newest message is ``if_last_seq`` when given)."""
        v.identifier(session_id)
        if chat_id is not None:
            v.identifier(chat_id, "chat_id")
        if if_last_seq is not None:
            v.count(if_last_seq, "if_last_seq")
        settings = self.ctx.settings

        hint = (tenant, session_id, chat_id)
        trims = settings.history_overflow == "trim"
        # the one-statement append (then trimming) checks no expected seq
        trims_at_once = trims and self.repo.appends_at_once(len(new)) and if_last_seq is None
        # concurrent calls are written together, but for a chat known full that trims
        combines = (
            self.repo.appends_together(len(new))
            and if_last_seq is None
            and not (trims and hint in self._full)
        )
        starts_turn = bool(new) and new[0].role == "user"
        #: the chat written to, and whether it is now past its cap
        written: list[tuple[str, bool]] = []

        async def append_anyway(conn: Connection, fx: Effects) -> list[Message] | None:
            """ONE statement appending the messages if the session can work, whatever the
            chat's room, the history then trimmed by a new statement (which sees what
            concurrent trimmers of the chat, whose lock it waited for, deleted); None,
            with nothing written, when the session cannot work or the chat is missing."""
            rows = [message_values(tenant, session_id, "", 0, m, fx.now) for m in new]
            appended = await self.repo.append(conn, rows, chat_id, room=False)
            if appended is None:
                return None
            chat, last = appended.chat_id, appended.last_seq
            first, count, limit = last - len(rows) + 1, appended.message_count, appended.limit
            over = await self._keep_limit(
                conn, fx, tenant, session_id, chat, first, count, limit, starts_turn
            )
            self._note_fullness(hint, count, limit)
            written.append((chat, over))
            return self._added(fx, appended.user_id, _placed(rows, chat, last))

        async def work(conn: Connection, fx: Effects) -> list[Message] | None:
            if trims_at_once:
                added = await append_anyway(conn, fx)
                if added is not None:
                    return added
            session = await self.sessions.touch_active(conn, fx, tenant, session_id)
            if session is None:
                return None
            chat = chat_id if chat_id is not None else session.current_chat_id
            if chat is None:
                raise ChatNotFoundError(session_id, None)
            # Locks the chat row until commit: sequence numbers follow commit order.
            taken = await self.repo.take_seqs(conn, tenant, session_id, chat, len(new))
            if taken is None:
                raise ChatNotFoundError(session_id, chat)
            first = taken.next_seq - len(new) + 1
            if if_last_seq is not None:
                newest = await self._shown_last(conn, tenant, session_id, chat, first)
                last = 0 if newest is None else newest.seq
                if last != if_last_seq:
                    raise ConflictError(
                        f"the newest seq of chat {chat!r} of session {session_id!r}",
                        if_last_seq,
                        last,
                    )
            count, limit = taken.message_count, taken.max_messages
            over = await self._keep_limit(
                conn, fx, tenant, session_id, chat, first, count, limit, starts_turn
            )
            if trims:
                self._note_fullness(hint, count, limit)
            rows = [
                message_values(tenant, session_id, chat, first + i, message, fx.now)
                for i, message in enumerate(new)
            ]
            await self.repo.insert_messages(conn, rows)
            written.append((chat, over))
            return self._added(fx, session.user_id, rows)

        with self.ctx.observing("add_message"):
            if combines:
                # group commit (a batch of one at once), written when the session can
                # work and the chat has room (with "compact", whatever its room)
                call = _Call(tenant, session_id, chat_id, new)
                if sum(len(m.content) for m in new) <= _COMBINED_CONTENT_MAX:
                    combined = await self._appender(call)
                else:  # a batch's document stays small: large content goes alone
                    (combined,) = await self._append_many((call,))
                if not isinstance(combined, Solo):
                    added, appended = combined
                    over = self.ctx.settings.history_overflow == "compact" and _past(
                        appended.message_count, appended.limit
                    )
                    self._notify(tenant, session_id, [(appended.chat_id, over)])
                    return added
            # anything else (refusals, trimming the history, an expected seq) takes the
            # general transaction
            added = done(await self.ctx.transact(work, operation="add_message", observed=True))
        self._notify(tenant, session_id, written)
        return added

    async def _append_many(self, calls: Sequence[_Call]) -> list[_Combined | Solo]:
        """add_messages calls written together, in one statement where the backend can
        (see ``ConversationRepository.append_many``): SOLO for a call nothing was
        written for, which then takes the general transaction."""
        room = self.ctx.settings.history_overflow != "compact"

        async def work(conn: Connection, fx: Effects) -> list[_Combined | Solo]:
            batch = [
                (
                    call.chat_id,
                    [
                        message_values(call.tenant, call.session_id, "", 0, m, fx.now)
                        for m in call.new
                    ],
                )
                for call in calls
            ]
            results: list[_Combined | Solo] = []
            written = await self.repo.append_many(conn, batch, fx.now, room=room)
            for (_, rows), appended in zip(batch, written, strict=True):
                if appended is None:
                    results.append(SOLO)
                    continue
                placed = _placed(rows, appended.chat_id, appended.last_seq)
                results.append((self._added(fx, appended.user_id, placed), appended))
            return results

        return await self.ctx.transact(
            work,
            one_statement=self.repo.writes_at_once,
            operation="add_message",
            observed=True,
        )

    def _note_fullness(
        self, hint: tuple[str, str, str | None], count: int, limit: int | None
    ) -> None:
        """Remember whether the chat of ``hint`` is full after an append that trims
        (``count`` messages once it was added): see ``_full``."""
        if limit is None or count < limit:
            self._full.discard(hint)
            return
        if len(self._full) >= _FULL_CHATS_KEPT:
            self._full.clear()  # the oldest hints are as likely stale
        self._full.add(hint)

    def _notify(self, tenant: str, session_id: str, written: list[tuple[str, bool]]) -> None:
        """Tell ``appended`` (automatic compaction) of a committed append (the last
        attempt's chat: a retried unit of work records each attempt)."""
        if self.appended is not None and written:
            chat, over = written[-1]
            self.appended(tenant, session_id, chat, over)

    async def _shown_last(
        self, conn: Connection, tenant: str, session_id: str, chat: str, below: int
    ) -> Message | None:
        """The last message of the chat's history as shown (see ``history``) among the
        messages below seq ``below``."""
        last = await self._shown(conn, tenant, session_id, chat, 1, below)
        return last[-1] if last else None

    async def _keep_limit(
        self,
        conn: Connection,
        fx: Effects,
        tenant: str,
        session_id: str,
        chat: str,
        first: int,
        count: int,
        limit: int | None,
        starts_turn: bool,
    ) -> bool:
        """With ``count`` messages in the chat (its row locked) once the messages from
        seq ``first`` on are added (``starts_turn``: the first of them is a user
        message): trim the oldest whole turns below ``first`` down to ``limit``, or raise
        HistoryLimitError ("reject", or too few whole turns to trim: the unit of work
        is then rolled back). With "compact", nothing here: whether the chat is past
        its limit (compaction follows the commit)."""
        if not _past(count, limit):
            return False
        assert limit is not None
        excess = count - limit
        overflow = self.ctx.settings.history_overflow
        if overflow == "compact":
            return True
        if overflow == "reject":
            raise HistoryLimitError(session_id, chat, limit)
        removed = await self.repo.delete_oldest_turns(
            conn,
            tenant,
            session_id,
            chat,
            excess,
            keep_system=True,
            below_seq=first,
            turn_starts_below=starts_turn,
        )
        if removed < excess:
            raise HistoryLimitError(session_id, chat, limit)
        self._trimmed(fx, tenant, session_id, chat, removed)
        return False

    @staticmethod
    def _trimmed(fx: Effects, tenant: str, session_id: str, chat: str, removed: int) -> None:
        if removed:
            fx.emit("history.trimmed", tenant, session_id, chat_id=chat, removed=removed)

    @staticmethod
    def _added(fx: Effects, user_id: str, rows: list[dict[str, Any]]) -> list[Message]:
        """Announce the inserted ``rows`` (message values) and return them as Messages."""
        for values in rows:
            fx.emit(
                "message.added",
                values["tenant_id"],
                values["session_id"],
                user_id,
                chat_id=values["chat_id"],
                seq=values["seq"],
                role=values["role"],
            )
        return [Message._trusted(_public_message(values)) for values in rows]

    async def get_messages(
        self,
        tenant: str,
        session_id: str,
        chat_id: str | None,
        limit: int | None,
        before_seq: int | None,
        include_compacted: bool = False,
    ) -> list[Message]:
        v.identifier(session_id)
        if chat_id is not None:
            v.identifier(chat_id, "chat_id")
        if limit is not None:
            v.limit(limit)
        if before_seq is not None:
            v.count(before_seq, "before_seq")

        async def work(conn: Connection, fx: Effects) -> list[Message]:
            if include_compacted:  # every stored message, by seq
                page = await self.repo.page(
                    conn, tenant, session_id, chat_id, limit, before_seq, include_compacted=True
                )
                page.reverse()
            else:
                page = await self._shown(conn, tenant, session_id, chat_id, limit, before_seq)
            if not page:
                chat = await self._resolve_chat(conn, tenant, session_id, chat_id)
                if await self.repo.get_chat(conn, tenant, session_id, chat) is None:
                    raise await self._missing_chat(conn, tenant, session_id, chat)
            return page

        return await self.ctx.transact(work, write=False, operation="get_messages")

    async def _shown(
        self,
        conn: Connection,
        tenant: str,
        session_id: str,
        chat_id: str | None,
        limit: int | None,
        before_seq: int | None,
    ) -> list[Message]:
        """The last ``limit`` messages of the history shown before the message at
        ``before_seq`` (or below seq ``before_seq``, when no message has it), in order:
        the latest summary where the messages it replaced stood (see ``history``)."""
        recent = await self.repo.recent(conn, tenant, session_id, chat_id, limit, before_seq)
        if recent.floor == 0:  # never compacted: the page is the history shown
            recent.page.reverse()
            return recent.page
        wanted = None if limit is None else limit + 1  # the summary may be one of them
        system, page, floor = await self.repo.page_with_system(
            conn, tenant, session_id, chat_id, wanted, before_seq
        )
        summary = history.latest_summary(system)
        below = history.bound(before_seq, summary)
        if summary is not None and before_seq == summary.seq:
            # before the summary: the messages before the range it replaced
            page = []
        older = [m for m in system if m.seq <= floor]
        return history.arrange(page, older, summary, below, limit)

    async def count_messages(self, tenant: str, session_id: str, chat_id: str | None) -> int:
        v.identifier(session_id)

        async def work(conn: Connection, fx: Effects) -> int:
            chat = await self._resolve_chat(conn, tenant, session_id, chat_id)
            found = await self.repo.get_chat(conn, tenant, session_id, chat)
            if found is None:
                raise await self._missing_chat(conn, tenant, session_id, chat)
            return found.message_count

        return await self.ctx.transact(work, write=False, operation="count_messages")

    async def pop_message(
        self, tenant: str, session_id: str, chat_id: str | None
    ) -> Message | None:
        v.identifier(session_id)

        async def work(conn: Connection, fx: Effects) -> Message | None:
            chat, _ = await self._lock_chat(conn, tenant, session_id, chat_id)
            last = await self._shown_last(conn, tenant, session_id, chat, _NO_SEQ_ABOVE)
            if last is not None:
                await self.repo.delete_message(conn, tenant, session_id, chat, last)
            return last

        return await self.ctx.transact(work, operation="pop_message")

    async def clear_messages(
        self, tenant: str, session_id: str, chat_id: str | None, keep_system: bool
    ) -> int:
        v.identifier(session_id)

        async def work(conn: Connection, fx: Effects) -> int:
            chat, _ = await self._lock_chat(conn, tenant, session_id, chat_id)
            return await self.repo.delete_messages(
                conn, tenant, session_id, chat, keep_system=keep_system
            )

        return await self.ctx.transact(work, operation="clear_messages")

    async def trim_history(
        self,
        tenant: str,
        session_id: str,
        keep_last: int,
        keep_system: bool,
        chat_id: str | None,
    ) -> int:
        v.identifier(session_id)
        keep = v.count(keep_last, "keep_last")

        async def work(conn: Connection, fx: Effects) -> int:
            chat, total = await self._lock_chat(conn, tenant, session_id, chat_id)
            if keep_system:
                total = await self.repo.count_where(conn, tenant, session_id, chat, system=False)
            # keeping none removes every turn, the newest too (that splits nothing)
            removed = await self.repo.delete_oldest_turns(
                conn,
                tenant,
                session_id,
                chat,
                total - keep,
                keep_system=keep_system,
                turn_starts_below=keep == 0,
            )
            self._trimmed(fx, tenant, session_id, chat, removed)
            return removed

        return await self.ctx.transact(work, operation="trim_history")

    # -- statistics -----------------------------------------------------------------------
    async def stats(self, tenant: str, session_id: str) -> SessionStats:
        v.identifier(session_id)

        async def work(conn: Connection, fx: Effects) -> SessionStats:
            session = await self.sessions.read(conn, fx.now, tenant, session_id)
            chats, messages = await self.repo.message_totals(conn, tenant, session_id)
            return SessionStats(
                session_id=session_id,
                chat_count=chats,
                total_messages=messages,
                created_at=session.created_at,
                last_activity=session.last_activity,
                is_active=session.is_active,
                is_paused=session.is_paused,
            )

        return await self.ctx.transact(work, write=False, operation="get_session_stats")

    async def total_messages(self, conn: Connection, tenant: str) -> int:
        return (await self.repo.message_totals(conn, tenant))[1]


def _past(count: int, limit: int | None) -> bool:
    """Whether a chat holding ``count`` messages is past its cap ``limit``."""
    return limit is not None and count > limit


def _public_message(values: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if key != "tenant_id"}


def _placed(rows: list[dict[str, Any]], chat_id: str, last_seq: int) -> list[dict[str, Any]]:
    """``rows`` (message values) given their chat and consecutive seqs up to ``last_seq``."""
    for seq, values in enumerate(rows, start=last_seq - len(rows) + 1):
        values["chat_id"], values["seq"] = chat_id, seq
    return rows
