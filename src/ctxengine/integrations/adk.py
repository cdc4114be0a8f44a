"""A Google ADK session service stored by ctxengine.

    from google.adk.runners import Runner
    from ctxengine.integrations.adk import ContextEngineSessionService

    runner = Runner(
        agent=agent, app_name="travel", session_service=ContextEngineSessionService(engine)
    )

Each ADK session is one ctxengine session, so its lifecycle, limits and metrics apply;
events are messages of that session's chat and state lives in its metadata and in
shared state documents. See :class:`ContextEngineSessionService` for the mapping.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

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
from pydantic_core import to_jsonable_python

from .. import errors

if TYPE_CHECKING:
    from .. import Message
    from .. import Session as EngineSession
    from ..tenant import TenantView

__all__ = ["ContextEngineSessionService", "engine_session_id"]

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


class ContextEngineSessionService(BaseSessionService):
    """ADK's ``BaseSessionService`` on ctxengine: a drop-in ``session_service`` for a
    ``Runner``, with the semantics of ADK's own services and no stale-session errors.

    ``engine`` is a :class:`~ctxengine.ContextEngine` or a tenant view of one; ``tier``
    is the tier of the sessions it creates.

    Mapping (public ctxengine API only):

    - an ADK session ``(app_name, user_id, session_id)`` is the ctxengine session
      :func:`engine_session_id` (``json.dumps([app_name, user_id, session_id])``,
      compact), of user ``user_id``, tagged ``adk`` and ``adk-app:<app_name>``;
      ids whose keys pass 255 characters raise ``ValueError``;
    - each event is a message of the session's current chat, role ``user`` for
      events authored by ``user`` and ``assistant`` otherwise, whose content is the
      event's JSON; the chat's sequence numbers order events;
    - session state is the session's metadata; ``app:`` and ``user:`` state are the
      shared state documents ``["adk-app", app]`` and ``["adk-user", app, user]``
      (keys without their prefix); ``temp:`` state reaches the in-memory session
      only; partial events are not stored;
    - ``last_update_time`` is the ctxengine session's ``last_activity``.

    Appends are not checked for staleness: any number of writers holding old copies
    of a session may append, every event is kept in commit order, and state deltas
    are merged key by key in SQL, so no writer's delta is lost. The event is written
    before its state delta, not in one transaction with it.

    The ctxengine session rules apply: appending to an expired session raises
    :class:`~ctxengine.errors.SessionExpiredError` (to a paused or ended one,
    :class:`~ctxengine.errors.SessionNotActiveError`); a chat keeps at most
    ``max_messages_per_chat`` events ("trim" drops the oldest, "reject" raises
    :class:`~ctxengine.errors.HistoryLimitError`); events over ``max_message_bytes``
    and state over ``max_metadata_bytes`` raise :class:`~ctxengine.errors.ValidationError`;
    ``redact_patterns`` apply to the stored event text; session limits apply to
    ``create_session``. Reading and deleting work in any session status.
    """

    def __init__(self, engine: TenantView, *, tier: str = "free") -> None:
        self.engine = engine
        self.tier = tier

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
            )
        except errors.SessionExistsError as exc:
            raise AlreadyExistsError(f"Session with id {session_id} already exists.") from exc
        app_state, user_state = await asyncio.gather(
            self._shared(keys.app, deltas.app), self._shared(keys.user, deltas.user)
        )
        return self._session(app_name, user_id, session_id, stored, app_state, user_state, [])

    async def get_session(
        self,
        *,
        app_name: str,
        user_id: str,
        session_id: str,
        config: GetSessionConfig | None = None,
    ) -> Session | None:
        """The session with its events (filtered by ``config``) and merged state, or None."""
        session_id = session_id.strip() if session_id else session_id
        keys = _Keys.of(app_name, user_id, session_id)
        stored = await self.engine.get_session(keys.session)
        if stored is None:
            return None
        events, app_state, user_state = await asyncio.gather(
            self._events(keys.session, config),
            self.engine.get_shared_state(keys.app),
            self.engine.get_shared_state(keys.user),
        )
        return self._session(app_name, user_id, session_id, stored, app_state, user_state, events)

    async def list_sessions(
        self, *, app_name: str, user_id: str | None = None
    ) -> ListSessionsResponse:
        """The app's sessions (of ``user_id``, or of every user), without events, with
        merged state, oldest update first."""
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
        session_id = session_id.strip() if session_id else session_id
        await self.engine.delete_session(engine_session_id(app_name, user_id, session_id))

    async def get_user_state(self, *, app_name: str, user_id: str) -> dict[str, Any]:
        """The user's state in the app, keys without the ``user:`` prefix ({} when unset)."""
        return await self.engine.get_shared_state(_user_key(app_name, user_id))

    async def append_event(self, session: Session, event: Event) -> Event:
        """Store ``event`` and its state delta, then apply both to ``session``.

        Partial events are returned untouched. SessionNotFoundError (ADK's) when the
        session does not exist; SessionExpiredError when it expired."""
        if event.partial:
            return event
        self._apply_temp_state(session, event)
        event = self._trim_temp_delta_state(event)
        keys = _Keys.of(session.app_name, session.user_id, session.id)
        deltas = _Deltas.of(event.actions.state_delta)
        content = event.model_dump_json(exclude_none=True)
        role = "user" if event.author == "user" else "assistant"
        try:
            message = await self.engine.add_message(keys.session, role, content)
        except errors.SessionNotFoundError as exc:
            raise SessionNotFoundError(f"Session {session.id} not found.") from exc
        if deltas.session:
            await self.engine.update_metadata(keys.session, deltas.session)
        if deltas.app:
            await self.engine.update_shared_state(keys.app, deltas.app)
        if deltas.user:
            await self.engine.update_shared_state(keys.user, deltas.user)
        # add_message stamps the session's last_activity with the message's time.
        session.last_update_time = message.created_at.timestamp()
        return self._commit_event_to_session(session, event)

    async def _shared(self, key: str, patch: dict[str, Any]) -> dict[str, Any]:
        if patch:
            return await self.engine.update_shared_state(key, patch)
        return await self.engine.get_shared_state(key)

    async def _events(self, key: str, config: GetSessionConfig | None) -> list[Event]:
        """The events ``config`` selects, in sequence order: those at or after
        ``after_timestamp``, of them the last ``num_recent_events``."""
        wanted = config.num_recent_events if config else None
        after = config.after_timestamp if config else None
        if wanted == 0:
            return []
        if after is None:
            return [_event(m) for m in await self.engine.get_messages(key, limit=wanted)]
        if wanted is None:
            events = [_event(m) for m in await self.engine.get_messages(key, limit=None)]
            return [e for e in events if e.timestamp >= after]
        found: list[Event] = []
        before: int | None = None
        while len(found) < wanted:
            page = await self.engine.get_messages(key, limit=_PAGE, before_seq=before)
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
        return found

    @staticmethod
    def _session(
        app_name: str,
        user_id: str,
        session_id: str,
        stored: EngineSession,
        app_state: dict[str, Any],
        user_state: dict[str, Any],
        events: list[Event],
    ) -> Session:
        return Session(
            id=session_id,
            app_name=app_name,
            user_id=user_id,
            state=_merged(app_state, user_state, stored.metadata),
            events=events,
            last_update_time=stored.last_activity.timestamp(),
        )
