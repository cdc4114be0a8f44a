"""Sessions: creation under limits, the state machine, metrics, listing, expiry, retention."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from functools import partial
from typing import Any

from .. import validation as v
from ..errors import (
    InvalidTransitionError,
    SessionExistsError,
    SessionExpiredError,
    SessionLimitError,
    SessionNotActiveError,
    SessionNotFoundError,
    ValidationError,
)
from ..ids import new_id
from ..lifecycle import END_STATUSES, can_work, idle_deadline, is_stale, sources_of
from ..models import FROM_SETTINGS, FromSettings, Session, SessionStatus, Statistics
from ..storage.connection import Connection
from ..storage.group import SOLO, Combiner, Solo
from ..storage.repositories.conversation import ConversationRepository
from ..storage.repositories.sessions import (
    Counters,
    SessionFilter,
    SessionKey,
    SessionRepository,
    Worker,
)
from .base import Context, Effects, done
from .chats import DEFAULT_CHAT_ID, NewMessage, chat_values, insert_chat, message_cap

_EXPIRE_BATCH = 5000
NO_COUNTERS = Counters()


#: The public call that moves a session to each status (the unit of work's name).
_CALL_FOR = {
    SessionStatus.ACTIVE: "resume_session",
    SessionStatus.PAUSED: "pause_session",
    SessionStatus.COMPLETED: "end_session",
    SessionStatus.FAILED: "end_session",
    SessionStatus.EXPIRED: "end_session",
}


def _event_for(status: SessionStatus) -> str:
    return {
        SessionStatus.ACTIVE: "session.resumed",
        SessionStatus.PAUSED: "session.paused",
        SessionStatus.EXPIRED: "session.expired",
    }.get(status, "session.ended")


class SessionService:
    """Business rules of SPEC §2 and §3, for any tenant."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.repo = SessionRepository(ctx.store.backend, ctx.settings.lease_ttl)
        self.chats = ConversationRepository(ctx.store.backend)
        #: concurrent metric updates, written together: of sessions that must be able to
        #: work (update_session, touch), and of any status (a tracked request's outcome)
        self._recorders: dict[bool, Combiner[tuple[str, str, Counters], Session]] = {
            require: Combiner(partial(self._record_many, require)) for require in (True, False)
        }

    # -- creation -----------------------------------------------------------------------
    def _new_values(
        self,
        tenant: str,
        session_id: str | None,
        user_id: str,
        *,
        tier: str,
        metadata: Any,
        name: str | None,
        tags: Any,
        preferences: Any,
        expires_at: Any,
        idle_timeout: float | FromSettings | None,
    ) -> dict[str, Any]:
        settings = self.ctx.settings
        v.tier(tier, settings.tiers)
        if name is not None and not isinstance(name, str):
            raise ValidationError("name must be a string", field="name")
        if idle_timeout is FROM_SETTINGS:
            idle_timeout = settings.session_timeout
        return {
            "tenant_id": tenant,
            "session_id": new_id() if session_id is None else v.identifier(session_id),
            "user_id": v.identifier(user_id, "user_id"),
            "tier": tier,
            "status": SessionStatus.ACTIVE.value,
            "name": name,
            "metadata": v.json_object(metadata, "metadata", settings.max_metadata_bytes),
            "tags": v.tags(tags),
            "preferences": v.json_object(preferences, "preferences", settings.max_metadata_bytes),
            "expires_at": v.optional_aware(expires_at, "expires_at"),
            "idle_timeout": (
                None if idle_timeout is None else v.seconds(idle_timeout, "idle_timeout")
            ),
            "request_count": 0,
            "error_count": 0,
            "total_processing_time": 0.0,
            "current_chat_id": DEFAULT_CHAT_ID,
            "chat_count": 1,
        }

    @property
    def _limited(self) -> bool:
        """Whether creating a session must count others (session limits are set)."""
        settings = self.ctx.settings
        return (
            settings.max_active_sessions is not None or settings.max_sessions_per_user is not None
        )

    async def check_limits(
        self, conn: Connection, tenant: str, user_id: str, now: datetime
    ) -> None:
        settings = self.ctx.settings
        if not self._limited:
            return
        # Counting other rows is only exact while the creators it concerns are serialized:
        # all of the tenant's for a total limit, else only the user's.
        scope = tenant if settings.max_active_sessions is not None else f"{tenant}/{user_id}"
        await self.ctx.store.backend.lock(conn, f"ctxengine.sessions.{scope}")
        if settings.max_active_sessions is not None:
            n = await self.repo.count_open(conn, tenant, now)
            if n >= settings.max_active_sessions:
                raise SessionLimitError("max_active_sessions", settings.max_active_sessions, n)
        if settings.max_sessions_per_user is not None:
            n = await self.repo.count_open(conn, tenant, now, user_id)
            if n >= settings.max_sessions_per_user:
                raise SessionLimitError(
                    "max_sessions_per_user", settings.max_sessions_per_user, n, user_id
                )

    async def create(
        self,
        tenant: str,
        session_id: str | None,
        user_id: str,
        *,
        exist_ok: bool = False,
        tier: str = "free",
        metadata: Any = None,
        name: str | None = None,
        tags: Any = None,
        preferences: Any = None,
        expires_at: datetime | None = None,
        idle_timeout: float | FromSettings | None = FROM_SETTINGS,
        max_messages: int | FromSettings | None = FROM_SETTINGS,
        system_prompt: NewMessage | None = None,
    ) -> Session:
        """Create a session with its default chat (``system_prompt`` its first message;
        ``max_messages`` its cap)."""
        cap = message_cap(max_messages, self.ctx.settings.max_messages_per_chat)
        values = self._new_values(
            tenant,
            session_id,
            user_id,
            tier=tier,
            metadata=metadata,
            name=name,
            tags=tags,
            preferences=preferences,
            expires_at=expires_at,
            idle_timeout=idle_timeout,
        )
        sid = values["session_id"]
        timeout = values["idle_timeout"]
        # Without limits to count, an id to look up or a first message, the session and
        # its chat go in one statement where the database can (one round trip).
        at_once = (
            self.repo.writes_at_once
            and not exist_ok
            and system_prompt is None
            and not self._limited
        )

        async def work(conn: Connection, fx: Effects) -> Session:
            if exist_ok:
                existing = await self.repo.get(conn, tenant, sid, fx.now)
                if existing is not None:
                    return existing
            stored = {
                **values,
                "created_at": fx.now,
                "last_activity": fx.now,
                "idle_deadline": idle_deadline(fx.now, timeout),
            }
            if at_once:
                chat = chat_values(tenant, sid, DEFAULT_CHAT_ID, fx.now, max_messages=cap)
                session = await self.repo.insert_with_chat(conn, stored, chat, fx.now)
            else:
                await self.check_limits(conn, tenant, values["user_id"], fx.now)
                session = await self.repo.insert(conn, stored, fx.now)
            if session is None:
                existing = await self.repo.get(conn, tenant, sid, fx.now)
                if not exist_ok or existing is None:
                    raise SessionExistsError(sid, tenant)
                return existing
            if not at_once:
                await insert_chat(
                    self.chats,
                    conn,
                    fx.now,
                    tenant,
                    sid,
                    DEFAULT_CHAT_ID,
                    system_prompt,
                    max_messages=cap,
                )
            fx.emit(
                "session.created",
                tenant,
                sid,
                session.user_id,
                tier=session.tier,
            )
            return session

        return await self.ctx.transact(work, one_statement=at_once, operation="create_session")

    # -- reads --------------------------------------------------------------------------
    async def get(self, tenant: str, session_id: str) -> Session | None:
        v.identifier(session_id)

        async def work(conn: Connection, fx: Effects) -> Session | None:
            return await self.repo.get(conn, tenant, session_id, fx.now)

        return await self.ctx.transact(work, write=False, operation="get_session")

    # -- metrics ------------------------------------------------------------------------
    async def record(
        self,
        tenant: str,
        session_id: str,
        *,
        requests: int = 0,
        errors: int = 0,
        processing_time: float = 0.0,
        metadata: Any = None,
        require_active: bool = True,
        operation: str = "update_session",
    ) -> Session:
        v.identifier(session_id)
        counters = Counters(requests, errors, v.duration(processing_time, "add_processing_time"))
        max_bytes = self.ctx.settings.max_metadata_bytes
        patch = v.json_object(metadata, "metadata", max_bytes) if metadata is not None else None

        async def work(conn: Connection, fx: Effects) -> Session | None:
            session = await self.require_active(
                conn, fx, tenant, session_id, counters, patch, require=require_active
            )
            if session is not None and patch:
                v.merged_size(session.metadata, "metadata", max_bytes)
            return session

        with self.ctx.observing(operation):
            if patch is None:  # group commit (a batch of one at once)
                recorded = await self._recorders[require_active]((tenant, session_id, counters))
                if not isinstance(recorded, Solo):
                    return recorded
            # a metadata patch (whose merged size is checked afterwards), or a session
            # the batch did not write: why it cannot work is found and raised here
            session = await self.ctx.transact(
                work, one_statement=patch is None, operation=operation, observed=True
            )
        return done(session)

    async def _record_many(
        self, require_active: bool, updates: Sequence[tuple[str, str, Counters]]
    ) -> list[Session | Solo]:
        """Metric updates in one statement (see ``SessionRepository.record_many``); SOLO
        where a session matched nothing."""

        async def work(conn: Connection, fx: Effects) -> list[Session | None]:
            return await self.repo.record_many(conn, updates, fx.now, require_active)

        operation = "update_session" if require_active else "track_request"
        sessions = await self.ctx.transact(
            work, one_statement=True, operation=operation, observed=True
        )
        return [SOLO if session is None else session for session in sessions]

    async def read(self, conn: Connection, now: datetime, tenant: str, session_id: str) -> Session:
        """The session as stored, observed at ``now`` (its leases counted), or
        SessionNotFoundError."""
        return await self.existing(conn, tenant, session_id, now, leases=True)

    async def existing(
        self,
        conn: Connection,
        tenant: str,
        session_id: str,
        now: datetime,
        *,
        leases: bool = False,
    ) -> Session:
        """The session observed at ``now`` (its leases counted only with ``leases``), or
        SessionNotFoundError."""
        session = await self.repo.get(conn, tenant, session_id, now, leases=leases)
        if session is None:
            raise SessionNotFoundError(session_id, tenant)
        return session

    async def require_active(
        self,
        conn: Connection,
        fx: Effects,
        tenant: str,
        session_id: str,
        counters: Counters = NO_COUNTERS,
        metadata: dict[str, Any] | None = None,
        *,
        require: bool = True,
    ) -> Session | None:
        """Record activity (and ``counters``) on a session that can work, in ``conn``.

        None when it cannot; the error to raise is then left in ``fx`` (a lazily
        detected expiry stays committed). With ``require=False`` any status is accepted.
        """
        session = await self.repo.record(
            conn,
            tenant,
            session_id,
            fx.now,
            require,
            counters,
            metadata,
        )
        if session is not None:
            return session
        await self._refuse_work(conn, fx, tenant, session_id)
        return None

    async def touch_active(
        self, conn: Connection, fx: Effects, tenant: str, session_id: str
    ) -> Worker | None:
        """``require_active`` for calls that need only whose the session is."""
        worker = await self.repo.touch_active(conn, tenant, session_id, fx.now)
        if worker is not None:
            return worker
        await self._refuse_work(conn, fx, tenant, session_id)
        return None

    async def _refuse_work(
        self, conn: Connection, fx: Effects, tenant: str, session_id: str
    ) -> None:
        """Leave in ``fx`` why the session cannot work."""
        status = await self._diagnose(conn, fx, tenant, session_id)
        fx.error = (
            SessionExpiredError(session_id)
            if status is SessionStatus.EXPIRED
            else SessionNotActiveError(session_id, status)
        )

    async def peek_active(
        self, conn: Connection, fx: Effects, tenant: str, session_id: str
    ) -> Session | None:
        """The session if it can work, without writing; else None with the error in ``fx``
        (the rule of ``lifecycle.can_work``, which the guarded statements apply in SQL)."""
        session = await self.existing(conn, tenant, session_id, fx.now)
        if can_work(session, fx.now):
            return session
        if session.status is SessionStatus.EXPIRED or is_stale(session, fx.now):
            fx.error = SessionExpiredError(session_id)
        else:
            fx.error = SessionNotActiveError(session_id, session.status)
        return None

    async def _diagnose(
        self, conn: Connection, fx: Effects, tenant: str, session_id: str
    ) -> SessionStatus:
        """Why a guarded statement matched nothing: the session's status, after moving it
        to expired if it was open but stale (announced once, by whoever expired it)."""
        expired = await self.repo.expire_one(conn, tenant, session_id, fx.now)
        if expired is not None:
            await self.repo.release_leases(conn, [(tenant, session_id)])
            self._announce_expired(fx, expired, reason="idle")
            return SessionStatus.EXPIRED
        # read after the expiry attempt: on PostgreSQL it waited for a concurrent
        # caller's expiry of the session to commit, which this read then sees
        return (await self.existing(conn, tenant, session_id, fx.now)).status

    @staticmethod
    def _announce_expired(fx: Effects, key: SessionKey | Session, reason: str) -> None:
        fx.emit("session.expired", key.tenant_id, key.session_id, key.user_id, reason=reason)

    # -- transitions --------------------------------------------------------------------
    async def transition(self, tenant: str, session_id: str, target: SessionStatus) -> Session:
        v.identifier(session_id)

        async def work(conn: Connection, fx: Effects) -> Session | None:
            session = await self.repo.transition(
                conn, tenant, session_id, fx.now, sorted(sources_of(target)), target
            )
            if session is not None:
                if target in END_STATUSES:
                    await self.repo.release_leases(conn, [(tenant, session_id)])
                if target is SessionStatus.EXPIRED:
                    self._announce_expired(fx, session, reason="ended")
                else:
                    fx.emit(
                        _event_for(target),
                        tenant,
                        session_id,
                        session.user_id,
                        status=target.value,
                    )
                return session
            current = await self._diagnose(conn, fx, tenant, session_id)
            if current is target and target in END_STATUSES:
                return await self.existing(conn, tenant, session_id, fx.now)
            fx.error = InvalidTransitionError(current, target, session_id)
            return None

        return done(await self.ctx.transact(work, operation=_CALL_FOR[target]))

    # -- listing ------------------------------------------------------------------------
    @staticmethod
    def make_filter(
        user_id: str | None = None,
        status: Any = None,
        tier: str | None = None,
        tags: Sequence[str] | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        idle_for: float | None = None,
    ) -> SessionFilter:
        return SessionFilter(
            user_id=v.optional_identifier(user_id, "user_id"),
            status=None if status is None else v.status(status),
            tier=tier,
            tags=tuple(v.tags(tags)),
            created_after=v.optional_aware(created_after, "created_after"),
            created_before=v.optional_aware(created_before, "created_before"),
            idle_for=None if idle_for is None else v.non_negative(idle_for, "idle_for"),
        )

    async def page(
        self, tenant: str, f: SessionFilter, limit: int | None, cursor: str | None
    ) -> list[Session]:
        if limit is not None:
            v.limit(limit)

        async def work(conn: Connection, fx: Effects) -> list[Session]:
            after = None
            if cursor is not None:
                after = await self.repo.position(conn, tenant, v.identifier(cursor, "cursor"))
                if after is None:
                    raise ValidationError(
                        f"unknown cursor {cursor!r}: pass the session_id of the last session "
                        "of the previous page",
                        field="cursor",
                    )
            return await self.repo.page(conn, tenant, f, fx.now, limit, after)

        return await self.ctx.transact(work, write=False, operation="list_sessions")

    async def iterate(
        self, tenant: str, f: SessionFilter, page_size: int, cursor: str | None
    ) -> AsyncIterator[Session]:
        v.limit(page_size, "limit")
        while True:
            batch = await self.page(tenant, f, page_size, cursor)
            for session in batch:
                yield session
            if len(batch) < page_size:
                return
            cursor = batch[-1].session_id

    async def count(self, tenant: str, f: SessionFilter) -> int:
        async def work(conn: Connection, fx: Effects) -> int:
            return await self.repo.count(conn, tenant, f, fx.now)

        return await self.ctx.transact(work, write=False, operation="count_sessions")

    # -- removal and expiry -------------------------------------------------------------
    async def delete(self, tenant: str, session_id: str) -> bool:
        v.identifier(session_id)

        async def work(conn: Connection, fx: Effects) -> bool:
            return await self.repo.delete(conn, tenant, session_id)

        return await self.ctx.transact(work, operation="delete_session")

    async def purge(self, tenant: str, ended_before: datetime, statuses: Sequence[Any]) -> int:
        cutoff = v.aware(ended_before, "ended_before")
        chosen = [v.status(s, "statuses") for s in statuses]
        for status in chosen:
            if status not in END_STATUSES:
                raise ValidationError(
                    f"purge_sessions removes ended sessions only, not {status.value!r}",
                    field="statuses",
                )

        async def work(conn: Connection, fx: Effects) -> int:
            return await self.repo.purge(conn, tenant, cutoff, chosen)

        return await self.ctx.transact(work, operation="purge_sessions")

    async def expire_stale(self, tenant: str | None, max_idle_seconds: float | None) -> int:
        """Expire every open session that is stale (idle longer than its own timeout,
        or than ``max_idle_seconds`` when given), in batches; announce each once."""
        idle = (
            None if max_idle_seconds is None else v.positive(max_idle_seconds, "max_idle_seconds")
        )
        by_tenant: dict[str, int] = {}

        async def work(conn: Connection, fx: Effects) -> int:
            expired = await self.repo.expire_stale(
                conn, tenant, fx.now, idle, _EXPIRE_BATCH, keys=fx.listened
            )
            if expired.count:
                await self.repo.release_leases_of_ended(conn, tenant)
            for row in expired.rows:  # only when someone listens
                self._announce_expired(fx, row, reason="idle")
            for key, count in expired.by_tenant.items():
                by_tenant[key] = by_tenant.get(key, 0) + count
            return expired.count

        async def batches() -> int:
            """Batches until one is not full; how many sessions they expired."""
            done = 0
            while True:
                n = await self.ctx.transact(work, operation="cleanup_inactive_sessions")
                done += n
                if n < _EXPIRE_BATCH:
                    return done

        total = await self.ctx.transact(work, operation="cleanup_inactive_sessions")
        if total == _EXPIRE_BATCH:  # a backlog
            workers = self.ctx.store.backend.sweep_workers
            tasks = [asyncio.ensure_future(batches()) for _ in range(workers)]
            try:
                total += sum(await asyncio.gather(*tasks))
            finally:  # one failed: stop the others (each batch is a transaction of its own)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        now = self.ctx.clock()
        report = Effects(now)
        if tenant is not None:
            by_tenant.setdefault(tenant, 0)
        for key, count in sorted(by_tenant.items()):
            report.emit("cleanup.completed", key, expired=count)
        await self.ctx.announce(report.events)
        return total

    # -- aggregates ---------------------------------------------------------------------
    async def statistics(self, tenant: str) -> Statistics:
        async def work(conn: Connection, fx: Effects) -> Statistics:
            s = await self.repo.statistics(conn, tenant)
            usage = await self.repo.usage_by_resource(conn, tenant)
            _, messages = await self.chats.message_totals(conn, tenant)
            by_status = {status.value: s.by_status.get(status.value, 0) for status in SessionStatus}
            users = s.users
            return Statistics(
                total_sessions=s.sessions,
                sessions_by_status=by_status,
                active_sessions=by_status[SessionStatus.ACTIVE.value],
                total_users=users,
                average_sessions_per_user=s.sessions / users if users else 0.0,
                total_requests=s.requests,
                total_errors=s.errors,
                error_rate=s.errors / s.requests if s.requests else 0.0,
                average_processing_time=s.processing_time / s.requests if s.requests else 0.0,
                total_messages=messages,
                usage_by_resource=usage,
            )

        return await self.ctx.transact(work, write=False, operation="get_statistics")
