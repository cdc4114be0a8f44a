"""Throughput under concurrency: many tasks writing through one engine.

    python -m benchmarks.throughput --backend all --tasks 1,16,64 --json out.json

For each backend (a temporary SQLite file; a PostgreSQL database created on
``CTXENGINE_BENCH_PG_URL`` and dropped afterwards), each write path and each task count
``N``, three sides run in interleaved blocks (which goes first alternating by round),
for ``--seconds`` each in all:

- ctxengine: ``N`` tasks calling the operation on one engine whose pool has exactly
  ``N`` connections (``pool_size=N``, ``max_overflow=0``);
- raw: ``N`` tasks of the raw driver (asyncpg; the stdlib sqlite3, inline on the event
  loop as the engine runs SQLite), each on a connection it holds, each call the
  equivalent one statement in its own transaction: the UPDATE of the counters, or the
  INSERT of the row (a usage row, a message row), into tables made as the engine's;
- floor (``N`` > 1): the batched statement the raw driver would run for ``N``
  concurrent callers (one ``UPDATE … FROM (VALUES …)`` of ``N`` sessions, one
  ``UPDATE`` adding ``N`` to one session, one ``N``-row ``INSERT``), run back to back,
  bare, by one task on one held connection; and the ``N`` callers split over four such
  flushers (batches of ``N / 4``, four connections, whose commits the server can
  flush to disk together). Its ops/s counts the callers a statement serves; the
  table shows the better split (``batch x flushers``), the JSON both: what group
  commit could reach with at most ``N`` callers waiting.

Every side opens its connections before its block and closes them after it (the
engine is opened and closed around each of its blocks; a warm-up of a few calls per
task precedes the clock), so that at 64 tasks the two sides never hold 128
connections of a server at once. Each task yields to the event loop between calls.

After each cell the database is checked: every session's ``request_count`` equals the
calls made to it, usage rows and quota counters equal the calls, each chat holds
exactly the messages added, with gap-free seqs, each task's messages in the order it
sent them; the raw and floor tables likewise. A broken invariant, or an error raised
by ctxengine or the raw driver, makes the run exit with status 1.

Peers, in the same run where installed (each skipped with its reason otherwise):
AIECS 2.2 on Redis (``update_session``, ``add_conversation_message``; in a subprocess
with its own Python, ``--aiecs-python``, because AIECS pins older libraries; on a
``redis-server`` the harness starts on a free port unless ``--redis-url`` is given),
with its lost increments and lost messages; the OpenAI Agents SDK's ``SQLiteSession``
(SQLite) and ``SQLAlchemySession`` (PostgreSQL) ``add_items``; Google ADK's
``DatabaseSessionService.append_event``; each with ``N`` tasks and an engine of ``N``
connections where it takes one, its stored rows counted against its successful calls.
Timings are never asserted by the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import asyncpg

from benchmarks.placement import database_apart, server_cpu
from ctxengine import ContextEngine, EngineSettings, QuotaType

PG_SERVER = os.environ.get(
    "CTXENGINE_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
TENANT = "default"
CONTENT = "what is the weather like today?"
#: Calls each task makes before the clock starts (connections, prepared statements).
WARMUP = 3
#: Tokens per track_usage call.
AMOUNT = 10
#: How many flushers share the N callers in the floors (each a held connection running
#: batches of N / flushers): one, and four where N allows.
FLUSHERS = (1, 4)
#: Columns the database computes (never inserted).
GENERATED = frozenset({"idle_bucket"})


# -- the operations ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Operation:
    """A write path: ``kind`` names its raw baseline and floor (the UPDATE of the
    counters, the INSERT of a usage row or of a message row); ``shared``: every task on
    one session (one chat) instead of one each."""

    name: str
    kind: str
    shared: bool = False
    quota: bool = False


OPERATIONS = (
    Operation("update_session", "update"),
    Operation("update_session, one session", "update", shared=True),
    Operation("track_request", "update"),
    Operation("track_usage, no quota", "usage"),
    Operation("track_usage, quota set", "usage", quota=True),
    Operation("add_message", "message"),
    Operation("add_message, one chat", "message", shared=True),
)

#: Which peers' measurements stand beside which operation.
PEER_OPERATIONS = {
    "update_session": ("update_session", False),
    "update_session, one session": ("update_session", True),
    "add_message": ("add_message", False),
    "add_message, one chat": ("add_message", True),
}


# -- the raw driver ----------------------------------------------------------------------------
class RawConn(Protocol):
    async def write(self, sql: str, args: Sequence[Any] = ()) -> None:
        """``sql`` in a transaction of its own."""

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]: ...

    async def close(self) -> None: ...


class PgConn:
    """asyncpg on a connection the caller holds (autocommit: one statement, one
    transaction)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def write(self, sql: str, args: Sequence[Any] = ()) -> None:
        await self.conn.execute(sql, *args)

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return [dict(r) for r in await self.conn.fetch(sql, *args)]

    async def close(self) -> None:
        await self.conn.close()


_DOLLAR = re.compile(r"\$(\d+)")


class SqliteConn:
    """The stdlib sqlite3, inline on the event loop as ctxengine runs SQLite: WAL,
    ``synchronous=NORMAL``, one ``BEGIN IMMEDIATE … COMMIT`` per write. The SQL is
    written with ``$n`` (SQLite's ``?n``)."""

    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=30000"):
            self.db.execute(f"PRAGMA {pragma}")

    async def write(self, sql: str, args: Sequence[Any] = ()) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute(_DOLLAR.sub(r"?\1", sql), tuple(args))
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cursor = self.db.execute(_DOLLAR.sub(r"?\1", sql), tuple(args))
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    async def close(self) -> None:
        self.db.close()


class Database:
    """One backend: the engine's URL, the raw driver's connections, its dialect's bits."""

    def __init__(self, name: str, url: str, dsn: str) -> None:
        self.name = name
        self.url = url
        self.dsn = dsn
        #: the harness's own connection, for the checks
        self.check: RawConn | None = None
        #: a reader of the CPU seconds the server has used (a local PostgreSQL)
        self.server_cpu: Callable[[], float] | None = None

    @property
    def postgres(self) -> bool:
        return self.name == "postgres"

    async def connect(self) -> RawConn:
        if not self.postgres:
            return SqliteConn(self.dsn)
        for attempt in range(100):
            try:
                return PgConn(await asyncpg.connect(self.dsn))
            except asyncpg.TooManyConnectionsError:
                if attempt == 99:
                    raise
                await asyncio.sleep(0.3)
        raise AssertionError("unreachable")

    async def room(self, connections: int) -> None:
        """Wait (up to a minute) until the server has ``connections`` to spare: on a
        shared server other clients may hold most of ``max_connections``."""
        if not self.postgres or self.check is None:
            return
        for _ in range(300):
            (free,) = await self.check.fetch(
                "SELECT current_setting('max_connections')::int"
                " - current_setting('superuser_reserved_connections')::int - count(*) AS n"
                " FROM pg_stat_activity WHERE backend_type = 'client backend'"
            )
            if free["n"] >= connections + 2:
                return
            await asyncio.sleep(0.2)

    def stamp(self, now: datetime) -> Any:
        """A timestamp as the engine stores it (SQLite: UTC text)."""
        return now if self.postgres else now.strftime("%Y-%m-%d %H:%M:%S.%f")

    def cast(self, param: str, pg_type: str) -> str:
        return f"{param}::{pg_type}" if self.postgres else param

    async def clone(self, conn: RawConn, source: str, name: str) -> None:
        """``name``: an empty table made as ``source`` is (columns, keys, indexes; not
        its foreign keys, which the raw driver's SQLite connections do not enforce)."""
        await conn.write(f"DROP TABLE IF EXISTS {name}")
        if self.postgres:
            await conn.write(f"CREATE TABLE {name} (LIKE {source} INCLUDING ALL)")
            return
        found = await conn.fetch(
            "SELECT sql FROM sqlite_master WHERE tbl_name = $1 AND sql IS NOT NULL"
            " AND type IN ('table', 'index') ORDER BY type = 'table' DESC",
            (source,),
        )
        for row in found:
            await conn.write(row["sql"].replace(source, name))


class Rows:
    """INSERTs into a table made as the engine's, of a row the engine stored with new
    keys: the raw INSERT writes what the operation's INSERT writes."""

    def __init__(self, table: str, template: dict[str, Any]) -> None:
        self.table = table
        self.template = {k: v for k, v in template.items() if k not in GENERATED}
        self.columns = ", ".join(self.template)

    def values(self, **changed: Any) -> list[Any]:
        return list({**self.template, **changed}.values())

    def insert(self, rows: int = 1) -> str:
        """An INSERT of ``rows`` rows (``$n`` parameters, row after row)."""
        width = len(self.template)
        marks = [
            "(" + ", ".join(f"${r * width + c + 1}" for c in range(width)) + ")"
            for r in range(rows)
        ]
        return f"INSERT INTO {self.table} ({self.columns}) VALUES {', '.join(marks)}"


# -- one side of a cell ------------------------------------------------------------------------
class Side(Protocol):
    """What runs in a block: ``call(t, i)`` is task ``t``'s ``i``-th call (True when it
    succeeded; a peer's call may report failure instead of raising)."""

    async def open(self) -> None: ...

    async def call(self, t: int, i: int) -> bool: ...

    async def close(self) -> None: ...


@dataclass
class Tally:
    """Calls of one side over all its blocks: per task (warm-up included, for the
    invariants), timed, and their latencies."""

    tasks: int
    callers_per_call: int = 1
    ok: list[int] = field(default_factory=list)
    attempts: list[int] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None
    timed: int = 0
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    #: CPU seconds used while timed: this process's, the server's (None: not known)
    client_cpu: float = 0.0
    server_cpu: float | None = 0.0

    def __post_init__(self) -> None:
        self.ok = [0] * self.tasks
        self.attempts = [0] * self.tasks

    def stats(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        n = len(ordered)
        calls = self.timed * self.callers_per_call
        server = self.server_cpu
        return {
            "ops_per_s": calls / self.elapsed if self.elapsed else 0.0,
            "calls": calls,
            # CPU per call (µs): of the harness process (ctxengine or the driver, the
            # event loop, the system calls), of every server process
            "client_cpu_us": self.client_cpu / calls * 1e6 if calls else None,
            "server_cpu_us": server / calls * 1e6 if calls and server is not None else None,
            # the server's CPU use while timed, in CPUs
            "server_busy": server / self.elapsed if self.elapsed and server is not None else None,
            "p50_ms": ordered[n // 2] * 1000 if n else None,
            "p99_ms": ordered[min(n - 1, int(n * 0.99))] * 1000 if n else None,
            "errors": self.errors,
            "first_error": self.first_error,
        }


async def block(
    side: Side, tally: Tally, seconds: float, server_cpu: Callable[[], float] | None = None
) -> None:
    """Open ``side``, warm it up, run its tasks for ``seconds``, close it; the CPU used
    while timed by this process and (read by ``server_cpu``) the server's."""
    await side.open()
    try:

        async def loop(t: int, deadline: float | None) -> None:
            # warm-up: WARMUP calls; timed: until the deadline, one call at least
            made = 0
            while (
                made < WARMUP if deadline is None else (not made or time.perf_counter() < deadline)
            ):
                i = tally.attempts[t]
                tally.attempts[t] += 1
                started = time.perf_counter()
                try:
                    done = await side.call(t, i)
                except Exception as exc:
                    done = False
                    if tally.first_error is None:
                        tally.first_error = f"{type(exc).__name__}: {exc}"[:300]
                if done:
                    tally.ok[t] += 1
                else:
                    tally.errors += 1
                made += 1
                if deadline is not None:
                    tally.latencies.append(time.perf_counter() - started)
                    tally.timed += done
                await asyncio.sleep(0)

        await asyncio.gather(*(loop(t, None) for t in range(tally.tasks)))
        began, served = os.times(), server_cpu() if server_cpu else None
        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(loop(t, deadline) for t in range(tally.tasks)))
        tally.elapsed += time.perf_counter() - started
        ended = os.times()
        tally.client_cpu += ended.user - began.user + ended.system - began.system
        if served is None or server_cpu is None or tally.server_cpu is None:
            tally.server_cpu = None
        else:
            tally.server_cpu += server_cpu() - served
    finally:
        await side.close()


class EngineSide:
    """ctxengine: one engine, ``pool_size=tasks``, ``max_overflow=0``."""

    def __init__(self, db: Database, op: Operation, sids: list[str], tasks: int) -> None:
        self.db, self.op, self.sids, self.tasks = db, op, sids, tasks
        self.engine: ContextEngine | None = None

    async def open(self) -> None:
        await self.db.room(self.tasks)
        self.engine = ContextEngine(self.db.url, settings=engine_settings(self.tasks))
        await self.engine.initialize()

    async def call(self, t: int, i: int) -> bool:
        engine = self.engine
        assert engine is not None
        sid = self.sids[0 if self.op.shared else t]
        if self.op.name.startswith("update_session"):
            await engine.update_session(sid, increment_requests=True, add_processing_time=0.001)
        elif self.op.name == "track_request":
            async with engine.track_request(sid, "bench"):
                pass
        elif self.op.kind == "usage":
            await engine.track_usage(sid, "bench", QuotaType.TOKENS, AMOUNT)
        else:
            await engine.add_message(sid, "user", f"task {t} call {i}: {CONTENT}")
        return True

    async def close(self) -> None:
        if self.engine is not None:
            await self.engine.close()
            self.engine = None


class RawSide:
    """The raw driver: one held connection per task, one statement per call."""

    def __init__(
        self, db: Database, statement: Callable[[int, int], tuple[str, list[Any]]], tasks: int
    ) -> None:
        self.db, self.statement, self.tasks = db, statement, tasks
        self.conns: list[RawConn] = []

    async def open(self) -> None:
        await self.db.room(self.tasks)
        self.conns = list(await asyncio.gather(*(self.db.connect() for _ in range(self.tasks))))

    async def call(self, t: int, i: int) -> bool:
        sql, args = self.statement(t, i)
        await self.conns[t].write(sql, args)
        return True

    async def close(self) -> None:
        for conn in self.conns:
            await conn.close()
        self.conns = []


def engine_settings(connections: int) -> EngineSettings:
    """As many pooled connections as tasks, whatever the defaults; no cleanup loop, no
    chat cap (a trimmed chat would break the count), sessions that do not expire."""
    return EngineSettings(
        pool_size=connections,
        max_overflow=0,
        auto_cleanup=False,
        auto_migrate=False,
        max_messages_per_chat=None,
        session_timeout=86_400.0,
    )


# -- a cell: one operation at one task count -----------------------------------------------------
@dataclass
class Bench:
    db: Database
    seconds: float
    rounds: int
    setup: ContextEngine
    check: RawConn
    templates: dict[str, Rows]
    peers: Peers
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])


async def cell(bench: Bench, op: Operation, tasks: int) -> dict[str, Any]:
    db = bench.db
    key = f"{bench.run}-{op.name.replace(', ', '-').replace(' ', '_')}-{tasks}"
    subjects = 1 if op.shared else tasks
    sids = [
        (await bench.setup.create_session(user_id=f"bench-{t}", tier="enterprise")).session_id
        for t in range(subjects)
    ]
    if op.quota:
        for sid in sids:
            await bench.setup.set_quota(sid, QuotaType.TOKENS, 10**15)

    # the raw driver's rows: sessions to update; message and usage rows carry the key
    raw_keys = [f"{key}-raw-{k}" for k in range(subjects)]
    flushers = [
        k for k in FLUSHERS if tasks > 1 and (k == 1 or (tasks >= 2 * k and tasks % k == 0))
    ]
    floor_keys = {k: [f"{key}-floor{k}-{j}" for j in range(subjects)] for k in flushers}
    every_key = raw_keys + [k for keys in floor_keys.values() for k in keys]
    sessions, usage, messages = (bench.templates[t] for t in ("sessions", "usage", "messages"))
    if op.kind == "update":
        for row_key in every_key:
            await bench.check.write(sessions.insert(), sessions.values(session_id=row_key))
    seqs = dict.fromkeys(every_key, 0)

    def now() -> Any:
        return db.stamp(datetime.now(UTC))

    def raw_statement(t: int, i: int) -> tuple[str, list[Any]]:
        k = raw_keys[0 if op.shared else t]
        if op.kind == "update":
            return UPDATE_ROW, [TENANT, k, 0.001, now(), time.time() + 1800]
        if op.kind == "usage":
            return usage.insert(), usage.values(
                session_id=k, record_id=str(uuid.uuid4()), created_at=now()
            )
        seqs[k] += 1
        content = f"task {t} call {i}: {CONTENT}"
        return messages.insert(), messages.values(
            session_id=k,
            seq=seqs[k],
            message_id=uuid.uuid4().hex,
            content=content,
            created_at=now(),
        )

    ours = EngineSide(db, op, sids, tasks)
    raw = RawSide(db, raw_statement, tasks)
    sides: list[tuple[str, Side, Tally]] = [
        ("ctxengine", ours, Tally(tasks)),
        ("raw", raw, Tally(tasks)),
    ]
    for k in flushers:
        batch = tasks // k
        statement = floor_statement(db, op, batch, floor_keys[k], seqs, now, bench.templates)
        sides.append((f"floor{k}", RawSide(db, statement, k), Tally(k, callers_per_call=batch)))
    per_block = bench.seconds / bench.rounds
    for r in range(bench.rounds):
        for name, side, tally in sides if r % 2 == 0 else sides[::-1]:
            # the floors are bare statements, steady: half the time each
            share = 1 if len(flushers) < 2 or not name.startswith("floor") else 0.5
            await block(side, tally, per_block * share, db.server_cpu)

    tallies = {name: tally for name, _, tally in sides}
    out: dict[str, Any] = {
        "operation": op.name,
        "tasks": tasks,
        "ctxengine": tallies["ctxengine"].stats(),
        "raw": tallies["raw"].stats(),
        "floors": {str(k): tallies[f"floor{k}"].stats() for k in flushers},
    }
    out["ratio"] = _ratio(out["ctxengine"]["ops_per_s"], out["raw"]["ops_per_s"])
    if flushers:
        best = max(flushers, key=lambda k: out["floors"][str(k)]["ops_per_s"])
        out["floor"] = {**out["floors"][str(best)], "flushers": best, "batch": tasks // best}
        out["floor_ratio"] = _ratio(out["floor"]["ops_per_s"], out["raw"]["ops_per_s"])
    problems = [
        f"{name}: {tally.errors} calls raised ({tally.first_error})"
        for name, tally in tallies.items()
        if tally.errors
    ]
    problems += await verify_engine(bench, op, sids, tallies["ctxengine"])
    raw_ok = tallies["raw"].ok
    problems += await verify_raw(bench, op, raw_keys, [sum(raw_ok)] if op.shared else raw_ok, "raw")
    for k in flushers:
        batches, batch = tallies[f"floor{k}"].ok, tasks // k
        floor_calls = (
            [sum(batches) * batch] if op.shared else [batches[j // batch] for j in range(tasks)]
        )
        problems += await verify_raw(bench, op, floor_keys[k], floor_calls, f"floor{k}")
    out["invariants"] = {"ok": not problems, "problems": problems}
    if op.name in PEER_OPERATIONS:
        out["peers"] = await bench.peers.measure(db, *PEER_OPERATIONS[op.name], tasks)
    return out


#: update_session's change of the session row, as a user of the raw driver writes it.
UPDATE_ROW = (
    "UPDATE bench_sessions SET request_count = request_count + 1,"
    " total_processing_time = total_processing_time + $3, last_activity = $4,"
    " idle_deadline = $5 WHERE tenant_id = $1 AND session_id = $2"
)


def floor_statement(
    db: Database,
    op: Operation,
    batch: int,
    keys: list[str],
    seqs: dict[str, int],
    now: Callable[[], Any],
    templates: dict[str, Rows],
) -> Callable[[int, int], tuple[str, list[Any]]]:
    """The one statement doing the work of ``batch`` concurrent calls: flusher ``t``'s
    batch covers ``keys[t * batch:(t + 1) * batch]`` (or, shared, ``keys[0]``
    ``batch`` times)."""

    def mine(t: int) -> list[str]:
        return [keys[0]] * batch if op.shared else keys[t * batch : (t + 1) * batch]

    if op.kind == "update" and op.shared:
        # the callers' increments summed into one change of the row
        sql = (
            "UPDATE bench_sessions SET request_count = request_count + $3,"
            " total_processing_time = total_processing_time + $4, last_activity = $5,"
            " idle_deadline = $6 WHERE tenant_id = $1 AND session_id = $2"
        )

        def shared_update(t: int, i: int) -> tuple[str, list[Any]]:
            return sql, [TENANT, keys[0], batch, 0.001 * batch, now(), time.time() + 1800]

        return shared_update
    if op.kind == "update":
        rows = ", ".join(
            f"({db.cast(f'${2 * r + 1}', 'text')}, {db.cast(f'${2 * r + 2}', 'float8')})"
            for r in range(batch)
        )
        n = 2 * batch
        sql = (
            f"WITH v(sid, spent) AS (VALUES {rows}) UPDATE bench_sessions AS s SET"
            " request_count = s.request_count + 1,"
            " total_processing_time = s.total_processing_time + v.spent,"
            f" last_activity = ${n + 1}, idle_deadline = ${n + 2}"
            f" FROM v WHERE s.tenant_id = ${n + 3} AND s.session_id = v.sid"
        )

        def batched_update(t: int, i: int) -> tuple[str, list[Any]]:
            args: list[Any] = []
            for k in mine(t):
                args += [k, 0.001]
            return sql, [*args, now(), time.time() + 1800, TENANT]

        return batched_update
    template = templates["usage" if op.kind == "usage" else "messages"]
    insert_sql = template.insert(batch)

    def batched_insert(t: int, i: int) -> tuple[str, list[Any]]:
        args: list[Any] = []
        for r, k in enumerate(mine(t)):
            if op.kind == "usage":
                args += template.values(session_id=k, record_id=str(uuid.uuid4()), created_at=now())
            else:
                seqs[k] += 1
                args += template.values(
                    session_id=k,
                    seq=seqs[k],
                    message_id=uuid.uuid4().hex,
                    content=f"task {t * batch + r} call {i}: {CONTENT}",
                    created_at=now(),
                )
        return insert_sql, args

    return batched_insert


# -- the invariants ------------------------------------------------------------------------------
def _in(values: Sequence[str], first: int = 2) -> str:
    return ", ".join(f"${first + k}" for k in range(len(values)))


async def verify_engine(bench: Bench, op: Operation, sids: list[str], tally: Tally) -> list[str]:
    """What the database holds against the calls ctxengine made (succeeded)."""
    conn = bench.check
    calls = [sum(tally.ok)] if op.shared else list(tally.ok)
    problems = []
    if op.kind == "update":
        found = await conn.fetch(
            f"SELECT session_id, request_count FROM ctx_sessions WHERE tenant_id = $1"
            f" AND session_id IN ({_in(sids)})",
            [TENANT, *sids],
        )
        counts = {r["session_id"]: r["request_count"] for r in found}
        for sid, made in zip(sids, calls, strict=True):
            if counts.get(sid) != made:
                problems.append(
                    f"ctxengine: session {sid} request_count {counts.get(sid)} != {made}"
                )
    elif op.kind == "usage":
        found = await conn.fetch(
            f"SELECT count(*) AS n FROM ctx_usage_records WHERE tenant_id = $1"
            f" AND session_id IN ({_in(sids)})",
            [TENANT, *sids],
        )
        if found[0]["n"] != sum(calls):
            problems.append(f"ctxengine: {found[0]['n']} usage rows != {sum(calls)} calls")
        if op.quota:
            used = await conn.fetch(
                f"SELECT session_id, used FROM ctx_quotas WHERE tenant_id = $1"
                f" AND resource_type = 'tokens' AND session_id IN ({_in(sids)})",
                [TENANT, *sids],
            )
            by = {r["session_id"]: r["used"] for r in used}
            for sid, made in zip(sids, calls, strict=True):
                if by.get(sid) != made * AMOUNT:
                    problems.append(f"ctxengine: quota used {by.get(sid)} != {made * AMOUNT}")
    else:
        problems += await verify_messages(conn, "ctx_messages", sids, calls, "ctxengine")
    return problems


async def verify_messages(
    conn: RawConn, table: str, sids: list[str], calls: list[int], side: str
) -> list[str]:
    """Each chat: as many messages as calls, seqs without gaps, each task's messages
    in the order it sent them."""
    problems = []
    for sid, made in zip(sids, calls, strict=True):
        found = await conn.fetch(
            f"SELECT seq, content FROM {table} WHERE tenant_id = $1 AND session_id = $2"
            " ORDER BY seq",
            [TENANT, sid],
        )
        seqs = [r["seq"] for r in found]
        if len(found) != made:
            problems.append(f"{side}: chat of {sid} holds {len(found)} messages != {made} calls")
        if seqs and seqs != list(range(seqs[0], seqs[0] + len(seqs))):
            problems.append(f"{side}: chat of {sid} has gaps in its seqs")
        last: dict[str, int] = {}
        for r in found:
            task, _, rest = r["content"].removeprefix("task ").partition(" call ")
            i = int(rest.split(":", 1)[0])
            if i <= last.get(task, -1):
                problems.append(f"{side}: chat of {sid}: task {task}'s messages out of order")
                break
            last[task] = i
    return problems


async def verify_raw(
    bench: Bench, op: Operation, keys: list[str], calls: list[int], side: str
) -> list[str]:
    conn = bench.check
    if op.kind == "update":
        found = await conn.fetch(
            f"SELECT session_id, request_count FROM bench_sessions WHERE tenant_id = $1"
            f" AND session_id IN ({_in(keys)})",
            [TENANT, *keys],
        )
        counts = {r["session_id"]: r["request_count"] for r in found}
        base = bench.templates["sessions"].template["request_count"]
        return [
            f"{side}: row {k} request_count {counts.get(k)} != {made + base}"
            for k, made in zip(keys, calls, strict=True)
            if counts.get(k) != made + base
        ]
    if op.kind == "usage":
        found = await conn.fetch(
            f"SELECT count(*) AS n FROM bench_usage_records WHERE tenant_id = $1"
            f" AND session_id IN ({_in(keys)})",
            [TENANT, *keys],
        )
        n = found[0]["n"]
        return [] if n == sum(calls) else [f"{side}: {n} usage rows != {sum(calls)} calls"]
    return await verify_messages(conn, "bench_messages", keys, calls, side)


# -- the peers ---------------------------------------------------------------------------------
def _async_url(url: str) -> str:
    """The SQLAlchemy asyncio URL of ``url`` (the peers are SQLAlchemy-based)."""
    if url.startswith("postgresql://"):
        return url.replace("postgresql://", "postgresql+asyncpg://", 1)
    return url


class PeerSide:
    """A peer's store: ``N`` tasks appending one user message each call, to their own
    conversation or all to one; what it stored is counted when it closes."""

    name = ""

    def __init__(self, shared: bool, tasks: int) -> None:
        self.shared, self.tasks = shared, tasks
        self.stored = 0
        self.engine: Any = None

    async def open(self) -> None:
        raise NotImplementedError

    async def call(self, t: int, i: int) -> bool:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    def subject(self, t: int) -> int:
        return 0 if self.shared else t

    async def _dispose(self) -> None:
        if self.engine is not None:
            await self.engine.dispose()
            self.engine = None


class OpenAISide(PeerSide):
    """The OpenAI Agents SDK: ``SQLiteSession`` on SQLite (its own file beside ours),
    ``SQLAlchemySession`` on PostgreSQL (an engine of ``N`` connections)."""

    name = "openai"

    def __init__(self, db: Database, shared: bool, tasks: int, tmp: Path) -> None:
        super().__init__(shared, tasks)
        self.db, self.tmp = db, tmp
        self.sessions: list[Any] = []

    async def open(self) -> None:
        run = uuid.uuid4().hex[:8]
        ids = [f"openai-{run}-{k}" for k in range(1 if self.shared else self.tasks)]
        await self.db.room(self.tasks)
        if self.db.postgres:
            from agents.extensions.memory.sqlalchemy_session import SQLAlchemySession
            from sqlalchemy.ext.asyncio import create_async_engine

            self.engine = create_async_engine(
                _async_url(self.db.dsn), pool_size=self.tasks, max_overflow=0
            )
            self.sessions = [
                SQLAlchemySession(i, engine=self.engine, create_tables=True) for i in ids
            ]
        else:
            from agents.memory import SQLiteSession

            self.sessions = [SQLiteSession(i, db_path=self.tmp / "openai.db") for i in ids]

    async def call(self, t: int, i: int) -> bool:
        item: Any = {"role": "user", "content": f"task {t} call {i}: {CONTENT}"}
        await self.sessions[self.subject(t)].add_items([item])
        return True

    async def close(self) -> None:
        for session in self.sessions:
            self.stored += len(await session.get_items())
            if not self.db.postgres:
                session.close()
        await self._dispose()


class ADKSide(PeerSide):
    """Google ADK's ``DatabaseSessionService`` on the same database (an engine of ``N``
    connections); all tasks of the shared variant append to one ``Session`` object,
    as one runner would."""

    name = "adk"

    def __init__(self, db: Database, shared: bool, tasks: int) -> None:
        super().__init__(shared, tasks)
        self.db = db
        self.sessions: list[Any] = []
        self.service: Any = None

    async def open(self) -> None:
        from google.adk.sessions import DatabaseSessionService
        from sqlalchemy.ext.asyncio import create_async_engine

        await self.db.room(self.tasks)
        self.engine = create_async_engine(
            _async_url(self.db.url), pool_size=self.tasks, max_overflow=0
        )
        self.service = DatabaseSessionService(db_engine=self.engine)
        self.app = f"bench-{uuid.uuid4().hex[:8]}"
        self.sessions = [
            await self.service.create_session(app_name=self.app, user_id="u")
            for _ in range(1 if self.shared else self.tasks)
        ]

    async def call(self, t: int, i: int) -> bool:
        from google.adk.events.event import Event
        from google.genai import types

        content = types.Content(role="user", parts=[types.Part(text=f"task {t} call {i}")])
        event = Event(invocation_id=f"i{t}-{i}", author="user", content=content)
        await self.service.append_event(self.sessions[self.subject(t)], event)
        return True

    async def close(self) -> None:
        for session in self.sessions:
            found = await self.service.get_session(
                app_name=self.app, user_id="u", session_id=session.id
            )
            self.stored += len(found.events) if found is not None else 0
        await self.service.close()
        await self._dispose()


class Peers:
    """The in-process peers (the OpenAI Agents SDK, ADK), each skipped with its
    reason when it is not installed; AIECS's results (from its subprocess) are kept
    here too, to stand beside the rows."""

    def __init__(self, tmp: Path, enabled: bool, seconds: float) -> None:
        self.tmp, self.enabled, self.seconds = tmp, enabled, seconds
        self.skipped: dict[str, str] = {}
        self.aiecs: dict[str, Any] = {}
        if not enabled:
            self.skipped["peers"] = "--no-peers"
            return
        for name, module in (
            ("openai", "agents.memory"),
            ("adk", "google.adk.sessions"),
        ):
            try:
                __import__(module)
            except ImportError as exc:
                self.skipped[name] = f"not installed ({exc})"

    async def measure(self, db: Database, op: str, shared: bool, tasks: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if not self.enabled or op != "add_message":
            return out
        sides: list[PeerSide] = []
        if "openai" not in self.skipped:
            sides.append(OpenAISide(db, shared, tasks, self.tmp))
        if "adk" not in self.skipped:
            sides.append(ADKSide(db, shared, tasks))
        for side in sides:
            tally = Tally(tasks)
            await block(side, tally, self.seconds)
            stats = tally.stats()
            made = sum(tally.ok)
            stats.update(stored=side.stored, expected=made, lost=made - side.stored)
            out[side.name] = stats
        return out


# -- AIECS on Redis, in a subprocess --------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def redis_server(url: str | None, tmp: Path) -> Iterator[tuple[str, int] | str]:
    """``(host, port)`` of the Redis to use: ``url``'s, else a ``redis-server`` started
    here on a free port (its default persistence: RDB snapshots, no AOF) and stopped
    afterwards; a string saying why there is none."""
    if url:
        m = re.match(r"redis://([^:/]+)(?::(\d+))?", url)
        yield (m.group(1), int(m.group(2) or 6379)) if m else f"cannot read {url!r}"
        return
    binary = shutil.which("redis-server")
    if binary is None:
        yield "no redis-server on PATH and no --redis-url"
        return
    port = _free_port()
    folder = tmp / "redis"
    folder.mkdir()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
                break
            time.sleep(0.05)
        yield ("127.0.0.1", port)
    finally:
        proc.terminate()
        proc.wait(10)


def aiecs_python(given: str | None) -> str | None:
    """The Python that has aiecs: ``given``, ``CTXENGINE_BENCH_AIECS_PYTHON``, or this
    one if it can import aiecs."""
    if given or os.environ.get("CTXENGINE_BENCH_AIECS_PYTHON"):
        return given or os.environ["CTXENGINE_BENCH_AIECS_PYTHON"]
    import importlib.util

    return sys.executable if importlib.util.find_spec("aiecs") is not None else None


def run_aiecs(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    python = aiecs_python(args.aiecs_python)
    if python is None:
        return {
            "skipped": "aiecs not installed (it downgrades this environment's httpx, openai"
            " and fastapi: install aiecs==2.2.0 into a venv of its own and pass"
            " --aiecs-python)"
        }
    with redis_server(args.redis_url, tmp) as where:
        if isinstance(where, str):
            return {"skipped": where}
        done = subprocess.run(
            [
                python,
                str(Path(__file__).with_name("aiecs_peer.py")),
                "--tasks",
                ",".join(map(str, args.tasks)),
                "--seconds",
                str(args.seconds),
            ],
            env={**os.environ, "REDIS_HOST": where[0], "REDIS_PORT": str(where[1])},
            capture_output=True,
            text=True,
            timeout=900,
        )
    if done.returncode != 0:
        return {"skipped": f"the AIECS peer failed: {done.stderr.strip()[-300:]}"}
    result: dict[str, Any] = json.loads(done.stdout)
    return result


# -- one backend --------------------------------------------------------------------------------
async def templates_of(db: Database, setup: ContextEngine, conn: RawConn) -> dict[str, Rows]:
    """The raw tables (made as the engine's) and a row of each the engine stored."""
    sid = (await setup.create_session(user_id="bench", tier="enterprise")).session_id
    await setup.add_message(sid, "user", CONTENT)
    await setup.track_usage(sid, "bench", QuotaType.TOKENS, AMOUNT)
    out = {}
    for name, table in (
        ("sessions", "sessions"),
        ("messages", "messages"),
        ("usage", "usage_records"),
    ):
        await db.clone(conn, f"ctx_{table}", f"bench_{table}")
        (row,) = await conn.fetch(
            f"SELECT * FROM ctx_{table} WHERE tenant_id = $1 AND session_id = $2 LIMIT 1",
            [TENANT, sid],
        )
        out[name] = Rows(f"bench_{table}", row)
    return out


async def run_backend(
    db: Database, args: argparse.Namespace, peers: Peers, ops: list[Operation]
) -> dict[str, Any]:
    started_load = os.getloadavg()
    setup_settings = engine_settings(2).model_copy(update={"auto_migrate": True})
    rows = []
    async with ContextEngine(db.url, settings=setup_settings) as setup:
        check = db.check = await db.connect()
        try:
            templates = await templates_of(db, setup, check)
            bench = Bench(db, args.seconds, args.rounds, setup, check, templates, peers)
            for op in ops:
                for tasks in args.tasks:
                    began = time.perf_counter()
                    if db.postgres:  # what autovacuum would do (off on the server measured)
                        await check.write("VACUUM ANALYZE")
                    row = await cell(bench, op, tasks)
                    row["wall_s"] = time.perf_counter() - began
                    rows.append(row)
                    print(
                        f"  {db.name}: {op.name}, {tasks} tasks: "
                        f"{row['ctxengine']['ops_per_s']:,.0f} ops/s,"
                        f" ratio {_num(row['ratio'], '.2f')}"
                        f" ({row['wall_s']:.1f} s)"
                        + ("" if row["invariants"]["ok"] else "  INVARIANTS BROKEN"),
                        flush=True,
                    )
        finally:
            db.check = None
            await check.close()
    return {"rows": rows, "loadavg": {"start": started_load, "end": os.getloadavg()}}


@contextlib.asynccontextmanager
async def postgres_database() -> AsyncIterator[tuple[str, int]]:
    """A database of its own on ``PG_SERVER``, dropped afterwards; its DSN and the pid
    of a server process (for the placement)."""
    admin = await asyncpg.connect(PG_SERVER)
    name = f"ctx_throughput_{uuid.uuid4().hex[:8]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_SERVER.rsplit("/", 1)[0] + f"/{name}", admin.get_server_pid()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    ops = [op for op in OPERATIONS if args.only is None or args.only in op.name]
    out: dict[str, Any] = {
        "command": " ".join(["python -m benchmarks.throughput", *sys.argv[1:]]),
        "cpu_count": os.cpu_count(),
        "seconds": args.seconds,
        "rounds": args.rounds,
        "tasks": args.tasks,
    }
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        peers = Peers(tmp, args.peers, args.seconds)
        if args.peers and (
            args.only is None or "update_session" in args.only or "add_message" in args.only
        ):
            print("AIECS on Redis ...", flush=True)
            peers.aiecs = await asyncio.to_thread(run_aiecs, args, tmp)
        out["peers"] = {"skipped": peers.skipped, "aiecs": peers.aiecs}
        if args.backend in ("sqlite", "all"):
            path = str(tmp / "throughput.db")
            db = Database("sqlite", f"sqlite+aiosqlite:///{path}", path)
            out["sqlite"] = await run_backend(db, args, peers, ops)
            out["sqlite"]["placement"] = "not pinned"
        if args.backend in ("postgres", "all"):
            async with postgres_database() as (dsn, server_pid):
                db = Database(
                    "postgres", dsn.replace("postgresql://", "postgresql+asyncpg://"), dsn
                )
                db.server_cpu = server_cpu(server_pid)
                with database_apart(server_pid) as placement:
                    out["postgres"] = await run_backend(db, args, peers, ops)
                out["postgres"]["placement"] = placement
    return out


# -- the printed tables ---------------------------------------------------------------------------
def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _num(x: float | None, fmt: str = ",.0f") -> str:
    return "—" if x is None else format(x, fmt)


def peer_cells(result: dict[str, Any], row: dict[str, Any]) -> str:
    """The peers' ops/s beside ``row``: AIECS (Redis) and the in-process ones."""
    parts = []
    op, shared = PEER_OPERATIONS.get(row["operation"], ("", False))
    name = "update_session" if op == "update_session" else "add_conversation_message"
    for a in result["peers"]["aiecs"].get("rows", []) if op else []:
        if a["operation"] == name and a["one"] == shared and a["tasks"] == row["tasks"]:
            lost = a["lost"] / a["expected"] if a["expected"] else 0.0
            failed = a["returned_false"] / max(1, a["returned_true"] + a["returned_false"])
            parts.append(
                f"AIECS {a['ok_ops_per_s']:,.0f} ({lost:.0%} lost"
                + (f", {failed:.0%} failed)" if failed >= 0.005 else ")")
            )
    for name, p in row.get("peers", {}).items():
        lost = p["lost"] / p["expected"] if p["expected"] else 0.0
        extra = [f"{lost:.0%} lost"] if p["lost"] else []
        if p["errors"]:
            extra.append(f"{p['errors']} errors")
        parts.append(f"{name} {p['ops_per_s']:,.0f}" + (f" ({', '.join(extra)})" if extra else ""))
    return "; ".join(parts)


def report(result: dict[str, Any]) -> list[str]:
    """Print the tables; the broken invariants."""
    broken = []
    for name, why in result["peers"]["skipped"].items():
        print(f"peer {name} skipped: {why}")
    if "skipped" in result["peers"]["aiecs"]:
        print(f"peer AIECS skipped: {result['peers']['aiecs']['skipped']}")
    for backend in ("sqlite", "postgres"):
        if backend not in result:
            continue
        r = result[backend]
        load = r["loadavg"]
        print(
            f"\n{backend} ({r['placement']}; {result['seconds']} s per side in"
            f" {result['rounds']} interleaved blocks; load average {load['start'][0]:.2f}"
            f" -> {load['end'][0]:.2f} on {result['cpu_count']} CPUs)"
        )
        print(
            f"{'operation':<29}{'tasks':>6}{'ctxengine':>11}{'p99 ms':>8}{'raw':>9}{'ratio':>7}"
            f"{'floor':>10}{'batch':>7}{'floor/raw':>10}  peers (ops/s)"
        )
        for row in r["rows"]:
            floor = row.get("floor")
            split = f"{floor['batch']}x{floor['flushers']}" if floor else ""
            print(
                f"{row['operation']:<29}{row['tasks']:>6}{row['ctxengine']['ops_per_s']:>11,.0f}"
                f"{_num(row['ctxengine']['p99_ms'], '.2f'):>8}{row['raw']['ops_per_s']:>9,.0f}"
                f"{_num(row['ratio'], '.2f'):>7}{_num(floor and floor['ops_per_s']):>10}"
                f"{split:>7}"
                f"{_num(row.get('floor_ratio'), '.2f'):>10}  {peer_cells(result, row)}"
            )
            broken += [f"{backend}: {p}" for p in row["invariants"]["problems"]]
        print(
            "\nCPU per call (µs): of this process / of the server's processes"
            " (the server's CPUs in use)"
        )
        print(f"{'operation':<29}{'tasks':>6}{'ctxengine':>22}{'raw':>22}{'floor':>22}")
        for row in r["rows"]:
            cells = [cpu_cell(row[side]) for side in ("ctxengine", "raw")]
            cells.append(cpu_cell(row["floor"]) if "floor" in row else "")
            print(f"{row['operation']:<29}{row['tasks']:>6}" + "".join(f"{c:>22}" for c in cells))
    return broken


def cpu_cell(stats: dict[str, Any]) -> str:
    """``client / server (busy)`` CPU of one side, as the CPU table shows it."""
    server, busy = stats.get("server_cpu_us"), stats.get("server_busy")
    return f"{_num(stats.get('client_cpu_us'))} / {_num(server)}" + (
        "" if busy is None else f" ({busy:.2f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--backend", choices=["sqlite", "postgres", "all"], default="all")
    parser.add_argument(
        "--tasks",
        type=lambda s: [int(x) for x in s.split(",") if x.strip()],
        default=[1, 16, 64],
        help="concurrent task counts, comma-separated",
    )
    parser.add_argument(
        "--seconds", type=float, default=0.6, help="timed seconds per side and cell, in all"
    )
    parser.add_argument("--rounds", type=int, default=2, help="interleaved blocks per side")
    parser.add_argument("--only", default=None, help="the operations whose name contains this")
    parser.add_argument("--no-peers", dest="peers", action="store_false")
    parser.add_argument("--aiecs-python", default=None, help="a Python that has aiecs 2.2")
    parser.add_argument("--redis-url", default=None, help="AIECS's Redis (default: start one)")
    parser.add_argument("--json", dest="json_path", default=None, help="write results here")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    conclude(result, report(result), args.json_path)


def conclude(result: dict[str, Any], broken: list[str], json_path: str | None) -> None:
    """Write ``result`` to ``json_path`` (when given); exit with status 1 when an
    invariant was ``broken``."""
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2, default=str))
    if broken:
        print("\nINVARIANTS BROKEN:", *broken, sep="\n  ", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
