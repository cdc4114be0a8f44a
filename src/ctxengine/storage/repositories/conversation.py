"""SQL for chats, messages, checkpoints and session metadata."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import (
    BigInteger,
    Integer,
    and_,
    bindparam,
    delete,
    exists,
    false,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    true,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, aggregate_order_by
from sqlalchemy.types import TypeEngine

from ...lifecycle import epoch
from ...models import Chat, Checkpoint, Message
from ..backend import Backend, batch_document
from ..connection import Connection
from ..prebuilt import Record, run, run_dicts
from ..schema import chats, checkpoints, messages, shared_state
from ..schema import sessions as s
from . import Repository, abort_unless, locked_in_key_order, of_session, written_or_abort
from .sessions import CAN_WORK, TOUCH_WORKING, TOUCHED

_CHAT = list(chats.c)
#: Chat fields read from a row of ``_CHAT``, each with its position.
_CHAT_FIELDS = tuple((name, _CHAT.index(chats.c[name])) for name in Chat.model_fields)
#: The columns of a Message, in the order of its fields.
_MESSAGE = [messages.c[name] for name in Message.model_fields]
_CHECKPOINT_FIELDS = tuple(name for name in Checkpoint.model_fields if name != "session_id")
_CHECKPOINT = [checkpoints.c[name] for name in _CHECKPOINT_FIELDS]
_SYSTEM = "system"

# Statements of the hot paths, built once (parameters: tenant, sid, chat, n, before,
# limit): building a statement costs more than executing it on SQLite.
_IN_CHAT = and_(
    messages.c.tenant_id == bindparam("tenant"),
    messages.c.session_id == bindparam("sid"),
    messages.c.chat_id == bindparam("chat"),
)
_CHAT_KEY = and_(
    chats.c.tenant_id == bindparam("tenant"),
    chats.c.session_id == bindparam("sid"),
    chats.c.chat_id == bindparam("chat"),
)
_TAKE_SEQS = (
    update(chats)
    .where(_CHAT_KEY)
    .values(
        next_seq=chats.c.next_seq + bindparam("n"),
        message_count=chats.c.message_count + bindparam("n"),
    )
    .returning(chats.c.next_seq, chats.c.message_count, chats.c.max_messages)
)
_UNCOUNT = (
    update(chats).where(_CHAT_KEY).values(message_count=chats.c.message_count - bindparam("n"))
)
_INSERT_MESSAGES = insert(messages)
#: Messages shown in the history: not replaced by a summary.
_VISIBLE = messages.c.compacted == false()
#: System messages, written as the partial index ``ix_ctx_messages_system`` is (a
#: literal, not a parameter, so that both databases use the index).
_IS_SYSTEM = messages.c.role == literal_column("'system'")


def _floor(chat: Any) -> Any:
    """The chat's ``compacted_through`` (``chat``: its id, an expression): every
    message not compacted but system messages is above it."""
    return (
        select(chats.c.compacted_through)
        .where(
            chats.c.tenant_id == bindparam("tenant"),
            chats.c.session_id == bindparam("sid"),
            chats.c.chat_id == chat,
        )
        .scalar_subquery()
    )


#: Above the chat's ``compacted_through`` (parameters: tenant, sid, chat).
_ABOVE_FLOOR = messages.c.seq > _floor(bindparam("chat"))


#: The role that starts a turn.
_TURN_START = "user"


def _delete_oldest(keep_system: bool) -> Any:
    """Delete the oldest whole turns below ``before`` (system messages kept or not): the
    shortest run of them holding at least ``n`` candidates, else all of them but the
    turn in progress. A turn starts at a user message, so a tool call and its result,
    written in one turn, go together. Parameters: tenant, sid, chat, before, skip
    (n - 1), and ``starts`` (``before`` when the message at ``before`` starts a turn,
    else NULL).

    The boundary is found from the n-th oldest candidate, by index ranges (the first
    user message after it, or the last one before ``before``), not by counting."""
    m = messages.c
    candidates = [_IN_CHAT, _VISIBLE, m.seq < bindparam("before")]
    if keep_system:  # (messages not compacted but system messages are above the floor)
        candidates += [m.role != _SYSTEM, _ABOVE_FLOOR]
    nth = (
        select(m.seq)
        .where(*candidates)
        .order_by(m.seq)
        .limit(1)
        .offset(bindparam("skip"))
        .scalar_subquery()
    )
    starts = [_IN_CHAT, _VISIBLE, m.role == _TURN_START, m.seq < bindparam("before")]
    boundary = func.coalesce(
        select(func.min(m.seq)).where(*starts, m.seq > nth).scalar_subquery(),
        bindparam("starts", type_=m.seq.type),
        select(func.max(m.seq)).where(*starts).scalar_subquery(),
    )
    return delete(messages).where(*candidates, m.seq < boundary)


_DELETE_OLDEST = {keep_system: _delete_oldest(keep_system) for keep_system in (False, True)}


def _delete_oldest_counted(keep_system: bool) -> Any:
    """``_delete_oldest`` and the chat's count lowered by as many, in ONE statement
    (:attr:`Backend.data_modifying_ctes`), returning that number (no row: none)."""
    gone = _delete_oldest(keep_system).returning(messages.c.seq).cte("gone")
    deleted = select(func.count()).select_from(gone).scalar_subquery()
    return (
        update(chats)
        .where(_CHAT_KEY, deleted > 0)
        .values(message_count=chats.c.message_count - deleted)
        .returning(deleted)
    )


_DELETE_OLDEST_COUNTED = {keep: _delete_oldest_counted(keep) for keep in (False, True)}
_CURRENT_CHAT = (
    select(s.c.current_chat_id)
    .where(s.c.tenant_id == bindparam("tenant"), s.c.session_id == bindparam("sid"))
    .scalar_subquery()
)


def _page(
    *, current: bool, before: bool, limited: bool, visible: bool = True, conversation: bool = False
) -> Any:
    """A chat's messages newest first, below ``before`` when given, the first ``limit``
    when given; ``visible``: those not compacted above the chat's floor (the system
    messages below it are read by ``_system``); ``conversation``: not system messages."""
    m = messages.c
    chat = _CURRENT_CHAT if current else bindparam("chat")
    stmt = select(*_MESSAGE).where(
        m.tenant_id == bindparam("tenant"), m.session_id == bindparam("sid"), m.chat_id == chat
    )
    if visible:
        stmt = stmt.where(_VISIBLE, m.seq > _floor(chat))
    if conversation:
        stmt = stmt.where(m.role != _SYSTEM)
    if before:
        stmt = stmt.where(m.seq < bindparam("before"))
    stmt = stmt.order_by(m.seq.desc())
    return stmt.limit(bindparam("limit")) if limited else stmt


def _system(*, current: bool) -> Any:
    """The chat's system messages not compacted, oldest first (``ix_ctx_messages_system``),
    each with the chat's floor (``_FLOOR_KEY``)."""
    m = messages.c
    chat = _CURRENT_CHAT if current else bindparam("chat")
    return (
        select(*_MESSAGE, _floor(chat).label(_FLOOR_KEY))
        .where(
            m.tenant_id == bindparam("tenant"),
            m.session_id == bindparam("sid"),
            m.chat_id == chat,
            _IS_SYSTEM,
            _VISIBLE,
        )
        .order_by(m.seq)
    )


#: The column telling the two parts of ``_with_system`` apart (0: system messages).
_PART = "part"
#: The column of the chat's ``compacted_through`` in the rows of ``_system``.
_FLOOR_KEY = "floor"


def _with_system(*, current: bool, before: bool, limited: bool, conversation: bool) -> Any:
    """ONE statement: the chat's system messages not compacted with its floor (part 0)
    and a page of ``_page`` (part 1), so a history page or a context window is one
    round trip."""
    page = _page(
        current=current, before=before, limited=limited, conversation=conversation
    ).subquery()
    system = _system(current=current).order_by(None).add_columns(literal(0).label(_PART))
    no_floor = literal(None, type_=chats.c.compacted_through.type).label(_FLOOR_KEY)
    return union_all(system, select(*page.c, no_floor, literal(1).label(_PART)))


_PAGES = {
    (current, before, limited, visible, conversation): _page(
        current=current,
        before=before,
        limited=limited,
        visible=visible,
        conversation=conversation,
    )
    for current in (False, True)
    for before in (False, True)
    for limited in (False, True)
    for visible in (False, True)
    for conversation in (False, True)
    if visible or not conversation
}


def _recent(*, current: bool, before: bool, limited: bool) -> Any:
    """``_page`` of the messages not compacted, each row with the chat's floor: a chat
    whose floor is 0 was never compacted, and this page is its history as shown."""
    chat = _CURRENT_CHAT if current else bindparam("chat")
    page = _page(current=current, before=before, limited=limited)
    return page.add_columns(_floor(chat).label(_FLOOR_KEY))


_RECENT = {
    (current, before, limited): _recent(current=current, before=before, limited=limited)
    for current in (False, True)
    for before in (False, True)
    for limited in (False, True)
}
_WITH_SYSTEM = {
    (current, before, limited, conversation): _with_system(
        current=current, before=before, limited=limited, conversation=conversation
    )
    for current in (False, True)
    for before in (False, True)
    for limited in (False, True)
    for conversation in (False, True)
}
_SYSTEM_ROWS = _system(current=False)
#: The seq of the chat's k-th newest user message not compacted (parameters: tenant,
#: sid, chat, skip = k - 1).
_TURN_START_FROM_END = (
    select(messages.c.seq)
    .where(_IN_CHAT, _VISIBLE, _ABOVE_FLOOR, messages.c.role == _TURN_START)
    .order_by(messages.c.seq.desc())
    .limit(1)
    .offset(bindparam("skip"))
)
#: The chat's messages that compaction replaces, oldest first: not compacted, not
#: system messages, below ``before`` (parameters: tenant, sid, chat, before).
_REPLACEABLE = (
    _IN_CHAT,
    _VISIBLE,
    _ABOVE_FLOOR,
    messages.c.role != _SYSTEM,
    messages.c.seq < bindparam("before"),
)
_COMPACTABLE = select(*_MESSAGE).where(*_REPLACEABLE).order_by(messages.c.seq)
_COMPACTABLE_IDS = (
    select(messages.c.seq, messages.c.message_id).where(*_REPLACEABLE).order_by(messages.c.seq)
)
#: Flag as compacted the messages ``_COMPACTABLE`` selects and the message at ``also``.
_FLAG_COMPACTED = (
    update(messages)
    .where(
        _IN_CHAT,
        _VISIBLE,
        or_(and_(*_REPLACEABLE[2:]), messages.c.seq == bindparam("also")),
    )
    .values(compacted=True)
)
#: The chat's floor raised to ``through`` and its count lowered by ``n``.
_COMPACTED_THROUGH = (
    update(chats)
    .where(_CHAT_KEY)
    .values(
        compacted_through=bindparam("through"),
        message_count=chats.c.message_count - bindparam("n"),
    )
)
_DELETE_ONE = delete(messages).where(_IN_CHAT, messages.c.seq == bindparam("seq"))


#: The most messages one add_messages call appends in one statement (see ``append``).
APPEND_MAX = 8
#: What an appended message carries before the statement gives it a chat and a seq.
_APPENDED = ("message_id", "role", "content", "metadata", "tokens")


def _touch_for_append(n: Any, *, room: bool) -> Any:
    """Touch a session that can work if its chat (``chat``, else its current one)
    exists and, with ``room``, has room for ``n`` more messages (parameters tenant,
    sid, now, now_epoch, chat); RETURNING its user_id and that chat_id."""
    chat_id = func.coalesce(bindparam("chat", type_=chats.c.chat_id.type), s.c.current_chat_id)
    limit = chats.c.max_messages
    has_room = or_(limit.is_(None), chats.c.message_count + n <= limit) if room else true()
    chat = exists().where(
        chats.c.tenant_id == s.c.tenant_id,
        chats.c.session_id == s.c.session_id,
        chats.c.chat_id == chat_id,
        has_room,
    )
    return TOUCH_WORKING.where(chat).returning(s.c.user_id, chat_id.label("chat_id"))


#: ``_touch_for_append`` of ``n`` given as a parameter, with and without the room checked.
_TOUCHES_FOR_APPEND = {
    room: _touch_for_append(bindparam("n", type_=Integer()), room=room) for room in (False, True)
}


def _append(n: int, *, room: bool = True) -> Any:
    """ONE statement appending ``n`` messages to a chat of a session that can work (data-
    modifying CTEs): touch the session if it is active and live and the chat has room,
    take ``n`` sequence numbers from the chat if it still has room, insert the messages.
    Without ``room`` the chat's room is not checked (for a transaction that trims the
    history next).

    The session row is locked first, then the chat row, as by every other write. The
    chat is checked in the statement's snapshot before the session is touched, and
    again on the locked row: when a concurrent writer filled or removed it in between,
    the statement aborts (``written_or_abort``). It returns (user_id, chat_id, next_seq,
    message_count, limit) after the change, or no row when nothing was written.
    Parameters: tenant, sid, now, now_epoch, chat (None for the current chat), and
    ``<field>_<k>`` for each of the ``_APPENDED`` fields of message ``k``."""
    limit = chats.c.max_messages
    has_room = or_(limit.is_(None), chats.c.message_count + n <= limit) if room else true()
    touched = _touch_for_append(n, room=room).cte("touched")
    taken = (
        update(chats)
        .where(
            chats.c.tenant_id == bindparam("tenant"),
            chats.c.session_id == bindparam("sid"),
            chats.c.chat_id == touched.c.chat_id,
            has_room,
        )
        .values(next_seq=chats.c.next_seq + n, message_count=chats.c.message_count + n)
        .returning(chats.c.chat_id, chats.c.next_seq, chats.c.message_count, limit.label("limit"))
        .cte("taken")
    )
    m = messages.c
    rows = [
        select(
            bindparam("tenant", type_=m.tenant_id.type),
            bindparam("sid", type_=m.session_id.type),
            taken.c.chat_id,
            taken.c.next_seq - (n - 1 - k),
            *(bindparam(f"{field}_{k}", type_=m[field].type) for field in _APPENDED),
            bindparam("now", type_=m.created_at.type),
        ).select_from(taken)
        for k in range(n)
    ]
    columns = ["tenant_id", "session_id", "chat_id", "seq", *_APPENDED, "created_at"]
    added = insert(messages).from_select(columns, rows[0] if n == 1 else union_all(*rows))
    returned = (
        touched.c.user_id,
        taken.c.chat_id,
        taken.c.next_seq,
        taken.c.message_count,
        taken.c["limit"],
    )
    return written_or_abort(touched, taken, taken.c.chat_id, *returned).add_cte(added.cte("added"))


_APPENDS = {n: _append(n) for n in range(1, APPEND_MAX + 1)}
_APPENDS_ANYWAY = {n: _append(n, room=False) for n in range(1, APPEND_MAX + 1)}

#: The rows of an ``append_many`` batch: one per call (its index in the batch, its
#: session, its chat as asked and how many messages it appends) ...
_CALL_COLUMNS: dict[str, TypeEngine[Any]] = {
    "idx": Integer(),
    "tenant": chats.c.tenant_id.type,
    "sid": chats.c.session_id.type,
    "chat": chats.c.chat_id.type,
    "n": Integer(),  # its running sum a bigint
}
#: ... and one per message (its call, its place in it, its ``_APPENDED`` fields).
_BATCH_MESSAGE_COLUMNS: dict[str, TypeEngine[Any]] = {
    "idx": Integer(),
    "k": Integer(),
    **{field: messages.c[field].type for field in _APPENDED},
}


def _append_batch(backend: Backend, *, room: bool) -> Any:
    """``_append`` for the calls of a batch, in ONE statement (data-modifying CTEs).

    In the statement's snapshot, each call's chat (``chat``, else its session's
    current chat) is found for the calls of sessions that can work, and the calls of
    each chat are admitted in batch order while it has room (a prefix: the running
    total of its calls' messages; with no ``room``, every call to a chat that
    exists). Then the sessions with an admitted call are locked and touched if they
    can still work and still have the current chat read, each chat takes as many
    sequence numbers as its admitted calls append if it still has room on its locked
    row, and the messages are inserted, each call's consecutive, in batch order.
    Every session is locked before any chat (as by every other write), and each
    kind in key order (:func:`locked_in_key_order`). When a session was not touched
    or a chat took no numbers (changed in between), nothing is inserted and the
    statement aborts (:func:`abort_unless`), to be retried. It returns, per call written: idx,
    user_id, chat_id, its last seq, the chat's count once it is added, the limit.

    The admitted chats are numbered 1..G in key order (``g``), and what the chats'
    locked rows give is read from arrays at those numbers: the planner takes every
    CTE for one row, and a join between two CTEs of a batch of N calls compares N * N
    pairs. Parameters: calls and messages (:func:`batch_document` of ``_CALL_COLUMNS``
    and ``_BATCH_MESSAGE_COLUMNS`` rows), now, now_epoch."""
    calls = backend.batch_rows("calls", _CALL_COLUMNS)
    chat_id = func.coalesce(calls.c.chat, s.c.current_chat_id)
    upto = func.sum(calls.c.n).over(
        partition_by=(calls.c.tenant, calls.c.sid, chat_id), order_by=calls.c.idx
    )
    placed = (
        select(
            calls.c.idx,
            calls.c.tenant,
            calls.c.sid,
            calls.c.n,
            chat_id.label("chat"),
            s.c.current_chat_id.label("current"),
            s.c.user_id,
            chats.c.message_count,
            chats.c.max_messages,
            upto.label("upto"),  # the chat's messages of the calls up to this one
        )
        .select_from(
            calls.join(
                s, and_(s.c.tenant_id == calls.c.tenant, s.c.session_id == calls.c.sid)
            ).join(
                chats,
                and_(
                    chats.c.tenant_id == calls.c.tenant,
                    chats.c.session_id == calls.c.sid,
                    chats.c.chat_id == chat_id,
                ),
            )
        )
        .where(CAN_WORK)
        .subquery("placed")
    )
    p = placed.c
    fits = or_(p.max_messages.is_(None), p.message_count + p.upto <= p.max_messages)
    g = func.dense_rank().over(order_by=(p.tenant, p.sid, p.chat))
    admitted = select(placed, g.label("g")).where(fits if room else true()).cte("admitted")
    a = admitted.c
    wanted = select(a.tenant, a.sid, a.current).distinct().subquery()
    sessions_locked = locked_in_key_order(
        s,
        wanted,
        (s.c.tenant_id == wanted.c.tenant, s.c.session_id == wanted.c.sid),
        wanted.c.current,
    )
    touched = (
        update(s)
        .where(
            s.c.tenant_id == sessions_locked.c.tenant_id,
            s.c.session_id == sessions_locked.c.session_id,
            CAN_WORK,
            s.c.current_chat_id.is_not_distinct_from(sessions_locked.c.current),
        )
        .values(**TOUCHED)
        .returning(s.c.session_id)
        .cte("touched")
    )
    touched_count = select(func.count()).select_from(touched).scalar_subquery()
    totals = (
        select(a.tenant, a.sid, a.chat, a.g, func.max(a.upto).label("total"))
        # read after every session is touched: no chat is locked before a session
        .where(touched_count > 0)
        .group_by(a.tenant, a.sid, a.chat, a.g)
        .subquery()
    )
    chats_locked = locked_in_key_order(
        chats,
        totals,
        (
            chats.c.tenant_id == totals.c.tenant,
            chats.c.session_id == totals.c.sid,
            chats.c.chat_id == totals.c.chat,
        ),
        totals.c.total,
        totals.c.g,
    )
    total = chats_locked.c.total
    limit = chats.c.max_messages
    still_fits = or_(limit.is_(None), chats.c.message_count + total <= limit)
    taken = (
        update(chats)
        .where(
            chats.c.tenant_id == chats_locked.c.tenant_id,
            chats.c.session_id == chats_locked.c.session_id,
            chats.c.chat_id == chats_locked.c.chat_id,
            still_fits if room else true(),
        )
        .values(next_seq=chats.c.next_seq + total, message_count=chats.c.message_count + total)
        .returning(
            chats_locked.c.g,
            (chats.c.next_seq - total).label("seq_before"),
            (chats.c.message_count - total).label("count_before"),
            limit.label("limit"),
        )
        .cte("taken")
    )
    k = taken.c

    def by_chat(column: Any, name: str) -> Any:
        return func.array_agg(aggregate_order_by(column, k.g), type_=ARRAY(BigInteger)).label(name)

    # every admitted session touched and every admitted chat taken, else the write aborts
    complete = and_(
        func.count() == select(func.max(a.g)).scalar_subquery(),
        touched_count == select(func.count()).select_from(wanted).scalar_subquery(),
    )
    written = (
        select(
            by_chat(k.seq_before, "seqs"),
            by_chat(k.count_before, "counts"),
            by_chat(k["limit"], "limits"),
            complete.label("complete"),
        )
        .select_from(taken)
        .cte("written")
    )
    w = written.c
    new = backend.batch_rows("messages", _BATCH_MESSAGE_COLUMNS)
    m = messages.c
    added = insert(messages).from_select(
        ["tenant_id", "session_id", "chat_id", "seq", *_APPENDED, "created_at"],
        select(
            a.tenant,
            a.sid,
            a.chat,
            w.seqs[a.g] + a.upto - a.n + new.c.k + 1,
            *(new.c[field] for field in _APPENDED),
            bindparam("now", type_=m.created_at.type),
        )
        .select_from(new.join(admitted, a.idx == new.c.idx).join(written, true()))
        .where(w.complete),
    )
    return (
        select(
            a.idx,
            a.user_id,
            a.chat,
            w.seqs[a.g] + a.upto,
            w.counts[a.g] + a.upto,
            w.limits[a.g],
            abort_unless(w.complete),
        )
        .select_from(admitted.join(written, true()))
        .add_cte(added.cte("added"))
    )


class Taken(NamedTuple):
    """A chat's counters after sequence numbers were handed out: the last seq taken, its
    message count and its cap (None: unlimited)."""

    next_seq: int
    message_count: int
    max_messages: int | None


class CurrentChat(NamedTuple):
    """The current chat of a session that exists (None: it has none)."""

    chat_id: str | None


class StoredChat(NamedTuple):
    """A chat as stored, with the last sequence number it handed out (for snapshots)."""

    chat_id: str
    name: str | None
    metadata: dict[str, Any]
    max_messages: int | None
    created_at: datetime
    next_seq: int


class Recent(NamedTuple):
    """A page of a chat's history (newest first) and its floor (None: no row)."""

    page: list[Message]
    floor: int | None


class Paged(NamedTuple):
    """A chat's system messages not compacted (oldest first), a page of its history
    above its floor (newest first), read at once, and the floor (its
    ``compacted_through``; 0 when it has no system message)."""

    system: list[Message]
    page: list[Message]
    floor: int


class Appended(NamedTuple):
    """What ``append`` wrote: whose session, which chat, its last seq taken, its message
    count now and its limit (None: unlimited)."""

    user_id: str
    chat_id: str
    last_seq: int
    message_count: int
    limit: int | None


def _chat(row: Record) -> Chat:
    """A Chat from a row of the ``_CHAT`` columns."""
    return Chat._trusted({name: row[position] for name, position in _CHAT_FIELDS})


_MESSAGE_FIELDS = tuple(Message.model_fields)


def _by_seq(message: Message) -> int:
    return message.seq


def _message(row: Record) -> Message:
    """A Message from a row of the ``_MESSAGE`` columns."""
    return Message._trusted(dict(zip(_MESSAGE_FIELDS, row, strict=True)))


def _checkpoint(row: Record, session_id: str) -> Checkpoint:
    """A Checkpoint from a row of the ``_CHECKPOINT`` columns."""
    values = dict(zip(_CHECKPOINT_FIELDS, row, strict=True))
    values["session_id"] = session_id
    return Checkpoint._trusted(values)


def _page_params(
    tenant: str, session_id: str, chat_id: str | None, before_seq: int | None, limit: int | None
) -> dict[str, Any]:
    """The parameters of the history page statements (``_PAGES``, ``_RECENT``, ...)."""
    return {
        "tenant": tenant,
        "sid": session_id,
        "chat": chat_id,
        "before": before_seq,
        "limit": limit,
    }


class ConversationRepository(Repository):
    """Every statement on ``ctx_chats``, ``ctx_messages`` and ``ctx_checkpoints``, and the
    conversation columns of ``ctx_sessions`` (metadata, current chat, chat count)."""

    def __init__(self, backend: Backend) -> None:
        super().__init__(backend)
        #: The columns inserted are those of the parameters (compiled once per set).
        self._insert_chat = backend.insert_or_ignore(
            chats, ("tenant_id", "session_id", "chat_id")
        ).returning(*_CHAT)
        #: ``append_many``'s statements, with and without the room checked.
        self._append_batches = (
            {room: _append_batch(backend, room=room) for room in (False, True)}
            if backend.data_modifying_ctes
            else {}
        )

    # -- chats --------------------------------------------------------------------------
    async def lock_session(self, conn: Connection, tenant: str, session_id: str) -> bool:
        """Lock the session row (taken first by every write that also locks chats, so
        writers never wait on each other in a cycle); False when it does not exist."""
        stmt = (
            update(s)
            .where(of_session(s, tenant, session_id))
            .values(chat_count=s.c.chat_count)
            .returning(s.c.session_id)
        )
        return (await conn.execute(stmt)).first() is not None

    async def current_chat(
        self, conn: Connection, tenant: str, session_id: str
    ) -> CurrentChat | None:
        """The session's current chat, or None when the session does not exist."""
        stmt = select(s.c.current_chat_id).where(of_session(s, tenant, session_id))
        row = (await conn.execute(stmt)).first()
        return None if row is None else CurrentChat._make(row)

    async def reserve_chat(
        self, conn: Connection, tenant: str, session_id: str, limit: int | None
    ) -> bool:
        """Count one more chat on the session row if it stays within ``limit``."""
        stmt = update(s).where(of_session(s, tenant, session_id))
        if limit is not None:
            stmt = stmt.where(s.c.chat_count < limit)
        result = await conn.execute(stmt.values(chat_count=s.c.chat_count + 1))
        return bool(result.rowcount)

    async def insert_chat(self, conn: Connection, values: dict[str, Any]) -> Chat | None:
        """Insert unless the chat id exists in the session; the new chat or None."""
        row = (await run(conn, self._insert_chat, values)).first()
        return None if row is None else _chat(row)

    async def get_chat(
        self, conn: Connection, tenant: str, session_id: str, chat_id: str
    ) -> Chat | None:
        stmt = select(*_CHAT).where(of_session(chats, tenant, session_id, chat_id=chat_id))
        row = (await conn.execute(stmt)).first()
        return None if row is None else _chat(row)

    async def chats(self, conn: Connection, tenant: str, session_id: str) -> list[Chat]:
        """The session's chats, oldest first."""
        return [_chat(row) for row in await conn.execute(self._chats(_CHAT, tenant, session_id))]

    async def stored_chats(
        self, conn: Connection, tenant: str, session_id: str
    ) -> list[StoredChat]:
        """The session's chats as stored (with their next sequence number), oldest first."""
        columns = [chats.c[name] for name in StoredChat._fields]
        rows = await conn.execute(self._chats(columns, tenant, session_id))
        return [StoredChat._make(row) for row in rows]

    @staticmethod
    def _chats(columns: Sequence[Any], tenant: str, session_id: str) -> Any:
        c = chats.c
        return (
            select(*columns)
            .where(of_session(chats, tenant, session_id))
            .order_by(c.created_at, c.chat_id)
        )

    async def set_current_chat(
        self, conn: Connection, tenant: str, session_id: str, chat_id: str | None
    ) -> None:
        await conn.execute(
            update(s).where(of_session(s, tenant, session_id)).values(current_chat_id=chat_id)
        )

    async def delete_chat(
        self, conn: Connection, tenant: str, session_id: str, chat_id: str
    ) -> bool:
        """Delete the chat and its messages; the session's current chat becomes its newest
        remaining chat when it was this one."""
        result = await conn.execute(
            delete(chats).where(of_session(chats, tenant, session_id, chat_id=chat_id))
        )
        if not result.rowcount:
            return False
        c = chats.c
        newest = (
            select(c.chat_id)
            .where(of_session(chats, tenant, session_id))
            .order_by(c.created_at.desc(), c.chat_id.desc())
            .limit(1)
            .scalar_subquery()
        )
        await conn.execute(
            update(s)
            .where(of_session(s, tenant, session_id))
            .values(
                chat_count=s.c.chat_count - 1,
                current_chat_id=func.coalesce(func.nullif(s.c.current_chat_id, chat_id), newest),
            )
        )
        return True

    # -- messages -----------------------------------------------------------------------
    async def take_seqs(
        self, conn: Connection, tenant: str, session_id: str, chat_id: str, n: int
    ) -> Taken | None:
        """Hand out the next ``n`` sequence numbers of the chat, locking its row until
        commit; its counters after the change, or None when the chat does not exist."""
        params = {"tenant": tenant, "sid": session_id, "chat": chat_id, "n": n}
        row = (await run(conn, _TAKE_SEQS, params)).first()
        return None if row is None else Taken._make(row)

    async def insert_messages(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
        if rows:
            await run(conn, _INSERT_MESSAGES, rows)

    def appends_at_once(self, n: int) -> bool:
        """Whether :meth:`append` can write ``n`` messages here (in one statement: a
        data-modifying CTE, up to ``APPEND_MAX``); else only the general transaction
        (``take_seqs``, ``insert_messages``) appends."""
        return self.writes_at_once and 0 < n <= APPEND_MAX

    @staticmethod
    def appends_together(n: int) -> bool:
        """Whether calls appending ``n`` messages each may be written together
        (:meth:`append_many`)."""
        return 0 < n <= APPEND_MAX

    async def append(
        self,
        conn: Connection,
        rows: Sequence[dict[str, Any]],
        chat_id: str | None,
        *,
        room: bool = True,
    ) -> Appended | None:
        """Append ``rows`` (message values of one session, up to ``APPEND_MAX``; their
        chat and seq are not read) in ONE statement (:attr:`Backend.data_modifying_ctes`),
        if the session can work and the chat (``chat_id``, else the current one) has room
        (whatever its room without ``room``: in a transaction that trims the history
        next, the chat row locked until it ends). None when nothing was written."""
        first = rows[0]
        params = {
            "tenant": first["tenant_id"],
            "sid": first["session_id"],
            "now": first["created_at"],
            "now_epoch": epoch(first["created_at"]),
            "chat": chat_id,
        }
        for k, values in enumerate(rows):
            params.update({f"{field}_{k}": values[field] for field in _APPENDED})
        statement = (_APPENDS if room else _APPENDS_ANYWAY)[len(rows)]
        row = (await run(conn, statement, params)).first()
        if row is None:
            return None
        limit = None if row[4] is None else int(row[4])
        return Appended(row[0], row[1], int(row[2]), int(row[3]), limit)

    async def append_many(
        self,
        conn: Connection,
        calls: Sequence[tuple[str | None, Sequence[dict[str, Any]]]],
        now: datetime,
        *,
        room: bool = True,
    ) -> list[Appended | None]:
        """:meth:`append` of several calls (each its ``chat_id`` and its rows, all of
        ``now``), as if they ran one after another in order: what each would have
        returned, or None for a call nothing was written for (its session cannot work,
        its chat is missing or, with ``room``, it does not fit after the calls before it
        to the chat). In ONE statement (a batch of one: :meth:`append`'s), where none
        after a call that does not fit its chat is written to that chat either; where
        one statement cannot write a batch (SQLite), each call's own statements, one
        after another (:meth:`_append_each`)."""
        if not self.writes_at_once:
            return await self._append_each(conn, calls, now, room=room)
        if len(calls) == 1:
            chat_id, rows = calls[0]
            return [await self.append(conn, rows, chat_id, room=room)]
        heads: list[dict[str, Any]] = []
        bodies: list[dict[str, Any]] = []
        for idx, (chat_id, rows) in enumerate(calls):
            first = rows[0]
            heads.append(
                {
                    "idx": idx,
                    "tenant": first["tenant_id"],
                    "sid": first["session_id"],
                    "chat": chat_id,
                    "n": len(rows),
                }
            )
            for k, values in enumerate(rows):
                body = {field: values[field] for field in _APPENDED}
                body["idx"], body["k"] = idx, k
                bodies.append(body)
        params = {
            "calls": batch_document(heads),
            "messages": batch_document(bodies),
            "now": now,
            "now_epoch": epoch(now),
        }
        written: list[Appended | None] = [None] * len(calls)
        for row in await run(conn, self._append_batches[room], params):
            limit = None if row[5] is None else int(row[5])
            written[row[0]] = Appended(row[1], row[2], int(row[3]), int(row[4]), limit)
        return written

    async def _append_each(
        self,
        conn: Connection,
        calls: Sequence[tuple[str | None, Sequence[dict[str, Any]]]],
        now: datetime,
        *,
        room: bool,
    ) -> list[Appended | None]:
        """:meth:`append_many` call after call in the caller's write transaction, which
        holds the database's write lock (SQLite): each call is written if its session
        can work and its chat exists and, with ``room``, has room for it as the calls
        before it left the chat (the calls of a batch are concurrent: one not written
        goes after those that are, as it would run after them)."""
        stamp = {"now": now, "now_epoch": epoch(now)}
        touch = _TOUCHES_FOR_APPEND[room]
        written: list[Appended | None] = []
        added: list[dict[str, Any]] = []
        for chat_id, rows in calls:
            key = {"tenant": rows[0]["tenant_id"], "sid": rows[0]["session_id"]}
            n = len(rows)
            touched = (await run(conn, touch, key | stamp | {"chat": chat_id, "n": n})).first()
            if touched is None:
                written.append(None)
                continue
            user_id, chat = touched
            taken = (await run(conn, _TAKE_SEQS, key | {"chat": chat, "n": n})).first()
            assert taken is not None  # the chat was just found, under the write lock
            last, count, limit = taken
            first = last - n + 1
            added += [values | {"chat_id": chat, "seq": first + k} for k, values in enumerate(rows)]
            written.append(Appended(user_id, chat, last, count, limit))
        await self.insert_messages(conn, added)
        return written

    async def delete_oldest_turns(
        self,
        conn: Connection,
        tenant: str,
        session_id: str,
        chat_id: str,
        count: int,
        *,
        keep_system: bool,
        below_seq: int | None = None,
        turn_starts_below: bool = False,
    ) -> int:
        """Delete the oldest whole turns of the chat holding at least ``count`` messages
        (never system messages when ``keep_system``; only below ``below_seq`` when given,
        the message at ``below_seq`` starting a turn when ``turn_starts_below``), else
        every whole turn but the newest; keep the chat's count right. The number
        deleted (fewer than ``count`` when the newest turn alone is too long)."""
        if count <= 0:
            return 0
        before = 2**63 - 1 if below_seq is None else below_seq
        params = {
            "tenant": tenant,
            "sid": session_id,
            "chat": chat_id,
            "skip": count - 1,
            "before": before,
            "starts": before if turn_starts_below else None,
        }
        if self.backend.data_modifying_ctes:  # the delete and the count in one statement
            row = (await run(conn, _DELETE_OLDEST_COUNTED[keep_system], params)).first()
            return 0 if row is None else int(row[0])
        deleted = (await run(conn, _DELETE_OLDEST[keep_system], params)).rowcount
        await self._uncount(conn, tenant, session_id, chat_id, deleted)
        return deleted

    async def delete_message(
        self, conn: Connection, tenant: str, session_id: str, chat_id: str, message: Message
    ) -> None:
        """Delete one message (the chat row must be locked), keeping the chat's count
        right."""
        params = {"tenant": tenant, "sid": session_id, "chat": chat_id, "seq": message.seq}
        await run(conn, _DELETE_ONE, params)
        if not message.compacted:
            await self._uncount(conn, tenant, session_id, chat_id, 1)

    async def delete_messages(
        self,
        conn: Connection,
        tenant: str,
        session_id: str,
        chat_id: str,
        *,
        keep_system: bool,
    ) -> int:
        """Delete the chat's messages, compacted ones too (all but system messages with
        ``keep_system``); the number deleted. The chat's count drops by those that were
        not compacted."""
        where = [of_session(messages, tenant, session_id, chat_id=chat_id)]
        if keep_system:
            where.append(messages.c.role != _SYSTEM)
        visible = select(func.count()).where(*where, _VISIBLE)
        counted = int((await conn.execute(visible)).scalar_one())
        deleted = int((await conn.execute(delete(messages).where(*where))).rowcount)
        await self._uncount(conn, tenant, session_id, chat_id, counted)
        return deleted

    async def _uncount(
        self, conn: Connection, tenant: str, session_id: str, chat_id: str, n: int
    ) -> None:
        if n:
            params = {"tenant": tenant, "sid": session_id, "chat": chat_id, "n": n}
            await run(conn, _UNCOUNT, params)

    async def count_where(
        self, conn: Connection, tenant: str, session_id: str, chat_id: str, *, system: bool
    ) -> int:
        """Messages of the chat not compacted that are (``system``) or are not system
        messages."""
        m = messages.c
        role = m.role == _SYSTEM if system else m.role != _SYSTEM
        stmt = select(func.count()).where(
            of_session(messages, tenant, session_id, chat_id=chat_id), role, _VISIBLE
        )
        return int((await conn.execute(stmt)).scalar_one())

    async def page(
        self,
        conn: Connection,
        tenant: str,
        session_id: str,
        chat_id: str | None,
        limit: int | None,
        before_seq: int | None,
        *,
        include_compacted: bool = False,
        conversation: bool = False,
    ) -> list[Message]:
        """The last ``limit`` messages before ``before_seq`` (not compacted unless
        ``include_compacted``; not system messages with ``conversation``), newest first
        (an index range scan on (chat, seq)); ``chat_id`` None reads the session's
        current chat."""
        shape = (
            chat_id is None,
            before_seq is not None,
            limit is not None,
            not include_compacted,
            conversation and not include_compacted,
        )
        params = _page_params(tenant, session_id, chat_id, before_seq, limit)
        # the rows' columns are the Message fields: each row is a message's __dict__
        return [Message._trusted(row) for row in await run_dicts(conn, _PAGES[shape], params)]

    async def recent(
        self,
        conn: Connection,
        tenant: str,
        session_id: str,
        chat_id: str | None,
        limit: int | None,
        before_seq: int | None,
    ) -> Recent:
        """:meth:`page`'s messages not compacted, newest first, and the chat's floor
        (None when no row came back): with a floor of 0 the chat was never compacted."""
        shape = (chat_id is None, before_seq is not None, limit is not None)
        params = _page_params(tenant, session_id, chat_id, before_seq, limit)
        rows = await run_dicts(conn, _RECENT[shape], params)
        floor = None
        for row in rows:
            floor = row.pop(_FLOOR_KEY)
        return Recent(
            [Message._trusted(row) for row in rows], None if floor is None else int(floor)
        )

    async def page_with_system(
        self,
        conn: Connection,
        tenant: str,
        session_id: str,
        chat_id: str | None,
        limit: int | None,
        before_seq: int | None,
        *,
        conversation: bool = False,
    ) -> Paged:
        """In ONE statement: the chat's system messages not compacted, oldest first, and
        :meth:`page`'s messages not compacted (``conversation``: system messages left
        out of the page), newest first."""
        shape = (chat_id is None, before_seq is not None, limit is not None, conversation)
        params = _page_params(tenant, session_id, chat_id, before_seq, limit)
        system: list[Message] = []
        page: list[Message] = []
        floor = 0
        for row in await run_dicts(conn, _WITH_SYSTEM[shape], params):
            if row.pop(_PART):
                del row[_FLOOR_KEY]
                page.append(Message._trusted(row))
            else:
                floor = int(row.pop(_FLOOR_KEY))
                system.append(Message._trusted(row))
        # a union's rows come in no promised order
        system.sort(key=_by_seq)
        page.sort(key=_by_seq, reverse=True)
        return Paged(system, page, floor)

    async def system_messages(
        self, conn: Connection, tenant: str, session_id: str, chat_id: str
    ) -> list[Message]:
        """The chat's system messages not compacted, oldest first."""
        params = {"tenant": tenant, "sid": session_id, "chat": chat_id}
        rows = await run_dicts(conn, _SYSTEM_ROWS, params)
        for row in rows:
            del row[_FLOOR_KEY]
        return [Message._trusted(row) for row in rows]

    # -- compaction -----------------------------------------------------------------------
    async def turn_start_from_end(
        self, conn: Connection, tenant: str, session_id: str, chat_id: str, turns: int
    ) -> int | None:
        """The seq of the user message starting the chat's ``turns``-th newest turn
        (messages not compacted); None when it has fewer turns."""
        params = {"tenant": tenant, "sid": session_id, "chat": chat_id, "skip": turns - 1}
        seq = (await run(conn, _TURN_START_FROM_END, params)).scalar_one_or_none()
        return None if seq is None else int(seq)

    async def compactable(
        self, conn: Connection, tenant: str, session_id: str, chat_id: str, below: int
    ) -> list[Message]:
        """The chat's messages not compacted and not system messages below seq
        ``below``, oldest first: what a compaction replaces."""
        params = {"tenant": tenant, "sid": session_id, "chat": chat_id, "before": below}
        return [Message._trusted(row) for row in await run_dicts(conn, _COMPACTABLE, params)]

    async def compactable_ids(
        self, conn: Connection, tenant: str, session_id: str, chat_id: str, below: int
    ) -> list[tuple[int, str]]:
        """(seq, message_id) of what :meth:`compactable` reads."""
        params = {"tenant": tenant, "sid": session_id, "chat": chat_id, "before": below}
        return [(int(seq), str(mid)) for seq, mid in await run(conn, _COMPACTABLE_IDS, params)]

    async def flag_compacted(
        self,
        conn: Connection,
        tenant: str,
        session_id: str,
        chat_id: str,
        below: int,
        also: int | None,
    ) -> int:
        """Flag as compacted what :meth:`compactable` reads and the message at seq
        ``also`` (a previous summary); raise the chat's floor to ``below - 1`` and lower
        its count by as many as were flagged; that number."""
        params = {
            "tenant": tenant,
            "sid": session_id,
            "chat": chat_id,
            "before": below,
            "also": -1 if also is None else also,
        }
        flagged = int((await run(conn, _FLAG_COMPACTED, params)).rowcount)
        params = {"tenant": tenant, "sid": session_id, "chat": chat_id}
        await run(conn, _COMPACTED_THROUGH, {**params, "through": below - 1, "n": flagged})
        return flagged

    async def purge_compacted(self, conn: Connection, tenant: str, session_id: str) -> int:
        """Delete the session's compacted messages (every chat); the number deleted."""
        stmt = delete(messages).where(of_session(messages, tenant, session_id), ~_VISIBLE)
        return int((await conn.execute(stmt)).rowcount)

    async def all_messages(self, conn: Connection, tenant: str, session_id: str) -> list[Message]:
        """Every message of the session, by chat then sequence."""
        m = messages.c
        stmt = (
            select(*_MESSAGE)
            .where(of_session(messages, tenant, session_id))
            .order_by(m.chat_id, m.seq)
        )
        return [_message(row) for row in await conn.execute(stmt)]

    async def delete_chats(self, conn: Connection, tenant: str, session_id: str) -> None:
        """Every chat and message of the session (before a restore)."""
        await conn.execute(delete(chats).where(of_session(chats, tenant, session_id)))

    async def insert_chats(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
        if rows:
            await conn.execute(insert(chats), list(rows))

    async def message_totals(
        self, conn: Connection, tenant: str, session_id: str | None = None
    ) -> tuple[int, int]:
        """(chats, messages) of one session, or of the whole tenant."""
        c = chats.c
        stmt = select(func.count(), func.coalesce(func.sum(c.message_count), 0)).where(
            c.tenant_id == tenant
        )
        if session_id is not None:
            stmt = stmt.where(c.session_id == session_id)
        row = (await conn.execute(stmt)).one()
        return int(row[0]), int(row[1])

    # -- session metadata and conversation columns ---------------------------------------
    async def merge_metadata(
        self, conn: Connection, tenant: str, session_id: str, patch: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Set the keys of ``patch`` in the session's metadata, in SQL; the result."""
        return await self._set_metadata(
            conn, tenant, session_id, self.backend.json_merge(s.c.metadata, patch)
        )

    async def remove_metadata(
        self, conn: Connection, tenant: str, session_id: str, key: str
    ) -> dict[str, Any] | None:
        return await self._set_metadata(
            conn, tenant, session_id, self.backend.json_remove(s.c.metadata, key)
        )

    async def _set_metadata(
        self, conn: Connection, tenant: str, session_id: str, value: Any
    ) -> dict[str, Any] | None:
        stmt = (
            update(s)
            .where(of_session(s, tenant, session_id))
            .values(metadata=value)
            .returning(s.c.metadata)
        )
        row = (await conn.execute(stmt)).first()
        return None if row is None else dict(row[0])

    async def restore_session_columns(
        self,
        conn: Connection,
        tenant: str,
        session_id: str,
        *,
        metadata: dict[str, Any],
        current_chat_id: str | None,
        chat_count: int,
    ) -> None:
        await conn.execute(
            update(s)
            .where(of_session(s, tenant, session_id))
            .values(metadata=metadata, current_chat_id=current_chat_id, chat_count=chat_count)
        )

    # -- checkpoints --------------------------------------------------------------------
    async def insert_checkpoint(self, conn: Connection, values: dict[str, Any]) -> Checkpoint:
        stmt = insert(checkpoints).values(**values).returning(*_CHECKPOINT)
        return _checkpoint((await conn.execute(stmt)).one(), values["session_id"])

    async def checkpoints(self, conn: Connection, tenant: str, session_id: str) -> list[Checkpoint]:
        """The session's checkpoints, oldest first."""
        k = checkpoints.c
        stmt = (
            select(*_CHECKPOINT)
            .where(of_session(checkpoints, tenant, session_id))
            .order_by(k.created_at, k.checkpoint_id)
        )
        return [_checkpoint(row, session_id) for row in await conn.execute(stmt)]

    async def checkpoint_content(
        self, conn: Connection, tenant: str, session_id: str, checkpoint_id: str
    ) -> dict[str, Any] | None:
        k = checkpoints.c
        stmt = select(k.content).where(
            k.tenant_id == tenant, k.session_id == session_id, k.checkpoint_id == checkpoint_id
        )
        row = (await conn.execute(stmt)).first()
        return None if row is None else dict(row[0])

    # -- shared state -------------------------------------------------------------------
    async def shared_state(self, conn: Connection, tenant: str, key: str) -> dict[str, Any]:
        stmt = select(shared_state.c.document).where(
            shared_state.c.tenant_id == tenant, shared_state.c.key == key
        )
        row = (await conn.execute(stmt)).first()
        return {} if row is None else dict(row[0])

    async def merge_shared_state(
        self,
        conn: Connection,
        tenant: str,
        key: str,
        patch: dict[str, Any],
        now: datetime,
    ) -> dict[str, Any]:
        """Set the keys of ``patch`` in the document (created if missing), in SQL."""
        merged = self.backend.json_merge(shared_state.c.document, patch)
        stmt = self.backend.upsert(
            shared_state,
            ("tenant_id", "key"),
            {"tenant_id": tenant, "key": key, "document": patch, "updated_at": now},
            lambda excluded: {"document": merged, "updated_at": excluded.updated_at},
        ).returning(shared_state.c.document)
        return dict((await conn.execute(stmt)).one()[0])
