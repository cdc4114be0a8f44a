"""Measure ctxengine's hot paths against the raw drivers, in one run.

    python -m benchmarks --backend all --n 2000 --json results.json

Each operation runs ``n`` times sequentially after a warm-up (the ``16 tasks`` rows
spread them over concurrent tasks), interleaved in blocks with its baseline so that
both meet the same machine; the raw baseline is the driver executing the equivalent
single statement (asyncpg on a pool; aiosqlite with the same pragmas, one transaction
per statement), and for reads the same rows. Repeats are run and the median taken,
because these machines are noisy: the ratios are what counts. The floors (an
operation's own statement run by the raw driver, building the result objects) say
what a target costs before ctxengine does anything.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import aiosqlite
import asyncpg
from sqlalchemy import text

from benchmarks import floors
from benchmarks.placement import database_apart
from benchmarks.timing import Op, Stats, interleaved, raw_pool, timed_pair
from ctxengine import ContextEngine, EngineSettings, Message, QuotaType

PG_SERVER = os.environ.get(
    "CTXENGINE_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)

#: Tasks of the concurrent variants, each on its own session (or row).
TASKS = 16
#: The names of the baselines on connections their task holds (PostgreSQL).
HELD_UPDATE = "raw UPDATE, held conn"
HELD_INSERT = "raw INSERT, held conn"
#: The raw INSERTs of a session row and of a usage row (a message row: "raw INSERT").
INSERT_SESSION = "raw INSERT, session row"
INSERT_USAGE = "raw INSERT, usage row"
#: remember's and recall's baselines: the same row written and read by its key.
UPSERT_MEMORY = "raw INSERT ON CONFLICT"
INSERT_MEMORY = "raw INSERT, memory row"
SELECT_MEMORY = "raw SELECT memory by key"


#: A call from task ``t`` (its ``i``-th).
TaskOp = Callable[[int, int], Awaitable[Any]]


async def timed_concurrent_pair(
    op: TaskOp, base: TaskOp, n: int, rounds: int = 4
) -> tuple[Stats, Stats]:
    """``n`` calls each of ``op`` and ``base``, spread over :data:`TASKS` tasks (task
    ``t`` calling ``op(t, i)``), :func:`~benchmarks.timing.interleaved` in ``rounds``
    blocks."""

    async def task(call: TaskOp, t: int, calls: range, latencies: list[float]) -> None:
        for i in calls:
            started = time.perf_counter()
            await call(t, i)
            latencies.append(time.perf_counter() - started)

    async def block(which: int, calls: range, latencies: list[float]) -> None:
        call = (op, base)[which]
        await asyncio.gather(*(task(call, t, calls, latencies) for t in range(TASKS)))

    for call in (op, base):  # warm-up
        await asyncio.gather(*(task(call, t, range(10), []) for t in range(TASKS)))
    return await interleaved(block, max(1, n // TASKS // rounds), rounds)


def _qmarks(sql: str) -> str:
    """``sql`` with asyncpg's numbered parameters as SQLite's ``?`` (each used once)."""
    return re.sub(r"\$\d+", "?", sql)


#: Columns the database computes (never inserted).
GENERATED = frozenset({"idle_bucket"})


def stamp_sqlite(now: datetime) -> str:
    """A timestamp as the engine stores it in SQLite (UTC text)."""
    return now.strftime("%Y-%m-%d %H:%M:%S.%f")


class RawSQLite:
    def __init__(self, path: str) -> None:
        self.path = path

    async def __aenter__(self) -> RawSQLite:
        self.db = await aiosqlite.connect(self.path, isolation_level=None)
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=30000"):
            await self.db.execute(f"PRAGMA {pragma}")
        self.lock = asyncio.Lock()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.db.close()

    def stamp(self, now: datetime) -> Any:
        return stamp_sqlite(now)

    async def clone(self, source: str, name: str) -> None:
        """``name``: an empty table made as ``source`` is (its columns, keys and
        indexes), from the statements SQLite keeps of it."""
        await self.db.execute(f"DROP TABLE IF EXISTS {name}")
        cursor = await self.db.execute(
            "SELECT sql FROM sqlite_master WHERE tbl_name = ? AND sql IS NOT NULL"
            " ORDER BY type = 'table' DESC",
            (source,),
        )
        for (sql,) in await cursor.fetchall():
            await self.db.execute(sql.replace(source, name))

    async def write(self, sql: str, *args: Any) -> None:
        await self.db.execute("BEGIN IMMEDIATE")
        await self.db.execute(_qmarks(sql), args)
        await self.db.execute("COMMIT")

    async def transaction(self, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        await self.db.execute("BEGIN IMMEDIATE")
        for sql, args in statements:
            await self.db.execute(_qmarks(sql), args)
        await self.db.execute("COMMIT")

    async def write_from(self, task: int, sql: str, *args: Any) -> None:
        """``write`` from one of :data:`TASKS` concurrent tasks: they share the connection
        in turn (the fastest way with one file; a connection each would wait on the
        file lock in SQLite's busy handler)."""
        async with self.lock:
            await self.write(sql, *args)

    async def read(self, sql: str, *args: Any) -> Any:
        cursor = await self.db.execute(_qmarks(sql), args)
        return await cursor.fetchone()

    async def read_dict(self, sql: str, *args: Any) -> dict[str, Any]:
        cursor = await self.db.execute(_qmarks(sql), args)
        found = await cursor.fetchone()
        assert found is not None, sql
        return {d[0]: value for d, value in zip(cursor.description, found, strict=True)}

    async def maintain(self) -> None:
        """SQLite plans key lookups without statistics and reuses freed pages by
        itself; nothing to do."""

    async def fetch(self, sql: str, *args: Any) -> Any:
        cursor = await self.db.execute(_qmarks(sql), args)
        return await cursor.fetchall()


class RawPostgres:
    def __init__(self, url: str) -> None:
        self.url = url.replace("postgresql+asyncpg://", "postgresql://")

    async def __aenter__(self) -> RawPostgres:
        self.pool = await raw_pool(self.url, 2)
        self.wide = await raw_pool(self.url, TASKS)
        #: the stricter baseline: connections held by their task (no pool acquire and
        #: release per call), what a user of bare asyncpg writes in a loop
        self.held = [await asyncpg.connect(self.url) for _ in range(TASKS)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.pool.close()
        await self.wide.close()
        for conn in self.held:
            await conn.close()

    def stamp(self, now: datetime) -> Any:
        return now

    async def clone(self, source: str, name: str) -> None:
        """``name``: an empty table made as ``source`` is (columns, defaults, keys,
        indexes; not its foreign keys)."""
        await self.pool.execute(f"DROP TABLE IF EXISTS {name}")
        await self.pool.execute(f"CREATE TABLE {name} (LIKE {source} INCLUDING ALL)")

    async def write_held(self, sql: str, *args: Any, task: int = 0) -> None:
        """``write`` on the connection task ``task`` holds."""
        await self.held[task].execute(sql, *args)

    async def read_held(self, sql: str, *args: Any) -> Any:
        return await self.held[0].fetchrow(sql, *args)

    async def write(self, sql: str, *args: Any) -> None:
        await self.pool.execute(sql, *args)

    async def transaction(self, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            for sql, args in statements:
                await conn.execute(sql, *args)

    async def write_from(self, task: int, sql: str, *args: Any) -> None:
        """``write`` from one of :data:`TASKS` concurrent tasks (a pool as wide)."""
        await self.wide.execute(sql, *args)

    async def read(self, sql: str, *args: Any) -> Any:
        return await self.pool.fetchrow(sql, *args)

    async def read_dict(self, sql: str, *args: Any) -> dict[str, Any]:
        found = await self.pool.fetchrow(sql, *args)
        assert found is not None, sql
        return dict(found)

    async def maintain(self) -> None:
        """What autovacuum does on a server that runs it (off on the machine measured
        here): without statistics PostgreSQL's generic plan for a session lookup by key
        picked a wrong index, whose cost grows with the sessions created so far; and
        the dead row versions an operation leaves (each touch of a session adds an
        entry to every index of its table) slow down the operations after it."""
        await self.pool.execute("VACUUM ANALYZE")

    async def fetch(self, sql: str, *args: Any) -> Any:
        return await self.pool.fetch(sql, *args)


class Rows:
    """The raw driver's rows of the same columns as the engine's: inserts into a table
    made as the engine's (:meth:`RawSQLite.clone`), of a row the engine stored with a
    new key, so that a raw INSERT writes what the operation's INSERT writes."""

    def __init__(self, table: str, template: dict[str, Any]) -> None:
        self.table = table
        self.template = {k: v for k, v in template.items() if k not in GENERATED}
        columns = ", ".join(self.template)
        marks = ", ".join(f"${i}" for i in range(1, len(self.template) + 1))
        self.sql = f"INSERT INTO {table} ({columns}) VALUES ({marks})"

    def args(self, **changed: Any) -> tuple[Any, ...]:
        return tuple({**self.template, **changed}.values())


async def bench_backend(
    url: str, raw: Any, n: int, only: str | None = None
) -> list[dict[str, Any]]:
    # as wide a pool as the raw driver's for the concurrent row (SQLAlchemy closes
    # connections above pool_size on return: a narrower pool would reconnect per call)
    settings = EngineSettings(auto_cleanup=False, pool_size=TASKS)
    results = []
    async with ContextEngine(url, settings=settings) as engine, raw:
        hot = (await engine.create_session(user_id="bench", tier="enterprise")).session_id
        talk = (await engine.create_session(user_id="bench", tier="enterprise")).session_id
        await engine.add_message(talk, "user", "what is the weather like today?")
        await engine.track_usage(hot, "bench", QuotaType.TOKENS, 10)
        run = uuid.uuid4().hex[:8]
        serial = itertools.count(10**9)  # seqs and keys no engine row has

        # the raw driver's tables: made as the engine's, each row of the same columns
        for table in ("sessions", "messages", "usage_records"):
            await raw.clone(f"ctx_{table}", f"bench_{table}")
        key = "WHERE tenant_id = $1 AND session_id = $2"
        sessions = Rows(
            "bench_sessions",
            await raw.read_dict(f"SELECT * FROM ctx_sessions {key}", "default", hot),
        )
        messages = Rows(
            "bench_messages",
            await raw.read_dict(f"SELECT * FROM ctx_messages {key} LIMIT 1", "default", talk),
        )
        usage = Rows(
            "bench_usage_records",
            await raw.read_dict(f"SELECT * FROM ctx_usage_records {key} LIMIT 1", "default", hot),
        )
        await raw.write(sessions.sql, *sessions.args())

        def stamp() -> Any:
            return raw.stamp(datetime.now(UTC))

        # update_session's change of the session row, as a user would write it
        update_row = (
            "UPDATE bench_sessions SET request_count = request_count + 1,"
            " total_processing_time = total_processing_time + $3, last_activity = $4,"
            f" idle_deadline = $5 {key}"
        )

        def update_args(sid: str) -> tuple[Any, ...]:
            now = datetime.now(UTC)
            return ("default", sid, 0.001, raw.stamp(now), now.timestamp() + 1800)

        select_session = f"SELECT * FROM ctx_sessions {key}"

        def new_message() -> tuple[Any, ...]:
            return messages.args(seq=next(serial), message_id=uuid.uuid4().hex, created_at=stamp())

        def new_session() -> tuple[Any, ...]:
            now = stamp()
            return sessions.args(
                session_id=f"{run}-{next(serial)}", created_at=now, last_activity=now
            )

        def new_usage() -> tuple[Any, ...]:
            return usage.args(record_id=str(uuid.uuid4()), created_at=stamp())

        async def raw_update(i: int) -> None:
            await raw.write(update_row, *update_args(hot))

        async def raw_select(i: int) -> None:
            await raw.read(select_session, "default", hot)

        async def raw_insert(i: int) -> None:
            await raw.write(messages.sql, *new_message())

        async def raw_insert_session(i: int) -> None:
            await raw.write(sessions.sql, *new_session())

        async def raw_insert_usage(i: int) -> None:
            await raw.write(usage.sql, *new_usage())

        # the floor under every call: one statement in ctxengine's unit of work
        # (SQLAlchemy Core, the pool, BEGIN/COMMIT), the same UPDATE as the raw driver's
        # (the one documented internal hook: docs/performance.md)
        floor_update = text(
            "UPDATE bench_sessions SET request_count = request_count + 1,"
            " total_processing_time = total_processing_time + :t, last_activity = :now,"
            " idle_deadline = :deadline WHERE tenant_id = :tenant AND session_id = :sid"
        )

        async def floor(i: int) -> None:
            _, sid, spent, now, deadline = update_args(hot)
            params = {"tenant": "default", "sid": sid, "t": spent, "now": now}
            await engine._store.run(
                lambda conn: conn.execute(floor_update, {**params, "deadline": deadline}),
                write=True,
                operation="benchmark",
            )

        async def update(i: int) -> None:
            await engine.update_session(hot, increment_requests=True, add_processing_time=0.001)

        async def get(i: int) -> None:
            await engine.get_session(hot)

        async def create(i: int) -> None:
            await engine.create_session(user_id="bench", tier="enterprise")

        async def track(i: int) -> None:
            await engine.track_usage(hot, "bench", QuotaType.TOKENS, 10)

        # a limit that admits every call: the limiter's own work, each time (an
        # enterprise session without a rule has no limit, and only records activity)
        await engine.set_rate_limit(hot, "bench", 10**9, 60)

        async def rate(i: int) -> None:
            await engine.enforce_rate_limit(hot, "bench")

        # a chat of 1000 messages to read, and the same rows for the raw driver
        history = (await engine.create_session(user_id="bench", tier="enterprise")).session_id
        for start in range(0, 1000, 100):
            await engine.add_messages(
                history,
                [
                    {"role": "user", "content": f"message {k} " + "x" * 80}
                    for k in range(start, start + 100)
                ],
            )
        # the raw driver reads the same rows: a Message's columns, by the same key
        read_history = (
            f"SELECT {', '.join(Message.model_fields)} FROM ctx_messages"
            " WHERE tenant_id = $1 AND session_id = $2 AND chat_id = $3 ORDER BY seq"
        )

        async def add_message(i: int) -> None:
            await engine.add_message(talk, "user", "what is the weather like today?")

        # a chat at its limit: each append trims the oldest message in its transaction
        full = (await engine.create_chat(talk, "full", max_messages=50)).chat_id
        for _ in range(7):
            await engine.add_messages(
                talk, [{"role": "user", "content": "filler"}] * 8, chat_id=full
            )

        async def add_trimming(i: int) -> None:
            await engine.add_message(talk, "user", "what is the weather like today?", chat_id=full)

        async def last_50(i: int) -> None:
            await engine.get_messages(history, limit=50)

        async def all_1000(i: int) -> None:
            await engine.get_messages(history, limit=None)

        async def raw_last_50(i: int) -> None:
            await raw.fetch(read_history + " DESC LIMIT 50", "default", history, "default")

        async def raw_all_1000(i: int) -> None:
            await raw.fetch(read_history, "default", history, "default")

        await engine.set_rate_limit(hot, "bench", 10**9, 60)
        await engine.enforce_rate_limit(hot, "bench")

        # key-value memory: the raw driver writes (INSERT … ON CONFLICT DO UPDATE, the
        # version counted) and reads the same row, by its key
        fact = {"language": "fr", "units": "metric"}
        await engine.remember("preferences", fact, user_id="bench")
        await raw.clone("ctx_memory_items", "bench_memory_items")
        memory_key = (
            "WHERE tenant_id = $1 AND user_id = $2 AND session_id = $3 AND namespace = $4"
            " AND key = $5"
        )
        memory_args = ("default", "bench", "", "default", "preferences")
        memory = Rows(
            "bench_memory_items",
            await raw.read_dict(f"SELECT * FROM ctx_memory_items {memory_key}", *memory_args),
        )
        upsert_memory = (
            memory.sql + " ON CONFLICT (tenant_id, user_id, session_id, namespace, key) DO UPDATE"
            " SET value = excluded.value, version = bench_memory_items.version + 1,"
            " updated_at = excluded.updated_at, expires_at = excluded.expires_at"
        )
        select_memory = f"SELECT * FROM ctx_memory_items {memory_key}"

        # semantic memory: add_memory with its embedding given (384 float32s, as
        # all-MiniLM-L6-v2's) against a raw INSERT of the same row
        vector = [((i * 7919) % 1000) / 1000.0 - 0.5 for i in range(384)]
        await engine.add_memory("the user prefers aisle seats", user_id="bench", embedding=vector)
        await raw.clone("ctx_memories", "bench_memories")
        memories = Rows(
            "bench_memories",
            await raw.read_dict(
                "SELECT * FROM ctx_memories WHERE tenant_id = $1 AND user_id = $2 LIMIT 1",
                "default",
                "bench",
            ),
        )

        async def add_memory(i: int) -> None:
            await engine.add_memory(
                "the user prefers aisle seats", user_id="bench", embedding=vector
            )

        async def raw_add_memory(i: int) -> None:
            now = stamp()
            await raw.write(
                memories.sql,
                *memories.args(memory_id=uuid.uuid4().hex, created_at=now, last_accessed_at=now),
            )

        async def remember(i: int) -> None:
            await engine.remember("preferences", fact, user_id="bench")

        async def recall(i: int) -> None:
            await engine.recall("preferences", user_id="bench")

        async def raw_remember(i: int) -> None:
            await raw.write(upsert_memory, *memory.args(updated_at=stamp()))

        async def raw_recall(i: int) -> None:
            await raw.read(select_memory, *memory_args)

        peers = await peer_plan(engine, url)
        plan = [
            ("update_session", update, "raw UPDATE by key", raw_update),
            ("get_session", get, "raw SELECT by key", raw_select),
            ("create_session", create, INSERT_SESSION, raw_insert_session),
            ("track_usage", track, INSERT_USAGE, raw_insert_usage),
            ("enforce_rate_limit", rate, "raw UPDATE by key", raw_update),
            ("add_message", add_message, "raw INSERT", raw_insert),
            ("add_message, full chat (trims)", add_trimming, "raw INSERT", raw_insert),
            ("get_messages last 50 of 1000", last_50, "raw SELECT 50 rows", raw_last_50),
            ("get_messages all 1000", all_1000, "raw SELECT 1000 rows", raw_all_1000),
            ("remember", remember, UPSERT_MEMORY, raw_remember),
            ("recall", recall, SELECT_MEMORY, raw_recall),
            ("add_memory", add_memory, INSERT_MEMORY, raw_add_memory),
            *peers,
        ]

        # the floor under a call of three statements (track_usage, add_message): the
        # driver running three in one transaction (BEGIN and COMMIT are round trips too)
        async def raw_three(i: int) -> None:
            await raw.transaction(
                [
                    (update_row, update_args(hot)),
                    (usage.sql, new_usage()),
                    (messages.sql, new_message()),
                ]
            )

        # the floor under reading long histories: one Python object per message, built
        # without validation (pydantic's model_construct), as the engine builds them
        history_rows = [
            tuple(m.model_dump().values()) for m in await engine.get_messages(history, limit=None)
        ]

        fields = tuple(Message.model_fields)

        async def build_messages(i: int) -> None:
            [Message.model_construct(**dict(zip(fields, r, strict=True))) for r in history_rows]

        plan.append(("1-statement unit of work", floor, "raw UPDATE by key", raw_update))
        if isinstance(raw, RawPostgres):
            # the same operations against the raw driver on a connection it holds
            async def held_update(i: int) -> None:
                await raw.write_held(update_row, *update_args(hot))

            async def held_select(i: int) -> None:
                await raw.read_held(select_session, "default", hot)

            async def held_last_50(i: int) -> None:
                sql = read_history + " DESC LIMIT 50"
                await raw.held[0].fetch(sql, "default", history, "default")

            async def held_insert(i: int) -> None:
                await raw.write_held(messages.sql, *new_message())

            async def held_insert_session(i: int) -> None:
                await raw.write_held(sessions.sql, *new_session())

            async def held_insert_usage(i: int) -> None:
                await raw.write_held(usage.sql, *new_usage())

            async def held_remember(i: int) -> None:
                await raw.write_held(upsert_memory, *memory.args(updated_at=stamp()))

            async def held_recall(i: int) -> None:
                await raw.read_held(select_memory, *memory_args)

            async def held_add_memory(i: int) -> None:
                now = stamp()
                await raw.write_held(
                    memories.sql,
                    *memories.args(
                        memory_id=uuid.uuid4().hex, created_at=now, last_accessed_at=now
                    ),
                )

            plan += [
                ("update_session", update, HELD_UPDATE, held_update),
                ("get_session", get, "raw SELECT, held conn", held_select),
                ("create_session", create, f"{INSERT_SESSION}, held conn", held_insert_session),
                ("track_usage", track, f"{INSERT_USAGE}, held conn", held_insert_usage),
                ("enforce_rate_limit", rate, HELD_UPDATE, held_update),
                ("add_message", add_message, HELD_INSERT, held_insert),
                ("get_messages last 50 of 1000", last_50, "raw SELECT 50, held conn", held_last_50),
                ("remember", remember, f"{UPSERT_MEMORY}, held conn", held_remember),
                ("recall", recall, f"{SELECT_MEMORY}, held conn", held_recall),
                ("add_memory", add_memory, f"{INSERT_MEMORY}, held conn", held_add_memory),
            ]
            bare = Bare(raw)
            append = bare.op(floors.APPEND, partial(append_params, talk))
            plan += [
                (
                    "update's statement, raw",
                    bare.op(floors.RECORD_ACTIVE, partial(record_params, hot)),
                    "raw UPDATE by key",
                    raw_update,
                ),
                (
                    "rate limit's statement, raw",
                    bare.op(floors.TAKE, partial(take_params, hot, "bench")),
                    "raw UPDATE by key",
                    raw_update,
                ),
                ("add_message's statement, raw", append, "raw INSERT", raw_insert),
                # the floor under the ratio to the OpenAI store
                *[
                    ("add_message's statement, raw", append, base_name, base)
                    for name, _, base_name, base in peers
                    if name == "openai add_items"
                ],
            ]
        plan.append(("raw 3-statement transaction", raw_three, "raw INSERT", raw_insert))
        plan.append(
            ("1000 Message objects, no I/O", build_messages, "raw SELECT 1000 rows", raw_all_1000)
        )
        for name, op, base_name, base in plan:
            if only is not None and only not in name:
                continue
            await raw.maintain()
            results.append(row(name, *await timed_pair(op, base, n), base_name))

        concurrent = f"update_session, {TASKS} tasks"
        floor_name = f"update's statement, raw, {TASKS} tasks"
        if only is not None and only not in concurrent and only not in floor_name:
            return results
        # concurrent: each task updates its own session (its own row for the driver)
        mine = [
            (await engine.create_session(user_id=f"bench-{t}", tier="enterprise")).session_id
            for t in range(TASKS)
        ]
        for t in range(TASKS):
            await raw.write(sessions.sql, *sessions.args(session_id=f"task-{t}"))

        async def update_own(t: int, i: int) -> None:
            await engine.update_session(mine[t], increment_requests=True)

        async def raw_update_own(t: int, i: int) -> None:
            await raw.write_from(t, update_row, *update_args(f"task-{t}"))

        base_name = f"raw UPDATE, {TASKS} tasks"
        if only is None or only in concurrent:
            await raw.maintain()
            pair = await timed_concurrent_pair(update_own, raw_update_own, n)
            results.append(row(concurrent, *pair, base_name))
            if isinstance(raw, RawPostgres):

                async def held_update_own(t: int, i: int) -> None:
                    await raw.write_held(update_row, *update_args(f"task-{t}"), task=t)

                await raw.maintain()
                pair = await timed_concurrent_pair(update_own, held_update_own, n)
                results.append(row(concurrent, *pair, f"{HELD_UPDATE}, {TASKS} tasks"))
        if isinstance(raw, RawPostgres) and (only is None or only in floor_name):
            record = Bare(raw).task_op(
                floors.RECORD_ACTIVE, lambda t, now: record_params(mine[t], now)
            )
            await raw.maintain()
            pair = await timed_concurrent_pair(record, raw_update_own, n)
            results.append(row(floor_name, *pair, base_name))
    return results


#: The parameters of a floor statement, given the time of the call.
Params = Callable[[datetime], dict[str, Any]]


class Bare:
    """The one statements of the hot paths (:mod:`benchmarks.floors`), run by the raw
    driver on its pools with nothing of ctxengine around them: the floors under the
    operations that are one statement on PostgreSQL."""

    def __init__(self, raw: RawPostgres) -> None:
        self.raw = raw

    def op(self, sql: str, params: Params) -> Op:
        """One call of ``sql``."""
        form = floors.positional(sql)

        async def call(i: int) -> None:
            await self.raw.pool.fetch(form.sql, *form.values(params(datetime.now(UTC))))

        return call

    def task_op(self, sql: str, params: Callable[[int, datetime], dict[str, Any]]) -> TaskOp:
        """One call of ``sql`` from task ``t`` (on the pool as wide as the tasks)."""
        form = floors.positional(sql)

        async def call(t: int, i: int) -> None:
            await self.raw.wide.fetch(form.sql, *form.values(params(t, datetime.now(UTC))))

        return call


def guarded(session_id: str, now: datetime, **more: Any) -> dict[str, Any]:
    """The parameters of a statement guarded by the session's state (which session,
    the time, as seconds since the epoch too), and ``more``."""
    return {
        "tenant": "default",
        "sid": session_id,
        "now": now,
        "now_epoch": now.timestamp(),
        "horizon": now + timedelta(seconds=31),
        **more,
    }


def record_params(session_id: str, now: datetime) -> dict[str, Any]:
    """update_session's statement adding one request to an active session."""
    return guarded(session_id, now, requests=1, errors=0, processing_time=0.0)


def append_params(session_id: str, now: datetime) -> dict[str, Any]:
    """add_message's statement appending one user message to the current chat."""
    return guarded(
        session_id,
        now,
        message_id=uuid.uuid4().hex,
        role="user",
        content="what is the weather like today?",
        metadata="{}",
        tokens=None,
    )


def take_params(session_id: str, operation: str, now: datetime) -> dict[str, Any]:
    """enforce_rate_limit's statement taking one call of ``operation`` (the session has
    a rule of its own; the tier's limit is the fallback)."""
    return guarded(
        session_id,
        now,
        operation=operation,
        now_us=int(now.timestamp() * 1_000_000),
        cost=1,
        tier_max_calls=1000,
        tier_window=60.0,
    )


def row(name: str, ours: Stats, baseline: Stats, baseline_name: str) -> dict[str, Any]:
    return {
        "operation": name,
        **ours,
        "baseline": baseline_name,
        "baseline_ops_per_s": baseline["ops_per_s"],
        "ratio": ours["ops_per_s"] / baseline["ops_per_s"],
    }


def async_url(url: str) -> str:
    """The SQLAlchemy asyncio URL of ``url`` (the peers are SQLAlchemy-based too)."""
    if url.startswith("postgresql://"):
        return url.replace("postgresql://", "postgresql+asyncpg://", 1)
    return url


async def peer_plan(engine: ContextEngine, url: str) -> list[tuple[str, Op, str, Op]]:
    """The agent SDKs' own stores doing the same job, where they are installed."""
    return [*await openai_plan(engine, url), *await adk_plan(engine, url)]


async def openai_plan(engine: ContextEngine, url: str) -> list[tuple[str, Op, str, Op]]:
    """One item per ``add_items``: ours against the SDK's ``SQLAlchemySession``."""
    try:
        from agents.extensions.memory.sqlalchemy_session import SQLAlchemySession

        from ctxengine.integrations.openai_agents import ContextEngineSession
    except ImportError:
        return []
    ours = ContextEngineSession(engine, f"openai-{uuid.uuid4().hex[:8]}", tier="enterprise")
    theirs = SQLAlchemySession.from_url(
        f"peer-{uuid.uuid4().hex[:8]}", url=async_url(url), create_tables=True
    )
    item: list[Any] = [{"role": "user", "content": "what is the weather like today?"}]

    async def ours_add(i: int) -> None:
        await ours.add_items(item)

    async def theirs_add(i: int) -> None:
        await theirs.add_items(item)

    return [("openai add_items", ours_add, "OpenAI SQLAlchemySession", theirs_add)]


async def adk_plan(engine: ContextEngine, url: str) -> list[tuple[str, Op, str, Op]]:
    """One event per ``append_event``: ours against ADK's ``DatabaseSessionService``."""
    try:
        from google.adk.events.event import Event
        from google.adk.sessions import DatabaseSessionService
        from google.genai import types

        from ctxengine.integrations.adk import ContextEngineSessionService
    except ImportError:
        return []
    ours = ContextEngineSessionService(engine, tier="enterprise")
    theirs = DatabaseSessionService(db_url=async_url(url))
    app = f"bench-{uuid.uuid4().hex[:8]}"
    our_session = await ours.create_session(app_name=app, user_id="u")
    their_session = await theirs.create_session(app_name=app, user_id="u")
    content = types.Content(role="user", parts=[types.Part(text="what is the weather like?")])

    def event(i: int) -> Event:
        return Event(invocation_id=f"i{i}", author="user", content=content)

    async def ours_append(i: int) -> None:
        await ours.append_event(our_session, event(i))

    async def theirs_append(i: int) -> None:
        await theirs.append_event(their_session, event(i))

    return [("adk append_event", ours_append, "ADK DatabaseSession", theirs_append)]


async def run(
    backend: str, n: int, repeats: int, only: str | None = None
) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    if backend in ("sqlite", "all"):
        with tempfile.TemporaryDirectory() as tmp:
            path = str(Path(tmp) / "bench.db")
            reps = [
                await bench_backend(f"sqlite+aiosqlite:///{path}", RawSQLite(path), n, only)
                for _ in range(repeats)
            ]
            out["sqlite"] = median_of(reps)
    if backend in ("postgres", "all"):
        admin = await asyncpg.connect(PG_SERVER)
        name = f"ctx_bench_{uuid.uuid4().hex[:8]}"
        await admin.execute(f'CREATE DATABASE "{name}"')
        url = PG_SERVER.rsplit("/", 1)[0] + f"/{name}"
        try:
            with database_apart(admin.get_server_pid()) as placement:
                reps = [await bench_backend(url, RawPostgres(url), n, only) for _ in range(repeats)]
            out["postgres"] = median_of(reps)
            PLACEMENT["postgres"] = placement
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.close()
    return out


#: Where each backend's run placed the client and the server (see benchmarks.placement).
PLACEMENT: dict[str, str] = {}


def median_of(reps: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    merged = []
    for rows in zip(*reps, strict=True):
        row = dict(rows[0])
        for key in ("ops_per_s", "p50_ms", "p99_ms", "baseline_ops_per_s", "ratio"):
            row[key] = statistics.median(r[key] for r in rows)
        merged.append(row)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--backend", choices=["sqlite", "postgres", "all"], default="all")
    parser.add_argument("--n", type=int, default=2000, help="calls per operation")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--only", default=None, help="run only the operations whose name contains this"
    )
    parser.add_argument("--json", dest="json_path", default=None, help="write results here")
    args = parser.parse_args()
    results = asyncio.run(run(args.backend, args.n, args.repeats, args.only))
    for backend, rows in results.items():
        where = f" ({PLACEMENT[backend]})" if backend in PLACEMENT else ""
        print(f"\n{backend}: {args.n} calls per operation, median of {args.repeats}{where}")
        print(
            f"{'operation':<30}{'ops/s':>9}{'p50 ms':>9}{'p99 ms':>9}  "
            f"{'baseline':<28}{'ops/s':>9}{'ratio':>7}"
        )
        for r in rows:
            print(
                f"{r['operation']:<30}{r['ops_per_s']:>9.0f}{r['p50_ms']:>9.2f}"
                f"{r['p99_ms']:>9.2f}  {r['baseline']:<28}{r['baseline_ops_per_s']:>9.0f}"
                f"{r['ratio']:>7.2f}"
            )
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
