"""Context windows and compaction (SPEC §14): the newest whole turns within a token
budget, old turns replaced by a summary, and compaction that follows appends."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, NamedTuple

from .. import validation as v
from ..errors import ChatNotFoundError, ConflictError, SessionNotFoundError, ValidationError
from ..models import ContextWindow, Message
from ..storage.connection import Connection
from ..tokens import Summarizer, estimate_tokens
from . import history
from .base import Context, Effects
from .chats import message_values

if TYPE_CHECKING:
    from .conversation import ConversationService

log = logging.getLogger("ctxengine.compaction")

#: A chat, as automatic compaction names it: (tenant, session_id, chat_id).
ChatKey = tuple[str, str, str]

#: Token counts remembered, by (message_id, length of its content); all are forgotten
#: when a new one would pass it.
_COUNTS_KEPT = 100_000
#: Messages a context window's first page reads: one per this many tokens of its
#: budget (most messages are longer), between ``_PAGE_MIN`` and ``_PAGE_MAX``; later
#: pages read what the rest of the budget holds at the average seen so far.
_TOKENS_PER_ROW_GUESS = 48
_PAGE_MIN = 16
_PAGE_MAX = 4000
#: Seconds close() gives running compactions before cancelling them.
_STOP_GRACE = 1.0


class _Plan(NamedTuple):
    """What a compaction replaces, as read before its summarizer runs."""

    chat: str
    summary: Message | None
    replaced: list[Message]


class ContextService:
    """``get_context``, ``compact_history`` and ``purge_compacted``, and the automatic
    compaction of ``history_overflow="compact"``: one background task per chat at a
    time, owned by the engine (``stop`` on close)."""

    def __init__(self, ctx: Context, conversation: ConversationService) -> None:
        self.ctx = ctx
        self.conversation = conversation
        self.repo = conversation.repo
        self._counter = ctx.settings.token_counter or estimate_tokens
        self._counts: dict[tuple[str, int], int] = {}
        self._tasks: dict[ChatKey, asyncio.Task[None]] = {}
        #: chats appended to while their compaction ran: looked at again after it
        self._again: set[ChatKey] = set()
        self._stopping = False
        if ctx.settings.history_overflow == "compact":
            conversation.appended = self._appended

    # -- tokens ---------------------------------------------------------------------------
    def tokens(self, message: Message) -> int:
        """The message's ``tokens`` when given, else the counter's count of its content."""
        if message.tokens is not None:
            return message.tokens
        key = (message.message_id, len(message.content))
        counted = self._counts.get(key)
        if counted is None:
            counted = self._counter(message.content)
            if isinstance(counted, bool) or not isinstance(counted, int) or counted < 0:
                raise ValidationError(
                    f"token_counter must return a whole number >= 0, got {counted!r}",
                    field="token_counter",
                )
            if len(self._counts) >= _COUNTS_KEPT:
                self._counts.clear()
            self._counts[key] = counted
        return counted

    # -- context windows ------------------------------------------------------------------
    async def get_context(
        self,
        tenant: str,
        session_id: str,
        chat_id: str | None,
        max_tokens: object,
        keep_system: bool,
    ) -> ContextWindow:
        v.identifier(session_id)
        if chat_id is not None:
            v.identifier(chat_id, "chat_id")
        budget = v.limit(max_tokens, "max_tokens")

        async def work(conn: Connection, fx: Effects) -> ContextWindow:
            return await self._window(conn, tenant, session_id, chat_id, budget, keep_system)

        return await self.ctx.transact(work, write=False, operation="get_context")

    async def _window(
        self,
        conn: Connection,
        tenant: str,
        session_id: str,
        chat_id: str | None,
        max_tokens: int,
        keep_system: bool,
    ) -> ContextWindow:
        """Read the chat newest first, page by page, keeping whole turns (a turn starts
        at a user message, so a tool result never comes without its call) while they
        fit; with ``keep_system`` the system messages and the summary come first and
        count first."""
        first_page = min(_PAGE_MAX, max(_PAGE_MIN, max_tokens // _TOKENS_PER_ROW_GUESS))
        system, page, floor = await self.repo.page_with_system(
            conn, tenant, session_id, chat_id, first_page, None, conversation=keep_system
        )
        if not system and not page:
            resolved = await self.conversation._resolve_chat(conn, tenant, session_id, chat_id)
            if await self.repo.get_chat(conn, tenant, session_id, resolved) is None:
                raise await self.conversation._missing_chat(conn, tenant, session_id, resolved)
        summary = history.latest_summary(system)
        pinned = system if keep_system else []
        pinned_tokens = sum(self.tokens(m) for m in pinned)
        budget = max_tokens - pinned_tokens
        # the chat read (when the current one was asked for, later pages read it too)
        chat = (system or page)[0].chat_id if (system or page) else None

        # what stands below the pages (the floor): without keep_system, the summary and
        # the system messages before the range it replaced, newest first
        tail: list[Message] = []
        if not keep_system:
            tail = [m for m in system if m.seq <= floor]
            if summary is not None:
                tail.append(summary)
            tail.sort(key=lambda m: history.position(m, summary), reverse=True)
        skip = -1 if summary is None else summary.seq

        async def newest_first() -> AsyncIterator[Message]:
            """The history shown, newest first (system messages aside with
            ``keep_system``), read a page at a time."""
            rows, size, read = page, first_page, 0
            while True:
                for message in rows:
                    if message.seq != skip:
                        read += 1
                        yield message
                if len(rows) < size:
                    break
                # what the rest of the budget holds at the tokens per message seen so far
                average = max(1.0, (max_tokens - pinned_tokens - budget_left()) / max(read, 1))
                size = max(_PAGE_MIN, min(_PAGE_MAX, int(budget_left() / average * 1.25) + 8))
                assert chat is not None
                rows = await self.repo.page(
                    conn,
                    tenant,
                    session_id,
                    chat,
                    size,
                    rows[-1].seq,
                    conversation=keep_system,
                )
            for message in tail:
                yield message

        kept: list[Message] = []
        turn: list[Message] = []
        turn_tokens = 0
        complete = True

        def budget_left() -> int:
            return budget - turn_tokens

        async for message in newest_first():
            turn.append(message)
            turn_tokens += self.tokens(message)
            if turn_tokens > budget:  # this turn cannot fit, nor any older one
                complete = False
                turn = []
                break
            if message.role == "user":  # the turn starts here: it fits whole
                kept.extend(turn)
                budget -= turn_tokens
                turn, turn_tokens = [], 0
        kept.extend(turn)  # what precedes the oldest turn read, when it all fits
        kept_tokens = sum(self.tokens(m) for m in kept)
        messages = sorted([*pinned, *kept], key=lambda m: history.position(m, summary))
        return ContextWindow._trusted(
            {
                "messages": messages,
                "tokens": pinned_tokens + kept_tokens,
                "max_tokens": max_tokens,
                "complete": complete,
            }
        )

    # -- compaction -----------------------------------------------------------------------
    async def compact(
        self,
        tenant: str,
        session_id: str,
        summarizer: Summarizer | None,
        chat_id: str | None,
        keep_last_turns: object,
        *,
        automatic: bool = False,
    ) -> Message | None:
        """Replace the turns before the last ``keep_last_turns`` (and the previous
        summary) with one summary written by ``summarizer``, run outside any
        transaction; commit only if what it read is unchanged (ConflictError otherwise,
        nothing written). The summary, or None when there was nothing to compact."""
        v.identifier(session_id)
        if chat_id is not None:
            v.identifier(chat_id, "chat_id")
        keep = v.count(keep_last_turns, "keep_last_turns")
        if not callable(summarizer):
            raise ValidationError(
                "summarizer must be an async function: await summarizer(messages) -> str",
                field="summarizer",
            )

        async def plan(conn: Connection, fx: Effects) -> _Plan | None:
            chat = await self.conversation._resolve_chat(conn, tenant, session_id, chat_id)
            if await self.repo.get_chat(conn, tenant, session_id, chat) is None:
                raise await self.conversation._missing_chat(conn, tenant, session_id, chat)
            below = _ALL
            if keep:
                start = await self.repo.turn_start_from_end(conn, tenant, session_id, chat, keep)
                if start is None:
                    return None
                below = start
            replaced = await self.repo.compactable(conn, tenant, session_id, chat, below)
            if not replaced:
                return None
            system = await self.repo.system_messages(conn, tenant, session_id, chat)
            return _Plan(chat, history.latest_summary(system), replaced)

        found = await self.ctx.transact(plan, write=False, operation="compact_history")
        if found is None:
            return None
        chat, summary, replaced = found
        text = await summarizer([summary, *replaced] if summary is not None else replaced)
        if not isinstance(text, str) or not text.strip():
            raise ValidationError(
                f"the summarizer must return the summary as a non-empty string, got {text!r}; "
                "nothing was written",
                field="summarizer",
            )
        first = replaced[0].seq
        if summary is not None:
            span = history.summary_range(summary)
            assert span is not None
            first = span[0]
        last = replaced[-1].seq
        new = self.conversation.new_message(
            "system", text, {history.SUMMARY_OF: [first, last]}, summary=True
        )
        seen = [(m.seq, m.message_id) for m in replaced]
        previous = None if summary is None else summary.seq

        async def replace(conn: Connection, fx: Effects) -> Message:
            taken = await self.repo.take_seqs(conn, tenant, session_id, chat, 1)  # locks
            if taken is None:
                raise await self.conversation._missing_chat(conn, tenant, session_id, chat)
            now = history.latest_summary(
                await self.repo.system_messages(conn, tenant, session_id, chat)
            )
            if (None if now is None else now.seq) != previous or seen != (
                await self.repo.compactable_ids(conn, tenant, session_id, chat, last + 1)
            ):
                raise ConflictError(
                    f"the history of chat {chat!r} of session {session_id!r} up to seq {last}",
                    "as the summarizer read it",
                    "changed meanwhile (compacted, trimmed or cleared)",
                )
            flagged = await self.repo.flag_compacted(
                conn, tenant, session_id, chat, last + 1, previous
            )
            row = message_values(tenant, session_id, chat, taken.next_seq, new, fx.now)
            await self.repo.insert_messages(conn, [row])
            fx.emit(
                "history.compacted",
                tenant,
                session_id,
                chat_id=chat,
                seq=taken.next_seq,
                summary_of=[first, last],
                compacted=flagged,
                automatic=automatic,
            )
            return Message._trusted({k: val for k, val in row.items() if k != "tenant_id"})

        return await self.ctx.transact(replace, operation="compact_history")

    async def purge_compacted(self, tenant: str, session_id: str) -> int:
        v.identifier(session_id)

        async def work(conn: Connection, fx: Effects) -> int:
            if not await self.repo.lock_session(conn, tenant, session_id):
                raise SessionNotFoundError(session_id, tenant)
            return await self.repo.purge_compacted(conn, tenant, session_id)

        return await self.ctx.transact(work, operation="purge_compacted")

    # -- automatic compaction -------------------------------------------------------------
    def _appended(self, tenant: str, session_id: str, chat: str, over: bool) -> None:
        """After a committed append: compact the chat in the background when it is past
        its cap, or may be past ``max_context_tokens``."""
        if over or self.ctx.settings.max_context_tokens is not None:
            self.request((tenant, session_id, chat))

    def request(self, key: ChatKey) -> None:
        """Look at the chat in a background task (one per chat; a request while it runs
        makes it look again once done)."""
        if self._stopping:
            return
        if key in self._tasks:
            self._again.add(key)
            return
        self._tasks[key] = asyncio.get_running_loop().create_task(
            self._run(key), name=f"ctxengine-compact-{key[1]}-{key[2]}"
        )

    @property
    def running(self) -> int:
        """Background compactions running now."""
        return len(self._tasks)

    async def _run(self, key: ChatKey) -> None:
        try:
            while True:
                self._again.discard(key)
                await self._compact_if_due(key)
                if key not in self._again or self._stopping:
                    return
        finally:
            self._tasks.pop(key, None)
            self._again.discard(key)

    async def _compact_if_due(self, key: ChatKey) -> None:
        """Compact the chat if it is past its cap or its history past
        ``max_context_tokens``; failures are logged and announced, never raised."""
        tenant, session_id, chat = key
        settings = self.ctx.settings
        try:
            if not await self._due(tenant, session_id, chat):
                return
            await self.compact(
                tenant,
                session_id,
                settings.summarizer,
                chat,
                settings.compact_keep_last_turns,
                automatic=True,
            )
        except ConflictError:  # another engine compacted first: look again
            self._again.add(key)
        except (SessionNotFoundError, ChatNotFoundError):
            return  # deleted meanwhile
        except Exception as exc:  # a summarizer's or the database's failure
            log.error(
                "automatic compaction failed; the history stays as it is",
                exc_info=exc,
                extra={"tenant_id": tenant, "session_id": session_id, "chat_id": chat},
            )
            with contextlib.suppress(Exception):  # announcing is best effort
                fx = Effects(self.ctx.clock(), listened=self.ctx.listened)
                fx.emit(
                    "history.compacted",
                    tenant,
                    session_id,
                    chat_id=chat,
                    automatic=True,
                    error=str(exc),
                    error_type=type(exc).__name__,
                )
                await self.ctx.announce(fx.events)

    async def _due(self, tenant: str, session_id: str, chat: str) -> bool:
        found = await self.conversation.get_chat(tenant, session_id, chat)
        if found is None:
            return False
        if found.max_messages is not None and found.message_count > found.max_messages:
            return True
        budget = self.ctx.settings.max_context_tokens
        if budget is None:
            return False
        window = await self.get_context(tenant, session_id, chat, budget, True)
        return not window.complete or window.tokens > budget

    async def stop(self, grace: float = _STOP_GRACE) -> None:
        """Start no more compactions; wait up to ``grace`` seconds for those running,
        then cancel them (a cancelled one writes nothing)."""
        self._stopping = True
        tasks: Sequence[asyncio.Task[None]] = list(self._tasks.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=grace)


#: Above every sequence number: a compaction that keeps no turn replaces them all.
_ALL = 2**63 - 1
