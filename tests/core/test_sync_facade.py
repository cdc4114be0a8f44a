"""The blocking facade itself (ctxengine.sync): many threads, the loop thread's life,
iterators, ``with`` blocks, handlers, interruption, an unclosed engine at exit.

Its whole API also runs under the behavioural tests of sessions, usage and conversation
(tests/blocking.py); these are the tests of what only the facade has. The test bodies
are plain functions: nothing runs on an event loop of theirs, as in a Flask app.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import ctxengine
from ctxengine import EngineSettings, Event, SessionStatus
from ctxengine.errors import (
    ConcurrencyLimitError,
    EngineClosedError,
    SessionExpiredError,
    SessionNotFoundError,
    StorageError,
    ValidationError,
)
from ctxengine.sync import ContextEngine
from tests.fixtures import FakeClock

QUIET = EngineSettings(auto_cleanup=False)


def loop_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ctxengine-loop"]


@pytest.fixture
def blocking(db_url: str) -> Iterator[ContextEngine]:
    with ContextEngine(db_url, settings=QUIET) as engine:
        yield engine


def stored(db_url: str, session_id: str) -> ctxengine.Session | None:
    """The session as another engine reads it from the database."""

    async def read() -> ctxengine.Session | None:
        async with ctxengine.ContextEngine(db_url, settings=QUIET) as engine:
            return await engine.get_session(session_id)

    return asyncio.run(read())


def test_sixteen_threads_update_one_session_exactly(db_url: str) -> None:
    """16 threads x 200 update_session on one session: exactly 3,200 requests stored."""
    with ContextEngine(db_url, settings=QUIET) as engine:
        engine.create_session("hot", "u")
        start = threading.Barrier(16)
        failures: list[BaseException] = []

        def worker() -> None:
            start.wait()
            try:
                for _ in range(200):
                    engine.update_session("hot", increment_requests=True, add_processing_time=0.5)
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
        assert len(loop_threads()) == 1  # one loop served every thread
    session = stored(db_url, "hot")
    assert session is not None
    assert (session.request_count, session.total_processing_time) == (3200, 1600.0)


def test_with_and_close_stop_the_loop_thread(db_url: str) -> None:
    before = len(loop_threads())
    engine = ContextEngine(db_url, settings=QUIET)
    with pytest.raises(EngineClosedError, match=r"call engine\.initialize\(\) or use `with`"):
        engine.get_session("s")
    assert not engine.is_open and len(loop_threads()) == before  # nothing started yet
    with engine:
        assert engine.is_open and len(loop_threads()) == before + 1
        engine.create_session("s", "u")
        acme = engine.tenant("acme")
        acme.create_session("a", "u")
        engine.initialize()  # open already: nothing
    assert not engine.is_open and len(loop_threads()) == before
    engine.close()  # twice is fine
    for call in (
        lambda: engine.get_session("s"),
        lambda: acme.count_sessions(),
        lambda: engine.update_session("s", increment_requests=True),
        lambda: engine.track_request("s"),
        lambda: engine.events(),
        lambda: list(engine.iter_sessions()),
        lambda: engine.initialize(),
        lambda: engine.migrate(),
    ):
        with pytest.raises(EngineClosedError) as info:
            call()
        assert info.value.state == "closed"
    never_opened = ContextEngine(db_url, settings=QUIET)
    never_opened.close()
    with pytest.raises(EngineClosedError):
        never_opened.initialize()


def test_initialize_from_many_threads_starts_one_loop(db_url: str) -> None:
    before = len(loop_threads())
    engine = ContextEngine(db_url, settings=QUIET)
    threads = [threading.Thread(target=engine.initialize) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert len(loop_threads()) == before + 1
        assert engine.create_session("s", "u").status is SessionStatus.ACTIVE
    finally:
        engine.close()


def test_errors_are_the_engines_and_a_failed_start_can_be_retried(
    blocking: ContextEngine, tmp_path: Path
) -> None:
    with pytest.raises(SessionNotFoundError) as info:
        blocking.update_session("nope", increment_requests=True)
    assert info.value.session_id == "nope"
    with pytest.raises(ValidationError):
        blocking.create_session("", "u")
    before = len(loop_threads())
    missing = ContextEngine(f"sqlite:///{tmp_path / 'no' / 'such' / 'folder.db'}", settings=QUIET)
    with pytest.raises(StorageError):
        missing.initialize()
    assert not missing.is_open and len(loop_threads()) == before  # its loop stopped
    (tmp_path / "no" / "such").mkdir(parents=True)
    with missing:
        assert missing.create_session("s", "u").session_id == "s"


def test_track_request_and_concurrency_slot_are_with_blocks(blocking: ContextEngine) -> None:
    blocking.create_session("s", "u", tier="enterprise")
    blocking.set_quota("s", "concurrent_requests", 1)
    with blocking.track_request("s") as request:
        assert request.elapsed >= 0
    with pytest.raises(KeyError), blocking.track_request("s"):
        raise KeyError("the block's own error propagates")
    session = blocking.get_session("s")
    assert session is not None and (session.request_count, session.error_count) == (2, 1)
    with blocking.concurrency_slot("s", "tool") as lease:
        assert isinstance(lease, str)
        assert blocking.get_session("s").concurrent_operations == 1  # type: ignore[union-attr]
        with pytest.raises(ConcurrencyLimitError), blocking.concurrency_slot("s"):
            pass
    assert blocking.get_session("s").concurrent_operations == 0  # type: ignore[union-attr]
    slot = blocking.concurrency_slot("s")
    with slot, pytest.raises(RuntimeError, match="already in use"), slot:
        pass


def test_iter_sessions_pages_and_stops_early(blocking: ContextEngine) -> None:
    for i in range(7):
        blocking.create_session(f"s{i}", "u")
    assert [s.session_id for s in blocking.iter_sessions(limit=2)] == [
        f"s{i}" for i in reversed(range(7))
    ]
    pages = blocking.iter_sessions(limit=2)
    assert next(pages).session_id == "s6"
    pages.close()  # stopped early: its async iterator is closed on the loop
    assert blocking._portal.run(lambda: blocking._engine._store.connections_in_use()) == 0
    lazy = blocking.iter_sessions(status="sleeping")  # validated when iterated, as async
    with pytest.raises(ValidationError):
        next(lazy)


def test_events_iterate_and_close_from_another_thread(blocking: ContextEngine) -> None:
    with blocking.events("session.created") as stream:
        blocking.create_session("a", "u")
        blocking.create_session("b", "u")
        assert [next(stream).session_id, next(stream).session_id] == ["a", "b"]
        assert stream.dropped == 0

    waiting = blocking.events()
    received: list[Event] = []
    reader = threading.Thread(target=lambda: received.extend(waiting))
    reader.start()
    blocking.create_session("c", "u")
    time.sleep(0.2)
    waiting.close()  # from this thread: the reader's iteration ends
    reader.join(5)
    assert not reader.is_alive()
    assert [e.type for e in received] == ["session.created"]
    assert list(waiting) == []  # closed: nothing more

    until_closed = blocking.events()
    ended = threading.Thread(target=lambda: list(until_closed))
    ended.start()
    blocking.close()  # the engine's close ends every stream
    ended.join(5)
    assert not ended.is_alive()


def test_handlers_run_on_the_loop_thread_before_the_call_returns(
    blocking: ContextEngine, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[tuple[str, str]] = []
    refused: list[BaseException] = []

    def handler(event: Event) -> None:
        seen.append((event.type, threading.current_thread().name))
        try:
            blocking.get_session(event.session_id or "")  # would wait for itself
        except RuntimeError as exc:
            refused.append(exc)

    stop = blocking.subscribe(handler, "session.created")
    usage: list[Any] = []
    stop_usage = blocking.add_usage_callback(usage.append)
    blocking.create_session("s", "u")
    assert seen == [("session.created", "ctxengine-loop")]  # ran before the call returned
    assert "own event loop thread" in str(refused[0])
    blocking.track_usage("s", "llm", "tokens", 5)
    assert [record.amount for record in usage] == [5]
    stop()
    stop_usage()
    blocking.create_session("t", "u")
    blocking.track_usage("s", "llm", "tokens", 5)
    assert len(seen) == 1 and len(usage) == 1


def test_the_injected_clock_decides_through_the_facade(db_url: str, clock: FakeClock) -> None:
    settings = EngineSettings(auto_cleanup=False, session_timeout=60)
    with ContextEngine(db_url, settings=settings, clock=clock) as engine:
        created = engine.create_session("s", "u")
        assert created.created_at == clock.now
        clock.advance(61)
        with pytest.raises(SessionExpiredError):
            engine.update_session("s", increment_requests=True)
        read = engine.get_session("s")
        assert read is not None and read.status is SessionStatus.EXPIRED
        assert read.ended_at == clock.now


def test_migrate_works_before_initialize(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    no_migration = EngineSettings(auto_cleanup=False, auto_migrate=False)
    engine = ContextEngine(url, settings=no_migration)
    before = len(loop_threads())
    engine.migrate()  # on a loop of its own, stopped afterwards
    assert len(loop_threads()) == before and not engine.is_open
    with engine:
        assert engine.health_check()["schema_revision"]
        engine.create_session("s", "u")
        engine.migrate()  # open: on the engine's loop


def test_an_interrupted_call_hands_control_back_and_writes_nothing(pg_url: str) -> None:
    """Ctrl-C (here SIGALRM raising KeyboardInterrupt) while a call waits for a row lock:
    control comes back at once, the call is cancelled on the loop, nothing is written,
    and the engine goes on serving calls."""

    async def hold_row_lock(locked: threading.Event, release: threading.Event) -> None:
        conn = await asyncpg.connect(pg_url.replace("+asyncpg", ""))
        try:
            async with conn.transaction():
                await conn.execute("SELECT 1 FROM ctx_sessions WHERE session_id = 's' FOR UPDATE")
                locked.set()
                await asyncio.to_thread(release.wait, 30)
                # the row is let go only once the cancelled UPDATE stopped waiting for it
                for _ in range(500):
                    waiting = await conn.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND wait_event_type = 'Lock'"
                    )
                    if not waiting:
                        break
                    await asyncio.sleep(0.01)
        finally:
            await conn.close()

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    with ContextEngine(pg_url, settings=QUIET) as engine:
        engine.create_session("s", "u")
        locked, release = threading.Event(), threading.Event()
        holder = threading.Thread(target=asyncio.run, args=(hold_row_lock(locked, release),))
        holder.start()
        assert locked.wait(10)
        previous = signal.signal(signal.SIGALRM, interrupt)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            started = time.monotonic()
            with pytest.raises(KeyboardInterrupt):
                engine.update_session("s", increment_requests=True)
            assert time.monotonic() - started < 2
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            release.set()
            holder.join(10)
        assert engine.get_session("s").request_count == 0  # type: ignore[union-attr]
        assert engine.update_session("s", increment_requests=True).request_count == 1


UNCLOSED = """\
import os, sys, threading
from ctxengine.sync import ContextEngine

engine = ContextEngine(os.environ["URL"])
engine.initialize()
engine.get_or_create_session("s", "u")
slot = engine.concurrency_slot("s")
slot.__enter__()  # a lease held, never given back
stream = engine.events()
threading.Thread(target=lambda: list(stream), daemon=True).start()  # waits for events
print("leaving without close()", flush=True)
"""


def test_an_unclosed_engine_does_not_hang_exit(db_url: str) -> None:
    """A script that opens a facade, holds a lease and a waiting event iterator, and
    exits without close() ends at once with code 0; the engine was closed on the way
    out (its lease released)."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(UNCLOSED)],
        env={**os.environ, "URL": db_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert "leaving without close()" in done.stdout and "Traceback" not in done.stderr
    assert took < 30
    session = stored(db_url, "s")
    assert session is not None and session.concurrent_operations == 0


def test_a_collected_engine_stops_its_loop(db_url: str) -> None:
    import gc

    before = len(loop_threads())
    engine = ContextEngine(db_url, settings=QUIET)
    engine.initialize()
    engine.create_session("s", "u")
    assert len(loop_threads()) == before + 1
    del engine
    gc.collect()
    for _ in range(100):
        if len(loop_threads()) == before:
            break
        time.sleep(0.05)
    assert len(loop_threads()) == before


FORKED = """\
import os, sys
from ctxengine.errors import EngineClosedError
from ctxengine.sync import ContextEngine

engine = ContextEngine(os.environ["URL"])
engine.initialize()
engine.get_or_create_session("s", "u")
pid = os.fork()
if pid == 0:  # the child: the parent's engine refuses, a new one works
    try:
        engine.get_session("s")
    except EngineClosedError as exc:
        print("child refused:", exc, flush=True)
    with ContextEngine(os.environ["URL"]) as own:
        print("child's own engine:", own.get_session("s").session_id, flush=True)
    os._exit(0)
os.waitpid(pid, 0)
print("parent still served:", engine.get_session("s").session_id, flush=True)
engine.close()
"""


def test_an_engine_opened_before_a_fork_refuses_in_the_child(db_url: str) -> None:
    """gunicorn --preload, Celery's prefork pool: the child gets the parent's engine
    without its loop thread; its calls raise at once (no hang), and an engine opened in
    the child works."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(FORKED)],
        env={**os.environ, "URL": db_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    refused = "child refused: the ContextEngine was opened before this process forked"
    assert refused in done.stdout
    assert "child's own engine: s" in done.stdout
    assert "parent still served: s" in done.stdout
