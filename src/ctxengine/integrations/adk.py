"""A Google ADK session service stored by ctxengine.

    from google.adk.runners import Runner
    from ctxengine.integrations.adk import ContextEngineSessionService

    async with ContextEngineSessionService(engine) as service:
        runner = Runner(agent=agent, app_name="travel", session_service=service)

Each ADK session is one ctxengine session, so its lifecycle, limits and metrics apply
(but no idle expiry and no event cap unless asked, as in ADK's own services); events
are messages of that session's chat and state lives in its metadata and in shared
state documents. See :class:`ContextEngineSessionService` for the mapping.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

from google.adk.errors import StaleSessionError
from google.adk.errors.already_exists_error import AlreadyExistsError
from google.adk.errors.session_not_found_error import SessionNotFoundError
from google.adk.events.event import Event
from google.adk.platform import uuid as adk_uuid
from google.adk.sessions.base_session_service import (
    BaseSessionService,
    GetSessionConfig,
    ListSessionsResponse,
)
from google.adk.sessions.session import Session
from google.adk.sessions.state import State
from pydantic import PrivateAttr
from pydantic_core import to_jsonable_python

from .. import errors
from ._adapter import Closable
from ._adk_memory import ContextEngineMemoryService, memory_source

if TYPE_CHECKING:
    from .. import Message
    from .. import Session as EngineSession
    from ..tenant import TenantView

__all__ = [
    "ContextEngineMemoryService",
    "ContextEngineSessionService",
    "engine_session_id",
    "memory_source",
]

#: The longest id ctxengine stores (sessions, users, shared state keys).
_MAX_KEY = 255
#: Messages read per query while looking back for events after a timestamp.
_PAGE = 100


def _checked(key: str, what: str) -> str:
    if len(key) > _MAX_KEY:
        raise ValueError(
            f"the ctxengine key of {what} is {len(key)} characters long; at most {_MAX_KEY} "
            "are allowed: use shorter app, user or session ids"
        )
    return key


def engine_session_id(app_name: str, user_id: str, session_id: str) -> str:
    """The ctxengine session id of an ADK session (ValueError past 255 characters)."""
    key = json.dumps([app_name, user_id, session_id], separators=(",", ":"))
    return _checked(key, f"ADK session {session_id!r} of user {user_id!r} in app {app_name!r}")


def _user_key(app_name: str, user_id: str) -> str:
    key = json.dumps(["adk-user", app_name, user_id])
    return _checked(key, f"the state of user {user_id!r} in app {app_name!r}")


def _app_key(app_name: str) -> str:
    return _checked(json.dumps(["adk-app", app_name]), f"the state of app {app_name!r}")


@dataclass(frozen=True, slots=True)
class _Keys:
    """Where one ADK session, its user's state and its app's state are stored."""

    session: str
    user: str
    app: str

    @classmethod
    def of(cls, app_name: str, user_id: str, session_id: str) -> _Keys:
        return cls(
            engine_session_id(app_name, user_id, session_id),
            _user_key(app_name, user_id),
            _app_key(app_name),
        )


@dataclass(frozen=True, slots=True)
class _Deltas:
    """A state mapping split by scope, prefixes removed, as JSON data; temp: keys dropped."""

    app: dict[str, Any]
    user: dict[str, Any]
    session: dict[str, Any]

    @classmethod
    def of(cls, state: dict[str, Any] | None) -> _Deltas:
        app: dict[str, Any] = {}
        user: dict[str, Any] = {}
        session: dict[str, Any] = {}
        for key, value in (state or {}).items():
            if key.startswith(State.APP_PREFIX):
                app[key.removeprefix(State.APP_PREFIX)] = value
            elif key.startswith(State.USER_PREFIX):
                user[key.removeprefix(State.USER_PREFIX)] = value
            elif not key.startswith(State.TEMP_PREFIX):
                session[key] = value
        # Rich values (datetimes, models, sets) become JSON data, as ADK's database
        # service stores them; values with no JSON form raise before anything is written.
        return cls(*(cast(dict[str, Any], to_jsonable_python(d)) for d in (app, user, session)))


def _merged(app: dict[str, Any], user: dict[str, Any], session: dict[str, Any]) -> dict[str, Any]:
    state = dict(session)
    state.update({State.APP_PREFIX + key: value for key, value in app.items()})
    state.update({State.USER_PREFIX + key: value for key, value in user.items()})
    return state


def _event(message: Message) -> Event:
    return Event.model_validate_json(message.content)


def _role(event: Event) -> str:
    """The message role an event is stored under: ``tool`` for function responses
    (ADK gives them the role user, even the ones a user sends back), ``user`` for the
    rest of what the user authored (a turn, which trimming keeps or drops whole,
    starts there), ``assistant`` for what agents produce (function calls included) and
    for ADK's compaction events (a summary ADK appends after a turn, whatever its
    author: not user input, so no turn of its own)."""
    if event.get_function_responses():
        return "tool"
    if event.actions.compaction is not None:
        return "assistant"
    return "user" if event.author == "user" else "assistant"


class _LoadedSession(Session):
    """An ADK session as this service returns it, which also knows the sequence number
    of the newest stored event it has seen (0: none; None: unknown)."""

    _ctxengine_seq: int | None = PrivateAttr(default=None)


def _seen_seq(session: Session) -> int | None:
    return session._ctxengine_seq if isinstance(session, _LoadedSession) else None


def _ends_with(session: Session, head: Message | None) -> bool:
    """Whether the newest event of ``session`` is ``head``, the newest stored event
    (None: none); for session objects whose seen sequence number is unknown."""
    if head is None:
        return not session.events
    return bool(session.events) and session.events[-1].id == _event(head).id


_STALE = (
    "ADK session {id!r} was modified in storage since this copy of it was loaded "
    '(on_stale="raise"); reload it with get_session() before appending more events.'
)


class ContextEngineSessionService(Closable, BaseSessionService):
    """ADK's ``BaseSessionService`` on ctxengine: a drop-in ``session_service`` for a
    ``Runner``, with the semantics of ADK's own services and, by default, no
    stale-session errors.

    ``engine`` is a :class:`~ctxengine.ContextEngine` or a tenant view of one. The
    sessions it creates get ``tier``, ``idle_timeout`` (seconds of idleness before
    they expire; None, the default: never) and ``max_events`` (their chat's cap, past
    which the oldest whole turns are trimmed; None, the default: no cap); sessions
    created elsewhere keep their own settings. ``on_stale`` is what an append from a
    stale copy of a session does: "merge" (default) or "raise" (see below).

    Mapping (public ctxengine API only):

    - an ADK session ``(app_name, user_id, session_id)`` is the ctxengine session
      :func:`engine_session_id` (``json.dumps([app_name, user_id, session_id])``,
      compact), of user ``user_id``, tagged ``adk`` and ``adk-app:<app_name>``;
      ids whose keys pass 255 characters raise ``ValueError``;
    - each event is a message of the session's current chat whose content is the
      event as JSON data (``model_dump(mode="json", exclude_none=True)``); its role is
      ``tool`` for function responses, ``user`` for other events authored by the
      user, ``assistant`` otherwise (ADK's compaction events too: they are stored and
      returned as ADK wrote them, so an ``App``'s ``events_compaction_config`` works
      unchanged); the chat's sequence numbers order events;
    - session state is the session's metadata; ``app:`` and ``user:`` state are the
      shared state documents ``["adk-app", app]`` and ``["adk-user", app, user]``
      (keys without their prefix); ``temp:`` state reaches the in-memory session
      only; partial events are not stored;
    - ``last_update_time`` is the ctxengine session's ``last_activity``.

    With ``on_stale="merge"``, appends are not checked for staleness: any number of
    writers holding old copies of a session may append, every event is kept in commit
    order, and state deltas are merged key by key in SQL, so no writer's delta is
    lost. With ``on_stale="raise"``, an append from a copy that has not seen the
    newest stored event raises ADK's ``StaleSessionError`` (as ADK's
    ``DatabaseSessionService`` does) and writes nothing; the copy passed in stays
    current across its own appends. The event is written before its state delta,
    not in one transaction with it.

    The ctxengine session rules apply: appending to an expired session raises
    :class:`~ctxengine.errors.SessionExpiredError` (to a paused or ended one,
    :class:`~ctxengine.errors.SessionNotActiveError`); past ``max_events`` the oldest
    whole turns are trimmed (or :class:`~ctxengine.errors.HistoryLimitError` is raised
    with ``history_overflow="reject"``); events over ``max_message_bytes`` and state
    over ``max_metadata_bytes`` raise :class:`~ctxengine.errors.ValidationError`;
    ``redact_patterns`` apply to the strings inside stored events; session limits
    apply to ``create_session``. Reading and deleting work in any session status.

    ``close()`` (or leaving ``async with``) ends the use of the service, not of the
    engine: later calls raise ``RuntimeError``.
    """

    def __init__(
        self,
        engine: TenantView,
        *,
        tier: str = "free",
        idle_timeout: float | None = None,
        max_events: int | None = None,
        on_stale: Literal["merge", "raise"] = "merge",
    ) -> None:
        if on_stale not in ("merge", "raise"):
            raise ValueError(f'on_stale must be "merge" or "raise", not {on_stale!r}')
        self.engine = engine
        self.tier = tier
        self.idle_timeout = idle_timeout
        self.max_events = max_events
        self.on_stale = on_stale

    async def create_session(
        self,
        *,
        app_name: str,
        user_id: str,
        state: dict[str, Any] | None = None,
        session_id: str | None = None,
    ) -> Session:
        """Create a session (an id is generated when none, or a blank one, is given) with
        ``state`` split by scope; AlreadyExistsError when the id is taken."""
        self._check_open()
        session_id = (session_id.strip() if session_id else None) or adk_uuid.new_uuid()
        keys = _Keys.of(app_name, user_id, session_id)
        deltas = _Deltas.of(state)
        try:
            stored = await self.engine.create_session(
                keys.session,
                user_id,
                tier=self.tier,
                metadata=deltas.session,
                tags=["adk", f"adk-app:{app_name}"],
                idle_timeout=self.idle_timeout,
                max_messages=self.max_events,
            )
        except errors.SessionExistsError as exc:
            raise AlreadyExistsError(f"Session with id {session_id} already exists.") from exc
        app_state, user_state = await asyncio.gather(
            self._shared(keys.app, deltas.app), self._shared(keys.user, deltas.user)
        )
        return self._session(
            app_name, user_id, session_id, stored, app_state, user_state, [], seq=0
        )

    async def get_session(
        self,
        *,
        app_name: str,
        user_id: str,
        session_id: str,
        config: GetSessionConfig | None = None,
    ) -> Session | None:
        """The session with its events (filtered by ``config``) and merged state, or None."""
        self._check_open()
        session_id = session_id.strip() if session_id else session_id
        keys = _Keys.of(app_name, user_id, session_id)
        stored = await self.engine.get_session(keys.session)
        if stored is None:
            return None
        (events, seq), app_state, user_state = await asyncio.gather(
            self._events(keys.session, config),
            self.engine.get_shared_state(keys.app),
            self.engine.get_shared_state(keys.user),
        )
        return self._session(
            app_name, user_id, session_id, stored, app_state, user_state, events, seq=seq
        )

    async def list_sessions(
        self, *, app_name: str, user_id: str | None = None
    ) -> ListSessionsResponse:
        """The app's sessions (of ``user_id``, or of every user), without events, with
        merged state, oldest update first."""
        self._check_open()
        found: list[tuple[str, str, EngineSession]] = []
        async for stored in self.engine.iter_sessions(
            tags=["adk", f"adk-app:{app_name}"], user_id=user_id
        ):
            try:
                app, user, session_id = json.loads(stored.session_id)
            except (ValueError, TypeError):
                continue
            if app == app_name and user == stored.user_id:
                found.append((user, session_id, stored))
        users = sorted({user for user, _, _ in found})
        app_state, *user_states = await asyncio.gather(
            self.engine.get_shared_state(_app_key(app_name)),
            *(self.engine.get_shared_state(_user_key(app_name, u)) for u in users),
        )
        by_user = dict(zip(users, user_states, strict=True))
        sessions = [
            self._session(app_name, user, session_id, stored, app_state, by_user[user], [])
            for user, session_id, stored in found
        ]
        sessions.sort(key=lambda s: (s.last_update_time, s.user_id, s.id))
        return ListSessionsResponse(sessions=sessions)

    async def delete_session(self, *, app_name: str, user_id: str, session_id: str) -> None:
        """Delete the session and its events (nothing happens when it does not exist)."""
        self._check_open()
        session_id = session_id.strip() if session_id else session_id
        await self.engine.delete_session(engine_session_id(app_name, user_id, session_id))

    async def get_user_state(self, *, app_name: str, user_id: str) -> dict[str, Any]:
        """The user's state in the app, keys without the ``user:`` prefix ({} when unset)."""
        self._check_open()
        return await self.engine.get_shared_state(_user_key(app_name, user_id))

    async def append_event(self, session: Session, event: Event) -> Event:
        """Store ``event`` and its state delta, then apply both to ``session``.

        Partial events are returned untouched. SessionNotFoundError (ADK's) when the
        session does not exist; SessionExpiredError when it expired; with
        ``on_stale="raise"``, StaleSessionError (ADK's) when ``session`` is stale."""
        self._check_open()
        if event.partial:
            return event
        self._apply_temp_state(session, event)
        event = self._trim_temp_delta_state(event)
        keys = _Keys.of(session.app_name, session.user_id, session.id)
        deltas = _Deltas.of(event.actions.state_delta)
        seen = _seen_seq(session)
        try:
            if self.on_stale == "raise":
                message = await self._append_if_current(keys.session, session, event)
            else:
                message = await self._append(keys.session, event)
        except errors.SessionNotFoundError as exc:
            raise SessionNotFoundError(f"Session {session.id} not found.") from exc
        if isinstance(session, _LoadedSession):
            # Still current only if nothing else was appended since it last looked.
            current = self.on_stale == "raise" or (seen is not None and message.seq == seen + 1)
            session._ctxengine_seq = message.seq if current else None
        if deltas.session:
            await self.engine.update_metadata(keys.session, deltas.session)
        if deltas.app:
            await self.engine.update_shared_state(keys.app, deltas.app)
        if deltas.user:
            await self.engine.update_shared_state(keys.user, deltas.user)
        # add_message stamps the session's last_activity with the message's time.
        session.last_update_time = message.created_at.timestamp()
        return self._commit_event_to_session(session, event)

    async def _append(self, key: str, event: Event, if_last_seq: int | None = None) -> Message:
        """Store ``event`` as JSON data (only after the event ``if_last_seq`` when given)."""
        content = event.model_dump(mode="json", exclude_none=True)
        return await self.engine.add_message(key, _role(event), content, if_last_seq=if_last_seq)

    async def _append_if_current(self, key: str, session: Session, event: Event) -> Message:
        """Store ``event`` unless ``session`` has not seen the newest stored event: the
        append itself checks the newest seq under the chat's lock, so the check holds
        across processes."""
        seen = _seen_seq(session)
        if seen is None:  # a session object this service did not load: by event id
            newest = await self.engine.get_messages(key, limit=1)
            head = newest[-1] if newest else None
            if not _ends_with(session, head):
                raise StaleSessionError(_STALE.format(id=session.id))
            seen = 0 if head is None else head.seq
        try:
            return await self._append(key, event, if_last_seq=seen)
        except errors.ConflictError as exc:
            raise StaleSessionError(_STALE.format(id=session.id)) from exc

    async def _shared(self, key: str, patch: dict[str, Any]) -> dict[str, Any]:
        if patch:
            return await self.engine.update_shared_state(key, patch)
        return await self.engine.get_shared_state(key)

    async def _events(self, key: str, config: GetSessionConfig | None) -> tuple[list[Event], int]:
        """The events ``config`` selects, in sequence order: those at or after
        ``after_timestamp``, of them the last ``num_recent_events``; and the sequence
        number of the newest stored event (0 when there is none)."""
        wanted = config.num_recent_events if config else None
        after = config.after_timestamp if config else None
        if wanted == 0 or after is None or wanted is None:
            messages = await self.engine.get_messages(key, limit=1 if wanted == 0 else wanted)
            newest = messages[-1].seq if messages else 0
            events = [] if wanted == 0 else [_event(m) for m in messages]
            if after is not None:
                events = [e for e in events if e.timestamp >= after]
            return events, newest
        found: list[Event] = []
        before: int | None = None
        newest = 0
        while len(found) < wanted:
            page = await self.engine.get_messages(key, limit=_PAGE, before_seq=before)
            if before is None and page:
                newest = page[-1].seq
            for message in reversed(page):
                event = _event(message)
                if event.timestamp >= after:
                    found.append(event)
                    if len(found) == wanted:
                        break
            if len(page) < _PAGE:
                break
            before = page[0].seq
        found.reverse()
        return found, newest

    @staticmethod
    def _session(
        app_name: str,
        user_id: str,
        session_id: str,
        stored: EngineSession,
        app_state: dict[str, Any],
        user_state: dict[str, Any],
        events: list[Event],
        *,
        seq: int | None = None,
    ) -> _LoadedSession:
        """The ADK session; ``seq``: the newest stored event's sequence number, when
        known."""
        session = _LoadedSession(
            id=session_id,
            app_name=app_name,
            user_id=user_id,
            state=_merged(app_state, user_state, stored.metadata),
            events=events,
            last_update_time=stored.last_activity.timestamp(),
        )
        session._ctxengine_seq = seq
        return session
