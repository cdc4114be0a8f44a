"""Cancelling a call hands control back to the event loop at once, whatever the
database is doing, and leaves no partial write and no connection checked out."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from ctxengine import ContextEngine, EngineSettings, QuotaType
from tests.faults.test_sqlite import release, sqlite_path, write_lock  # noqa: F401
from tests.fixtures import connections_returned

from .proxy import Proxy, through
from .test_postgres import as_admin

#: Long enough that a loop blocked for the busy wait could not go unnoticed.
BUSY_TIMEOUT = 5.0


async def test_cancelling_a_write_waiting_for_another_process_lock_frees_the_loop(
    sqlite_path: Path,  # noqa: F811
    write_lock: subprocess.Popen[str],  # noqa: F811
) -> None:
    """A write waiting (in a worker thread) for the write lock another process holds is
    cancelled: the loop goes on at once (a ticker keeps ticking; before, the loop
    stopped for the whole busy timeout), the cancelled write is never applied, and its
    connection is back in the pool once the wait ends."""
    settings = EngineSettings(
        auto_cleanup=False, auto_migrate=False, sqlite_busy_timeout=BUSY_TIMEOUT
    )
    async with ContextEngine(f"sqlite:///{sqlite_path}", settings=settings) as engine:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticking = asyncio.ensure_future(ticker())
        started = time.monotonic()
        for _ in range(8):  # several waiting writers, each cancelled
            try:
                await asyncio.wait_for(engine.update_session("a", increment_requests=True), 0.1)
            except TimeoutError:
                pass
            else:
                raise AssertionError("the write lock is held: the update cannot finish")
        waited = time.monotonic() - started
        assert waited < BUSY_TIMEOUT  # far below 8 busy timeouts: the loop was free
        assert ticks > 8 * 0.1 / 0.01 / 4  # and it ran other tasks meanwhile
        ticking.cancel()

        release(write_lock)
        assert await connections_returned(engine) == 0
        session = await engine.get_session("a")
        assert session is not None and session.request_count == 0  # none applied
        assert (await engine.update_session("a", increment_requests=True)).request_count == 1


async def test_close_under_load_lets_calls_finish_or_refuse_them(db_url: str) -> None:
    """8 tasks update one session while the engine closes: each call either finished
    (and is counted) or raised EngineClosedError; nothing else escapes."""
    from ctxengine.errors import EngineClosedError

    engine = ContextEngine(db_url, settings=EngineSettings(auto_cleanup=False))
    await engine.initialize()
    await engine.create_session("s", "u", idle_timeout=None)
    done = 0

    async def writer() -> None:
        nonlocal done
        while True:
            await engine.update_session("s", increment_requests=True)
            done += 1

    tasks = [asyncio.ensure_future(writer()) for _ in range(8)]
    await asyncio.sleep(0.3)
    await engine.close()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    others = [repr(o) for o in outcomes if not isinstance(o, EngineClosedError)]
    assert not others, others
    async with ContextEngine(db_url, settings=EngineSettings(auto_cleanup=False)) as again:
        session = await again.get_session("s")
        assert session is not None
        # a mismatch: some call's write committed, yet it raised (or the reverse): the
        # errors behind the EngineClosedErrors say how
        causes = [repr(o.__cause__) for o in outcomes if isinstance(o, BaseException)]
        assert session.request_count == done > 0, causes


async def test_thousands_of_cancellations_on_postgres_print_nothing(
    pg_url: str, caplog: Any
) -> None:
    """1,600 calls cancelled at random points (while connecting, waiting for the pool,
    running a statement, returning a connection): nothing is logged or printed (no
    'Future exception was never retrieved', no 'Exception closing connection'), no
    connection stays checked out, and the engine goes on working."""
    import gc
    import logging
    import random

    caplog.set_level(logging.WARNING)
    random.seed(7)
    async with ContextEngine(pg_url, settings=EngineSettings(auto_cleanup=False)) as engine:
        await engine.create_session("s", "u", idle_timeout=None)
        finished = 0

        async def one() -> None:
            nonlocal finished
            call = engine.update_session("s", increment_requests=True)
            try:
                await asyncio.wait_for(call, random.uniform(0.0001, 0.004))
                finished += 1
            except TimeoutError:
                pass

        for _ in range(200):
            await asyncio.gather(*(one() for _ in range(8)))
        assert await connections_returned(engine) == 0
        session = await engine.update_session("s", increment_requests=True)
        assert session.request_count >= finished + 1  # cancelled ones may have committed
    gc.collect()  # futures whose error nobody retrieved are reported when collected
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


#: A cancelled call hands control back within this (measured: far less; see the
#: printed p50/max). Generous for a loaded 2-core machine, yet far below what a call
#: waiting on the database to unwind (a frozen server: the whole timeout) would take.
CANCEL_LIMIT = 0.5


class LoopWatch:
    """A ticker task: the loop's longest stall while it runs (the longest gap between
    two ticks, beyond the tick period), and the longest garbage collection meanwhile.

    The objects alive when it starts (pytest's, mostly) are moved out of the
    collector's reach (``gc.freeze``) until it ends: a full collection of them takes
    50-100 ms on a 2-core machine, a pause of the test process, not of the engine."""

    def __init__(self, period: float = 0.005) -> None:
        self.period = period
        self.longest = 0.0
        self.longest_gc = 0.0
        self._gc_started = 0.0
        self._task: asyncio.Task[None] | None = None

    def __str__(self) -> str:
        return (
            f"the loop's longest stall {self.longest * 1000:.1f} ms "
            f"(longest garbage collection {self.longest_gc * 1000:.1f} ms)"
        )

    async def _tick(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(self.period)
            now = time.perf_counter()
            self.longest = max(self.longest, now - last - self.period)
            last = now

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.longest_gc = max(self.longest_gc, time.perf_counter() - self._gc_started)

    async def __aenter__(self) -> LoopWatch:
        gc.collect()
        gc.freeze()
        gc.callbacks.append(self._on_gc)
        self._task = asyncio.ensure_future(self._tick())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        gc.callbacks.remove(self._on_gc)
        gc.unfreeze()


async def cancel_each(
    calls: Sequence[Callable[[], Awaitable[object]]], rounds: int, rng: random.Random
) -> list[float]:
    """Start ``calls`` at once, ``rounds`` times, and cancel each one still running
    after 1 to 20 ms; the seconds each cancellation took to hand control back (from
    ``cancel()`` until the call's task is done). A cancelled call raises
    CancelledError, nothing else."""
    took: list[float] = []

    async def one(call: Callable[[], Awaitable[object]]) -> None:
        task = asyncio.ensure_future(call())
        await asyncio.sleep(rng.uniform(0.001, 0.02))
        if not task.done():
            started = time.perf_counter()
            task.cancel()
            await asyncio.wait({task})
            took.append(time.perf_counter() - started)
        if not task.cancelled():
            assert task.exception() is None, repr(task.exception())

    for _ in range(rounds):
        await asyncio.gather(*(one(call) for call in calls))
    return took


def spread(took: list[float]) -> str:
    ordered = sorted(took)
    p50 = ordered[len(ordered) // 2]
    return f"{len(ordered)} cancelled, p50 {p50 * 1000:.1f} ms, max {ordered[-1] * 1000:.1f} ms"


async def server_quiet(pg_url: str, limit: float = 10.0) -> None:
    """Wait until no statement runs on the database of ``pg_url`` but this one (twice
    in a row, 50 ms apart)."""
    admin = await asyncpg.connect(as_admin(pg_url))
    try:
        quiet = 0
        stop = time.monotonic() + limit
        while quiet < 2:
            assert time.monotonic() < stop, "statements still run on the server"
            busy = await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND state <> 'idle'"
            )
            quiet = quiet + 1 if busy == 0 else 0
            await asyncio.sleep(0.05)
    finally:
        await admin.close()


@pytest.mark.parametrize("fault", ["row lock", "frozen", "frozen connecting"])
async def test_a_cancelled_call_hands_control_back_at_once_on_postgres(
    fault: str, pg_url: str, proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    """Calls that wait on the database — a row lock another connection holds, a server
    that stopped answering the engine's connections, or one that never answers new
    ones — are cancelled, 8 at a time, 25 times: each cancellation hands control back
    within CANCEL_LIMIT (the measured p50 and max are printed), the loop never stalls
    that long, nothing is logged, no connection stays checked out, nothing is
    half-applied (the quota counter equals the usage records), and the engine works
    once the fault is gone."""
    caplog.set_level(logging.WARNING)
    rng = random.Random(17)
    # statement_timeout far beyond the test: only the cancellations end the calls
    settings = EngineSettings(
        auto_cleanup=False, auto_migrate=False, connect_timeout=30, statement_timeout=30
    )
    async with ContextEngine(through(pg_url, proxy), settings=settings) as engine:
        await engine.create_session("s", "u", tier="enterprise", idle_timeout=None)
        await asyncio.gather(*(engine.get_session("s") for _ in range(8)))  # 8 connections
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: engine.update_session("s", increment_requests=True),  # one statement
            lambda: engine.track_usage("s", "op", QuotaType.API_CALLS),  # a transaction
            lambda: engine.add_message("s", "user", "hello"),
            lambda: engine.create_session(f"new-{rng.random()}", "u"),
        ] * 2
        locker = await asyncpg.connect(as_admin(pg_url))
        try:
            if fault == "row lock":
                await locker.execute("BEGIN")
                await locker.execute(
                    "SELECT 1 FROM ctx_sessions WHERE session_id = 's' FOR UPDATE;"
                    "SELECT 1 FROM ctx_quotas WHERE session_id = 's' FOR UPDATE;"
                    "SELECT 1 FROM ctx_chats WHERE session_id = 's' FOR UPDATE"
                )
            elif fault == "frozen":
                proxy.pause()  # the engine's connections stay open; nothing comes back
            else:
                proxy.pause()
                proxy.drop()  # its connections break; new ones are never answered
                await asyncio.sleep(0.1)
            async with LoopWatch() as loop:
                took = await cancel_each(calls, 25, rng)
        finally:
            proxy.resume()
            await locker.close()
        print(f"\n{fault}: {spread(took)}; {loop}")
        assert len(took) > 100  # the calls were waiting, and were cancelled
        assert max(took) < CANCEL_LIMIT, spread(took)
        assert loop.longest < CANCEL_LIMIT

        assert await connections_returned(engine) == 0
        # A one-statement write the server received may still run after its call was
        # cancelled (it waited on the lock, or in the proxy): it may be applied.
        await server_quiet(pg_url)
        used = (await engine.get_quota("s", QuotaType.API_CALLS)).used
        assert used == len(await engine.get_usage_history(session_id="s", limit=100_000))
        messages = await engine.get_messages("s", limit=100_000)
        assert [m.seq for m in messages] == list(range(1, len(messages) + 1))  # gapless
        before = await engine.get_session("s")
        session = await engine.update_session("s", increment_requests=True)
        assert before is not None and session.request_count == before.request_count + 1
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_a_cancelled_call_hands_control_back_at_once_on_sqlite(
    sqlite_path: Path,  # noqa: F811
    write_lock: subprocess.Popen[str],  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Writes waiting for the write lock another process holds are cancelled, 8 at a
    time, 5 times: each cancellation hands control back within CANCEL_LIMIT (the
    measured p50 and max are printed), the loop never stalls that long, and none of
    the cancelled writes is applied once the lock is free."""
    caplog.set_level(logging.WARNING)
    settings = EngineSettings(
        auto_cleanup=False, auto_migrate=False, sqlite_busy_timeout=BUSY_TIMEOUT
    )
    async with ContextEngine(f"sqlite:///{sqlite_path}", settings=settings) as engine:
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: engine.update_session("a", increment_requests=True),
            lambda: engine.track_usage("a", "op", QuotaType.API_CALLS),
            lambda: engine.add_message("a", "user", "hello"),
            lambda: engine.create_session("new", "u"),
        ] * 2
        async with LoopWatch() as loop:
            took = await cancel_each(calls, 5, random.Random(17))
        print(f"\nsqlite lock: {spread(took)}; {loop}")
        assert len(took) == 40  # every call was waiting, and was cancelled
        assert max(took) < CANCEL_LIMIT, spread(took)
        assert loop.longest < CANCEL_LIMIT

        release(write_lock)
        assert await connections_returned(engine) == 0
        session = await engine.get_session("a")
        assert session is not None and session.request_count == 0  # none applied
        assert await engine.get_usage_history(session_id="a") == []
        assert await engine.get_messages("a") == []
        assert await engine.get_session("new") is None
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_a_call_cancelled_while_its_transaction_begins_leaves_the_engine_working(
    pg_url: str, proxy: Proxy
) -> None:
    """Cancelled while the server has not yet answered its BEGIN, a unit's connection
    is discarded: asyncpg keeps a transaction whose start was interrupted as the
    connection's own, and would open every later one as a savepoint of it (each
    failing). Found by the chaos run: the engine's calls failed from then on."""
    settings = EngineSettings(
        auto_cleanup=False, auto_migrate=False, connect_timeout=5, statement_timeout=5
    )
    async with ContextEngine(through(pg_url, proxy), settings=settings) as engine:
        await engine.create_session("s", "u", idle_timeout=None)
        for limit in range(100, 105):
            proxy.pause()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):  # set_quota begins a transaction first
                    await engine.set_quota("s", QuotaType.TOKENS, limit * 10)
            proxy.resume()
            await engine.set_quota("s", QuotaType.TOKENS, limit)  # the same engine
            assert (await engine.get_quota("s", QuotaType.TOKENS)).limit == limit
        assert await connections_returned(engine) == 0
