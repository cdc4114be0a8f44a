"""Tenant isolation, and the event bus (handlers, streams, failures)."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from sqlalchemy import text

from ctxengine import ContextEngine, EngineSettings, Event, SessionStatus
from ctxengine.errors import (
    SessionExistsError,
    SessionNotFoundError,
    StorageError,
    ValidationError,
    WrongEventLoopError,
)
from tests.fixtures import FakeClock


async def test_tenants_cannot_see_or_touch_each_other(db_url: str, clock: FakeClock) -> None:
    cfg = EngineSettings(auto_cleanup=False, session_timeout=60, max_sessions_per_user=1)
    async with ContextEngine(db_url, settings=cfg, clock=clock) as engine:
        acme, globex = engine.tenant("acme"), engine.tenant("globex")
        await acme.create_session("same-id", "u", tags=["t"])
        await globex.create_session("same-id", "u")  # ids and limits are per tenant
        with pytest.raises(SessionExistsError):
            await acme.create_session("same-id", "v")
        await acme.update_session("same-id", increment_requests=True)
        assert (await globex.get_session("same-id")).request_count == 0  # type: ignore[union-attr]
        assert await engine.get_session("same-id") is None  # the default tenant
        with pytest.raises(SessionNotFoundError):
            await engine.end_session("same-id")
        assert await acme.count_sessions() == 1 and await engine.count_sessions() == 0
        assert [s.tenant_id for s in await acme.list_sessions(tags=["t"])] == ["acme"]
        assert await globex.list_sessions(tags=["t"]) == []
        assert (await globex.get_statistics()).total_requests == 0
        await globex.pause_session("same-id")
        assert (await acme.get_session("same-id")).status is SessionStatus.ACTIVE  # type: ignore[union-attr]
        clock.advance(61)
        assert await acme.cleanup_inactive_sessions() == 1  # acme only
        assert (await globex.get_session("same-id")).status is SessionStatus.PAUSED  # type: ignore[union-attr]
        future = datetime.now(UTC) + timedelta(days=1)
        assert await globex.purge_sessions(ended_before=future) == 0
        assert await globex.delete_session("same-id") is True
        assert await acme.get_session("same-id") is not None
        with pytest.raises(ValidationError):
            engine.tenant("")


async def test_handlers_run_after_commit_and_failures_are_contained(
    engine: ContextEngine, caplog: pytest.LogCaptureFixture
) -> None:
    sync_seen: list[str] = []
    async_seen: list[str] = []

    def broken(event: Event) -> None:
        raise RuntimeError("handler bug")

    async def slow(event: Event) -> None:
        await asyncio.sleep(0.01)
        async_seen.append(event.type)

    engine.subscribe(broken)
    engine.subscribe(slow, "session.created")
    stop = engine.subscribe(lambda e: sync_seen.append(e.type))
    session = await engine.create_session("s", "u")  # the broken handler does not break it
    assert sync_seen == ["session.created"]  # sync handlers ran before the call returned
    assert session.status is SessionStatus.ACTIVE
    stop()
    await engine.pause_session("s")
    assert sync_seen == ["session.created"]
    await asyncio.sleep(0.05)
    assert async_seen == ["session.created"]
    assert "event handler failed" in caplog.text
    with pytest.raises(ValidationError):
        engine.subscribe(print, "session.exploded")


async def test_event_streams_filter_and_end_on_close(db_url: str) -> None:
    engine = ContextEngine(db_url, settings=EngineSettings(auto_cleanup=False))
    await engine.initialize()
    everything = engine.events()
    only_b = engine.events("session.ended", session_id="b")
    acme = engine.tenant("acme").events()
    await engine.create_session("a", "u")
    await engine.create_session("b", "u")
    await engine.end_session("a")
    await engine.end_session("b")
    await engine.tenant("acme").create_session("c", "u")
    await engine.close()
    assert [(e.type, e.session_id) async for e in everything] == [
        ("session.created", "a"),
        ("session.created", "b"),
        ("session.ended", "a"),
        ("session.ended", "b"),
        ("session.created", "c"),
    ]
    assert [e.session_id async for e in only_b] == ["b"]
    assert [(e.tenant_id, e.session_id) async for e in acme] == [("acme", "c")]


async def test_a_lost_database_raises_storage_error_and_recovers(
    db_url: str, pg_admin: asyncpg.Connection
) -> None:
    if not db_url.startswith("postgresql"):
        pytest.skip("connections are killed with pg_terminate_backend")
    database = db_url.rsplit("/", 1)[1]
    async with ContextEngine(db_url, settings=EngineSettings(auto_cleanup=False)) as engine:
        await engine.create_session("s", "u")

        async def kill_soon() -> None:
            await asyncio.sleep(0.3)
            await pg_admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = $1 AND pid <> pg_backend_pid()",
                database,
            )

        killer = asyncio.create_task(kill_soon())
        store = engine._store
        started = time.monotonic()
        with pytest.raises(StorageError) as info:
            await store.run(lambda conn: conn.execute(text("SELECT pg_sleep(5)")), operation="slow")
        await killer
        assert time.monotonic() - started < 5
        assert info.value.__cause__ is not None
        # the engine works again: the pool replaces the dead connections
        session = await engine.update_session("s", increment_requests=True)
        assert session.request_count == 1
        assert (await engine.health_check())["status"] == "healthy"
        assert store.connections_in_use() == 0


async def test_sequential_calls_reuse_the_connection_used_last(db_url: str) -> None:
    """The pool hands out the connection returned last (LIFO): after a burst has opened
    several, sequential calls keep to one server process instead of rotating over all
    of them (the rotation cost PostgreSQL update_session 40 % of its throughput)."""
    if not db_url.startswith("postgresql"):
        pytest.skip("SQLite runs on one connection")
    settings = EngineSettings(auto_cleanup=False, pool_size=8)
    async with ContextEngine(db_url, settings=settings) as engine:
        await engine.create_session("s", "u")
        store = engine._store

        async def server_pid() -> int:
            async def work(conn):  # type: ignore[no-untyped-def]
                await asyncio.sleep(0.01)  # held long enough for the burst to need 8
                return (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()

            return await store.run(work, write=False)

        burst = set(await asyncio.gather(*(server_pid() for _ in range(8))))
        assert len(burst) == 8
        sequential = {await server_pid() for _ in range(10)}
        assert len(sequential) == 1


async def test_a_stream_in_async_with_is_unsubscribed_when_left(engine: ContextEngine) -> None:
    bus = engine._runtime().ctx.bus
    async with engine.events("session.created") as stream:
        assert len(bus._streams) == 1
        await engine.create_session("a", "u")
        assert (await anext(stream)).session_id == "a"
    assert len(bus._streams) == 0 and bus.idle
    await engine.create_session("b", "u")
    assert stream._queue.qsize() == 1  # only the end marker: nothing more is queued
    assert [e async for e in stream] == []


async def test_a_closed_stream_wakes_its_reader_and_queues_nothing(engine: ContextEngine) -> None:
    bus = engine._runtime().ctx.bus
    stream = engine.events()
    reader = asyncio.create_task(anext(stream))
    await asyncio.sleep(0)
    await engine.create_session("a", "u")
    assert (await reader).session_id == "a"
    waiting = asyncio.create_task(anext(stream))
    await asyncio.sleep(0)
    await engine.create_session("b", "u")  # queued, then dropped by aclose()
    await stream.aclose()
    with pytest.raises(StopAsyncIteration):
        await waiting
    assert len(bus._streams) == 0
    await engine.create_session("c", "u")
    assert stream._queue.empty()
    assert [e async for e in stream] == []
    await stream.aclose()  # twice is fine


async def test_a_stream_its_consumer_drops_is_unsubscribed_at_once(engine: ContextEngine) -> None:
    bus = engine._runtime().ctx.bus
    stream = engine.events()
    del stream
    assert len(bus._streams) == 0

    async def first_created() -> str | None:
        async for event in engine.events("session.created"):
            return event.session_id  # stops reading without closing the stream
        return None

    reader = asyncio.create_task(first_created())
    await asyncio.sleep(0)  # subscribed
    assert len(bus._streams) == 1
    await engine.create_session("a", "u")
    assert await reader == "a"
    assert len(bus._streams) == 0 and bus.idle  # collected with the reader, no gc needed
    gc.collect()
    assert len(bus._streams) == 0


async def call_on_a_new_loop_in_a_thread(call: Callable[[], Awaitable[object]]) -> BaseException:
    """Run ``call()`` in another thread on its own event loop; what it raised."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(call())  # type: ignore[arg-type]
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    await asyncio.to_thread(thread.join)
    assert raised, "the call should have raised"
    return raised[0]


async def test_a_call_from_another_thread_raises_wrong_event_loop(engine: ContextEngine) -> None:
    await engine.create_session("s", "u")
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: engine.get_session("s"),
        lambda: engine.tenant("acme").create_session("t", "u"),
        lambda: engine.track_usage("s", "op", "api_calls"),
        lambda: engine.health_check(),
        lambda: engine.initialize(),
        lambda: engine.close(),
    ]
    for call in calls:
        error = await call_on_a_new_loop_in_a_thread(call)
        assert isinstance(error, WrongEventLoopError), error
        assert "one engine per event loop" in str(error) and "same URL" in str(error)
        assert "blocking facade, ctxengine.sync.ContextEngine" in str(error)  # many threads

    async def plain_members() -> None:
        engine.subscribe(print)

    assert isinstance(await call_on_a_new_loop_in_a_thread(plain_members), WrongEventLoopError)
    error: list[BaseException] = []

    def without_a_loop() -> None:
        try:
            engine.events()
        except BaseException as exc:
            error.append(exc)

    await asyncio.to_thread(without_a_loop)
    assert isinstance(error[0], WrongEventLoopError)
    # the engine still works on its own loop, and plain members off-loop in its thread
    assert engine.is_open and (await engine.get_session("s")) is not None
    assert await engine.tenant("acme").count_sessions() == 0


def test_a_call_from_a_second_loop_in_the_same_thread_raises(db_url: str) -> None:
    engine = ContextEngine(db_url, settings=EngineSettings(auto_cleanup=False))
    first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        first.run_until_complete(engine.initialize())
        first.run_until_complete(engine.create_session("s", "u"))
        stop = engine.subscribe(print)  # no loop running, the loop's own thread: fine
        stop()
        with pytest.raises(WrongEventLoopError):
            second.run_until_complete(engine.get_session("s"))
        with pytest.raises(WrongEventLoopError):
            second.run_until_complete(engine.close())
        assert first.run_until_complete(engine.get_session("s")) is not None
    finally:
        first.run_until_complete(engine.close())
        first.close()
        second.close()
