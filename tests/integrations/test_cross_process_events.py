"""cross_process_events: engines on one PostgreSQL database hear each other's events."""

from __future__ import annotations

import asyncio
import multiprocessing
from pathlib import Path

import asyncpg
import pytest

from ctxengine import ContextEngine, EngineSettings, Event
from ctxengine.errors import ValidationError
from ctxengine.storage.relay import MAX_PAYLOAD_BYTES, EventRelay

from . import _workers

RELAYED = EngineSettings(auto_cleanup=False, cross_process_events=True)


async def wait_for_session(engine: ContextEngine, session_id: str, seconds: float = 60) -> None:
    for _ in range(int(seconds / 0.05)):
        if await engine.get_session(session_id) is not None:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{session_id} never appeared")


async def test_two_processes_hear_each_others_events_once(pg_url: str) -> None:
    heard_here: list[Event] = []
    async with ContextEngine(pg_url, settings=RELAYED) as engine:
        engine.subscribe(heard_here.append)
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            pending = pool.apply_async(_workers.listen, (pg_url, "ready", 60))
            await wait_for_session(engine, "ready")
            await engine.create_session("s1", "u")
            await engine.add_message("s1", "user", "hello")
            await engine.tenant("acme").create_session("t1", "u")
            await engine.create_session("stop", "u")
            await engine.end_session("stop")
            heard_there = await asyncio.to_thread(pending.get, 60)
    assert heard_there == [
        ("session.created", "ready", "default"),  # its own, heard locally
        ("session.created", "s1", "default"),
        ("message.added", "s1", "default"),
        ("session.created", "t1", "acme"),
        ("session.created", "stop", "default"),
        ("session.ended", "stop", "default"),
    ]
    # here: our own events once each (not again through the database), and the child's
    mine = [(e.type, e.session_id) for e in heard_here]
    assert mine.count(("session.created", "s1")) == 1
    assert ("session.created", "ready") in mine


async def test_the_listener_reconnects_after_its_connection_is_killed(
    pg_url: str, pg_admin: asyncpg.Connection
) -> None:
    database = pg_url.rsplit("/", 1)[1]
    async with (
        ContextEngine(pg_url, settings=RELAYED) as sender,
        ContextEngine(pg_url, settings=RELAYED) as receiver,
    ):
        heard: list[str | None] = []
        receiver.subscribe(lambda e: heard.append(e.session_id), "session.created")
        relay = receiver._runtime().ctx.relay
        assert relay is not None
        before = relay.connections
        killed = await pg_admin.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = $1 AND application_name = 'ctxengine-events'",
            database,
        )
        assert len(killed) == 2
        # events sent while the listener is down are not delivered (at most once), so
        # wait until it has noticed the loss and listens again on a new connection
        for _ in range(400):
            if relay.connections > before and relay.connected:
                break
            await asyncio.sleep(0.05)
        assert relay.connections == before + 1
        await sender.create_session("after", "u")
        for _ in range(100):
            if "after" in heard:
                break
            await asyncio.sleep(0.05)
        assert heard == ["after"]


def test_oversize_events_travel_without_their_data() -> None:
    from sqlalchemy.engine import make_url

    relay = EventRelay(make_url("postgresql+asyncpg://x@localhost/db"), lambda e: None)
    from datetime import UTC, datetime

    big = Event(type="message.added", session_id="s", at=datetime.now(UTC), data={"x": "y" * 9000})
    payload = relay.encode(big)
    assert len(payload.encode()) <= MAX_PAYLOAD_BYTES
    assert '"truncated":true' in payload and '"session_id":"s"' in payload
    small = Event(type="session.created", session_id="s", at=datetime.now(UTC), data={"a": 1})
    assert '"a":1' in relay.encode(small)


async def test_sqlite_refuses_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="cross_process_events needs PostgreSQL"):
        async with ContextEngine(f"sqlite:///{tmp_path / 'x.db'}", settings=RELAYED):
            pass
