"""Through PgBouncer in transaction-pooling mode (``transaction_pooling=True``): every
guarantee holds, engines in several processes sharing fewer server connections than
they have client connections; cross-process events listen on a direct ``events_url``.

The workers of the concurrency tests run in spawned processes that read their settings
from the environment (``CTXENGINE_TRANSACTION_POOLING``, ``CTXENGINE_EVENTS_URL``)."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from ctxengine import ContextEngine, EngineSettings, Event, QuotaType
from ctxengine.errors import (
    ConflictError,
    DatabaseUnavailableError,
    QuotaExceededError,
    RateLimitError,
    ValidationError,
)
from tests.fixtures import new_pg_database
from tests.pgbouncer import POOL_SIZE, PgBouncer, pgbouncer  # noqa: F401

from ..conversation import _workers as conversation_workers
from ..integrations import _workers as event_workers
from ..limits import _workers as limit_workers
from ..memory import _workers as memory_workers
from . import _workers

POOLED = EngineSettings(auto_cleanup=False, transaction_pooling=True)


@pytest.fixture
def bouncer_url(pg_url: str, pgbouncer: PgBouncer) -> str:  # noqa: F811
    """The test's database through PgBouncer."""
    return pgbouncer.url(pg_url)


@pytest.fixture
def pooled_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Engines built from the environment (the workers') go through the pooler."""
    monkeypatch.setenv("CTXENGINE_TRANSACTION_POOLING", "true")
    yield


def spawn(processes: int = 4) -> Any:
    return multiprocessing.get_context("spawn").Pool(processes)


async def server_state(admin: asyncpg.Connection, url: str) -> tuple[int, int]:
    """The server connections to the test's database, and the advisory locks held."""
    database = url.rsplit("/", 1)[1]
    connections = await admin.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1", database
    )
    locks = await admin.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
    return connections, locks


async def test_the_api_through_pgbouncer(bouncer_url: str, pg_admin: asyncpg.Connection) -> None:
    """Two engines (20 client connections) on six server connections: counters exact,
    messages in order, a quota and a rate limit never passed, compare-and-set."""
    async with (
        ContextEngine(bouncer_url, settings=POOLED) as one,
        ContextEngine(bouncer_url, settings=POOLED) as two,
    ):
        sid = (await one.create_session(user_id="u", tier="enterprise")).session_id
        await asyncio.gather(
            *(e.update_session(sid, increment_requests=True) for e in (one, two) for _ in range(64))
        )
        assert (await two.get_session(sid)).request_count == 128  # type: ignore[union-attr]

        for i in range(20):  # alternating engines, so alternating server connections
            await (one, two)[i % 2].add_message(sid, "user", f"m{i}")
        messages = await one.get_messages(sid, limit=None)
        assert [m.content for m in messages] == [f"m{i}" for i in range(20)]

        await one.set_quota(sid, QuotaType.TOKENS, 100)

        async def spend(engine: ContextEngine) -> bool:
            try:
                await engine.track_usage(sid, "chat", QuotaType.TOKENS, 7)
            except QuotaExceededError:
                return False
            return True

        spent = await asyncio.gather(*(spend(e) for e in (one, two) for _ in range(20)))
        assert sum(spent) == 100 // 7
        assert (await two.get_quota(sid, QuotaType.TOKENS)).used == 7 * (100 // 7)

        await one.set_rate_limit(sid, "search", 10, 3600)

        async def call(engine: ContextEngine) -> bool:
            try:
                await engine.enforce_rate_limit(sid, "search")
            except RateLimitError:
                return False
            return True

        assert sum(await asyncio.gather(*(call(e) for e in (one, two) for _ in range(15)))) == 10

        await one.remember("k", {"v": 1}, user_id="u", expected_version=0)
        with pytest.raises(ConflictError):
            await two.remember("k", {"v": 2}, user_id="u", expected_version=0)
        assert (await two.remember("k", {"v": 2}, user_id="u", expected_version=1)).version == 2

        connections, locks = await server_state(pg_admin, bouncer_url)
        assert connections <= POOL_SIZE  # shared: the engines hold client connections only
        assert locks == 0  # no lock outlives its transaction (none is session-scoped)


async def test_guarantees_across_processes_through_pgbouncer(
    bouncer_url: str, pooled_env: None, pg_admin: asyncpg.Connection
) -> None:
    """Four processes at once, each on the pooler: update_session exact, a quota filled
    to its last unit, a rate limit's exact count, per-writer message order, one winner
    per version of a compare-and-set, each expiry done once."""
    long_ago = datetime.now(UTC) - timedelta(hours=2)
    async with ContextEngine(bouncer_url, settings=POOLED, clock=lambda: long_ago) as old:
        for start in range(0, 400, 100):
            await asyncio.gather(
                *(old.create_session(f"old{i}", "u") for i in range(start, start + 100))
            )
    async with ContextEngine(bouncer_url, settings=POOLED) as engine:
        sid = (await engine.create_session("hot", "u", tier="enterprise")).session_id
        await engine.set_quota(sid, QuotaType.TOKENS, 1000)
        await engine.set_rate_limit(sid, "search", 30, 3600)
        talk = (await engine.create_session("talk", "u", tier="enterprise")).session_id
        with spawn() as workers:
            workers.starmap(_workers.update, [(bouncer_url, sid, 5, 20, 0.002)] * 4)
            spent = workers.starmap(limit_workers.spend, [(bouncer_url, sid, 4, 20, 7.0)] * 4)
            admitted = workers.starmap(limit_workers.hammer, [(bouncer_url, sid, 3, 15)] * 4)
            workers.starmap(
                conversation_workers.append,
                [(bouncer_url, talk, f"p{p}", 4, 10) for p in range(4)],
            )
            start = time.time() + 2
            won = workers.starmap(
                memory_workers.race, [(bouncer_url, "counter", w, 25, start) for w in range(4)]
            )
            start = time.time() + 2
            expired = workers.starmap(_workers.sweep, [(bouncer_url, 10, start)] * 4)

        session = await engine.get_session(sid)
        assert session is not None
        assert session.request_count == 4 * 5 * 20 and session.error_count == 4 * 5 * 2

        assert sum(spent) == 7 * (1000 // 7)
        assert (await engine.get_quota(sid, QuotaType.TOKENS)).used == sum(spent)
        records = await engine.get_usage_history(session_id=sid, limit=10_000)
        assert sum(r.amount for r in records) == sum(spent)

        assert sum(admitted) == 30

        final = await engine.get_messages(talk, limit=None)
        assert len(final) == 160
        assert [m.seq for m in final] == sorted(m.seq for m in final)
        for p in range(4):
            for t in range(4):
                mine = [m.content for m in final if m.content.startswith(f"p{p}/{t}/")]
                assert mine == [f"p{p}/{t}/{i}" for i in range(10)]

        wins = Counter(version for batch in won for version in batch)
        assert set(wins) == set(range(1, sum(wins.values()) + 1))
        assert all(n == 1 for n in wins.values())  # one winner per version

        assert sum(expired) == 400  # each of the 400 idle sessions expired once
        assert await engine.count_sessions(status="expired") == 400
        _, locks = await server_state(pg_admin, bouncer_url)
        assert locks == 0


async def test_migrations_through_pgbouncer(
    pgbouncer: PgBouncer,  # noqa: F811
    pg_admin: asyncpg.Connection,
) -> None:
    """Three engines migrate an empty database through the pooler at once: once."""
    direct = await new_pg_database(pg_admin)
    url = pgbouncer.url(direct)
    try:
        engines = [ContextEngine(url, settings=POOLED) for _ in range(3)]
        await asyncio.gather(*(e.initialize() for e in engines))
        try:
            health = await engines[0].health_check()
            assert health["status"] == "healthy" and health["schema_revision"]
            assert await engines[1].create_session("s", "u")
        finally:
            await asyncio.gather(*(e.close() for e in engines))
        migrated = await asyncpg.connect(direct.replace("+asyncpg", "", 1))
        try:
            versions = await migrated.fetchval("SELECT count(*) FROM ctxengine_alembic_version")
        finally:
            await migrated.close()
        assert versions == 1
    finally:
        await pg_admin.execute(f'DROP DATABASE IF EXISTS "{direct.rsplit("/", 1)[1]}" WITH (FORCE)')


async def test_events_across_processes_listen_on_events_url(
    bouncer_url: str, pg_url: str, pooled_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Events committed through the pooler reach an engine in another process, which
    listens on a direct connection (LISTEN needs a session of its own)."""
    direct = pg_url.replace("postgresql+asyncpg://", "postgresql://", 1)
    monkeypatch.setenv("CTXENGINE_EVENTS_URL", direct)
    relayed = POOLED.model_copy(update={"cross_process_events": True, "events_url": direct})
    heard: list[Event] = []
    async with ContextEngine(bouncer_url, settings=relayed) as engine:
        engine.subscribe(heard.append)
        relay = engine._runtime().ctx.relay
        assert relay is not None and relay.connected
        with spawn(1) as workers:
            pending = workers.apply_async(event_workers.listen, (bouncer_url, "ready", 60))
            for _ in range(1200):
                if await engine.get_session("ready") is not None:
                    break
                await asyncio.sleep(0.05)
            await engine.create_session("s1", "u")
            await engine.add_message("s1", "user", "hello")
            await engine.create_session("stop", "u")
            await engine.end_session("stop")
            heard_there = await asyncio.to_thread(pending.get, 60)
    assert heard_there == [
        ("session.created", "ready", "default"),
        ("session.created", "s1", "default"),
        ("message.added", "s1", "default"),
        ("session.created", "stop", "default"),
        ("session.ended", "stop", "default"),
    ]
    assert ("session.created", "ready") in [(e.type, e.session_id) for e in heard]


async def test_without_transaction_pooling_pgbouncer_is_named(bouncer_url: str) -> None:
    """PgBouncer refuses the statement_timeout sent when connecting: the error says
    what to set instead of "retry"."""
    settings = EngineSettings(auto_cleanup=False, auto_migrate=False)
    with pytest.raises(DatabaseUnavailableError, match="transaction_pooling=True") as caught:
        async with ContextEngine(bouncer_url, settings=settings):
            pass
    assert caught.value.retryable is False


def test_cross_process_events_through_a_pooler_need_events_url() -> None:
    with pytest.raises(ValidationError, match="events_url"):
        EngineSettings(cross_process_events=True, transaction_pooling=True)
    EngineSettings(
        cross_process_events=True,
        transaction_pooling=True,
        events_url="postgresql://app@db:5432/app",
    )


async def test_events_url_must_be_postgresql() -> None:
    settings = EngineSettings(auto_cleanup=False, events_url="sqlite:///x.db")
    with pytest.raises(ValidationError, match="events_url"):
        await ContextEngine("postgresql://u@127.0.0.1:1/db", settings=settings).initialize()
