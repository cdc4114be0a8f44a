"""Faults only a cluster of the suite's own allows (tests/faults/cluster.py): the server
stopped (immediate) and started again, the postmaster killed with SIGKILL (crash
recovery), one backend killed with SIGKILL (the server restarts itself), the whole
server frozen with SIGSTOP, each under 8 writing tasks; and close() on a frozen server.

Each asserts the failure contract (docs/concepts/guarantees.md, "Failures"): only
StorageError subclasses of ctxengine.errors escape, retryable as documented;
health_check reports "unhealthy" and never raises; the same engine works again within
a bound once the server is back; and the invariants afterwards: acknowledged writes
present (a call that lost its connection or its answer may have been applied too),
counters equal to records, no connection left checked out."""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from ctxengine import ContextEngine, EngineSettings, QuotaType
from ctxengine.errors import (
    ConnectionLostError,
    DatabaseUnavailableError,
    StorageError,
    StorageTimeoutError,
)
from tests.cluster import Cluster, running_cluster

pytestmark = pytest.mark.postgres

#: Calls succeed again within about a second of the server accepting connections;
#: the assertion allows a loaded 2-core machine this much.
RECOVERY_LIMIT = 10.0
#: What a loaded 2-core machine may add to a timeout bound.
SLACK = 4.0
WRITERS = ("requests", "usage") * 4  # 8 writing tasks

#: Stop and kill: the server refuses connections at once, so no call should need a
#: timeout; small ones turn a hang into a failure instead of a stalled suite.
DOWN_SETTINGS = EngineSettings(
    auto_cleanup=False, auto_migrate=False, connect_timeout=2.0, statement_timeout=2.0
)
CONNECT_TIMEOUT = 0.5
STATEMENT_TIMEOUT = 0.5
BOUND = CONNECT_TIMEOUT + STATEMENT_TIMEOUT
FROZEN_SETTINGS = EngineSettings(
    auto_cleanup=False,
    auto_migrate=False,
    connect_timeout=CONNECT_TIMEOUT,
    statement_timeout=STATEMENT_TIMEOUT,
    # one pooled connection per writer: an overflow connection returned to a full pool
    # is still closed with a goodbye the frozen server never answers (SQLAlchemy's
    # graceful close, up to command_timeout), and the pool logs it at ERROR
    pool_size=len(WRITERS),
)
TEMPLATE = "ctx_template"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A PostgreSQL cluster of this module's own, running; destroyed at the end."""
    with running_cluster("the fault suite's PostgreSQL cluster") as own:
        yield own


@pytest.fixture
async def cluster_url(cluster: Cluster) -> AsyncIterator[str]:
    """A fresh migrated database on the cluster (running, whatever the last test did)."""
    await asyncio.to_thread(cluster.ensure_running)
    admin = await asyncpg.connect(cluster.url(driver="postgresql"), timeout=10)
    try:
        if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", TEMPLATE):
            await admin.execute(f'CREATE DATABASE "{TEMPLATE}"')
            migrate = EngineSettings(auto_cleanup=False)
            await ContextEngine(cluster.url(TEMPLATE), settings=migrate).migrate()
        name = f"ctx_fault_{uuid.uuid4().hex[:10]}"
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}"')
    finally:
        await admin.close()
    yield cluster.url(name)


@dataclass
class Call:
    kind: str
    started: float
    ended: float
    error: Exception | None = None


class Load:
    """8 tasks writing to session "s" (update_session and track_usage) until stopped,
    every call recorded; a failed call is followed by a short pause, not a spin."""

    def __init__(self, engine: ContextEngine) -> None:
        self.engine = engine
        self.calls: list[Call] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Load:
        self._tasks = [asyncio.create_task(self._write(kind)) for kind in WRITERS]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _write(self, kind: str) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                if kind == "requests":
                    await self.engine.update_session("s", increment_requests=True)
                else:
                    await self.engine.track_usage("s", "op", QuotaType.API_CALLS)
            except Exception as exc:  # judged afterwards, all of them
                self.calls.append(Call(kind, started, time.monotonic(), exc))
                await asyncio.sleep(0.02)
            else:
                self.calls.append(Call(kind, started, time.monotonic()))

    def accepted(self, kind: str) -> int:
        return sum(1 for c in self.calls if c.kind == kind and c.error is None)

    def maybe_applied(self, kind: str) -> int:
        """Failed calls whose write may be there: the connection or the answer was lost
        while the server may have committed."""
        return sum(
            1
            for c in self.calls
            if c.kind == kind and isinstance(c.error, ConnectionLostError | StorageTimeoutError)
        )

    async def successes(self, count: int, after: float, limit: float) -> float:
        """Wait until ``count`` calls that ended after ``after`` succeeded; the seconds
        from ``after`` to the first of them. Fails past ``limit`` seconds."""
        while True:
            ok = sorted(c.ended for c in self.calls if c.error is None and c.ended > after)
            if len(ok) >= count:
                return ok[0] - after
            assert time.monotonic() - after < limit, (
                f"no success within {limit} s of the server being back: {self.summary(after)}"
            )
            await asyncio.sleep(0.01)

    async def failures(self, count: int, after: float, limit: float = 10.0) -> None:
        """Wait until ``count`` calls that started after ``after`` failed."""
        while sum(1 for c in self.calls if c.error is not None and c.started > after) < count:
            assert time.monotonic() - after < limit, f"calls did not fail: {self.summary(after)}"
            await asyncio.sleep(0.01)

    def summary(self, after: float = 0.0) -> str:
        outcomes = Counter(
            "ok"
            if c.error is None
            else f"{type(c.error).__name__}({type(c.error.cause).__name__})"
            if isinstance(c.error, StorageError)
            else repr(c.error)
            for c in self.calls
            if c.ended > after
        )
        return ", ".join(f"{k}: {n}" for k, n in outcomes.most_common())


def assert_ours(calls: list[Call], *kinds: type[StorageError]) -> Counter[str]:
    """Every failed call raised one of ``kinds`` (ctxengine's, retryable, with operation
    and cause); the count of each."""
    seen: Counter[str] = Counter()
    for call in calls:
        error = call.error
        if error is None:
            continue
        detail = "".join(traceback.format_exception(error))
        assert isinstance(error, kinds), f"{call.kind}: {error!r}\n{detail}"
        assert type(error).__module__ == "ctxengine.errors", detail
        assert error.retryable is True, detail
        assert error.cause is not None and error.__cause__ is not None, detail
        assert error.operation, detail
        seen[type(error).__name__] += 1
    return seen


async def assert_unhealthy(engine: ContextEngine, *kinds: type[StorageError]) -> dict[str, Any]:
    started = time.monotonic()
    health = await engine.health_check()  # never raises
    took = time.monotonic() - started
    assert health["status"] == "unhealthy", health
    assert health["error_type"] in {k.__name__ for k in kinds}, health
    assert health["retryable"] is True, health
    return {**health, "took": took}


async def assert_invariants(engine: ContextEngine, load: Load) -> None:
    """Acknowledged writes present (and at most the maybe-applied ones besides), the
    quota counter equal to the usage records, the engine healthy, nothing checked out."""
    await asyncio.sleep(0.1)  # the loop reads the goodbyes of connections closed last
    # the same engine, at once: concurrent calls all succeed
    await asyncio.gather(*(engine.get_session("s") for _ in range(16)))
    session = await engine.get_session("s")
    assert session is not None
    accepted, maybe = load.accepted("requests"), load.maybe_applied("requests")
    assert accepted <= session.request_count <= accepted + maybe, (accepted, maybe, session)
    used = (await engine.get_quota("s", QuotaType.API_CALLS)).used
    records = len(await engine.get_usage_history(session_id="s", limit=100_000))
    assert used == records  # the counter and the record are one transaction
    accepted, maybe = load.accepted("usage"), load.maybe_applied("usage")
    assert accepted <= records <= accepted + maybe, (accepted, maybe, records)
    assert (await engine.health_check())["status"] == "healthy"
    assert engine._store.connections_in_use() == 0


def assert_quiet(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing logged as an error: no 'Future exception was never retrieved', no
    health_check failing unexpectedly."""
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not loud, [f"{r.name}: {r.getMessage()}" for r in loud]


@pytest.mark.parametrize("fault", ["stop", "kill"])
async def test_a_server_stopped_or_killed_then_started_again(
    fault: str, cluster: Cluster, cluster_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``pg_ctl stop -m immediate``, or the postmaster SIGKILLed (its backends exit on
    their own; the next start runs crash recovery), under 8 writing tasks."""
    async with ContextEngine(cluster_url, settings=DOWN_SETTINGS) as engine:
        await engine.create_session("s", "u", tier="enterprise")
        async with Load(engine) as load:
            await load.successes(40, after=time.monotonic(), limit=RECOVERY_LIMIT)
            if fault == "stop":
                await asyncio.to_thread(cluster.stop, "immediate")
            else:
                await asyncio.to_thread(lambda: cluster.wait_gone(cluster.kill()))
            down = time.monotonic()
            await load.failures(8, after=down)
            health = await assert_unhealthy(engine, DatabaseUnavailableError, ConnectionLostError)
            assert health["took"] < 2.0, health
            await asyncio.sleep(0.3)

            restarting = time.monotonic()
            await asyncio.to_thread(cluster.start)
            ready = time.monotonic()
            recovery = await load.successes(40, after=ready, limit=RECOVERY_LIMIT)
            await asyncio.sleep(0.5)
        print(
            f"\n{fault}: server back {ready - restarting:.2f} s after the start, calls "
            f"succeed {recovery:.3f} s after that; outcomes: {load.summary()}"
        )

        # while it was down, every call failed, each with one of ours
        down_calls = [c for c in load.calls if c.started > down and c.ended < restarting]
        assert down_calls and all(c.error is not None for c in down_calls), load.summary(down)
        assert_ours(load.calls, DatabaseUnavailableError, ConnectionLostError)
        assert recovery < RECOVERY_LIMIT
        await assert_invariants(engine, load)
    assert_quiet(caplog)


async def test_a_backend_killed_makes_the_server_restart_itself(
    cluster: Cluster, cluster_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """One of the engine's backends SIGKILLed under 8 writing tasks: the postmaster ends
    every other backend and runs crash recovery by itself; the engine follows."""
    async with ContextEngine(cluster_url, settings=DOWN_SETTINGS) as engine:
        await engine.create_session("s", "u", tier="enterprise")
        async with Load(engine) as load:
            await load.successes(40, after=time.monotonic(), limit=RECOVERY_LIMIT)
            killed = time.monotonic()
            await asyncio.to_thread(cluster.kill_backend, cluster_url.rsplit("/", 1)[1])
            # the restart is quick: how many calls fail depends on the machine's pace
            await load.failures(1, after=killed)
            failing = time.monotonic()
            # the server is back by itself; the engine's calls with it
            recovery = await load.successes(40, after=failing, limit=RECOVERY_LIMIT)
            await asyncio.sleep(0.5)
        print(
            f"\nbackend killed: calls failed within {failing - killed:.3f} s, then calls "
            f"succeed within {recovery:.3f} s; "
            f"outcomes: {load.summary()}"
        )
        assert_ours(load.calls, DatabaseUnavailableError, ConnectionLostError)
        await assert_invariants(engine, load)
    assert "terminating any other active server processes" in cluster.log_tail(200)
    assert_quiet(caplog)


async def test_a_frozen_server_times_out_then_recovers(
    cluster: Cluster, cluster_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The postmaster and every backend SIGSTOPped for longer than connect_timeout +
    statement_timeout, then SIGCONT: calls end with StorageTimeoutError within that
    bound, then succeed again."""
    async with ContextEngine(cluster_url, settings=FROZEN_SETTINGS) as engine:
        await engine.create_session("s", "u", tier="enterprise")
        async with Load(engine) as load:
            await load.successes(40, after=time.monotonic(), limit=RECOVERY_LIMIT)
            frozen = cluster.freeze()
            try:
                freeze = time.monotonic()
                await load.failures(8, after=freeze, limit=BOUND + SLACK)
                health = await assert_unhealthy(engine, StorageTimeoutError)
                assert health["took"] < BOUND + SLACK, health
                await asyncio.sleep(max(0.0, freeze + 2.5 * BOUND - time.monotonic()))
            finally:
                thaw = time.monotonic()
                cluster.thaw(frozen)
            recovery = await load.successes(40, after=thaw, limit=RECOVERY_LIMIT)
            await asyncio.sleep(0.5)
        print(
            f"\nfrozen {thaw - freeze:.2f} s; calls succeed {recovery:.3f} s after the thaw; "
            f"outcomes: {load.summary()}"
        )

        # during the freeze every call failed, none took longer than the bound
        frozen_calls = [c for c in load.calls if c.started > freeze and c.ended < thaw]
        assert frozen_calls and all(c.error is not None for c in frozen_calls), load.summary(freeze)
        slowest = max(c.ended - c.started for c in load.calls)
        assert slowest < BOUND + SLACK, f"a call took {slowest:.2f} s"
        assert_ours(load.calls, StorageTimeoutError)
        assert recovery < RECOVERY_LIMIT
        await assert_invariants(engine, load)
    assert_quiet(caplog)


@pytest.mark.parametrize(
    "statement_timeout", [STATEMENT_TIMEOUT, None], ids=["statement_timeout", "none"]
)
async def test_close_on_a_frozen_server_is_bounded_and_quiet(
    statement_timeout: float | None,
    cluster: Cluster,
    cluster_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """close() is bounded and never raises for a database failure, and prints nothing:
    the server frozen with 5 connections in the pool."""
    settings = FROZEN_SETTINGS.model_copy(
        update={"statement_timeout": statement_timeout, "pool_size": 5}
    )
    engine = ContextEngine(cluster_url, settings=settings)
    await engine.initialize()
    await engine.create_session("s", "u")
    await asyncio.gather(*(engine.update_session("s", increment_requests=True) for _ in range(8)))
    frozen = cluster.freeze()
    try:
        started = time.monotonic()
        closing = asyncio.create_task(engine.close())
        await asyncio.wait({closing}, timeout=BOUND + SLACK)
        took = time.monotonic() - started
    finally:
        cluster.thaw(frozen)
    await closing  # the server answers again: it ends (never raises)
    print(f"\nclose() on a frozen server: {took:.2f} s, done: {closing.done()}")
    assert took < BOUND + SLACK, f"close() did not return within {BOUND + SLACK} s"
    assert_quiet(caplog)
