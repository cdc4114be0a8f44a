"""The scale targets of the performance issue, measured on a store of realistic size.

    python -m benchmarks.scale --backend all --json scale.json
    python -m benchmarks.scale --backend sqlite --sessions 2000 --messages 5000 --expire 500

Per backend, on a fresh store (a temporary SQLite file; a PostgreSQL database created
from ``CTXENGINE_BENCH_PG_URL`` and dropped afterwards):

1. growth: the engine's migrations create the schema, then the store grows in
   ``--steps`` steps to ``--sessions`` sessions and ``--messages`` messages. The rows
   are bulk-inserted with set-based SQL (``generate_series`` / a recursive CTE) into
   the library's own tables, in a helper process, so the engine process's memory is
   the engine's own. Between steps the engine does ordinary calls (get_session,
   add_message, get_messages(limit=50), a list_sessions page) and its RSS is sampled.
2. list_sessions pages of 100 at the start, the middle and the end of the listing:
   the cursor is the session_id of the last session of the previous page (the
   library's keyset cursor), so the middle and end walks start from the id of the
   session at that position, then follow the cursor each page returns.
3. expiring ``--expire`` idle sessions with one cleanup sweep
   (``engine.cleanup_inactive_sessions()``, the public sweep of tenant "default", where
   every bulk session is): seconds, process RSS before, during (peak) and after.
4. a cleanup sweep with nothing to expire, median of several, on the full store.
5. the cost of the guarantees: track_usage with a quota set / without a quota / the
   raw driver inserting one usage row; update_session / a raw UPDATE of the row.
6. update_session and add_message throughput with 1, 2, 4 engine processes (spawned,
   each with its own ContextEngine and several tasks on distinct sessions).

Bulk sessions are created over the 60 days before the run (one per
``59 days / sessions``) and are active. ``--expire`` of them, every n-th one among those
created more than 30 days ago, were last active when created; the others were last
active about two hours ago. The engine runs with a session timeout of 30 days, so the
idle ones are due to expire and no other one expires while the benchmark runs (the
ordinary calls never touch an idle session: a work call would expire it). On
PostgreSQL every growth step ends with CHECKPOINT and ANALYZE, what a server with
autovacuum does on its own. Timings are never asserted by the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import multiprocessing
import os
import random
import resource
import sqlite3
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from benchmarks import wire
from benchmarks.processes import merged, spawn
from benchmarks.timing import Op, raw_pool, summary, timed
from ctxengine import ContextEngine, EngineSettings, QuotaType

PG_SERVER = os.environ.get(
    "CTXENGINE_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)

DAY_MS = 86_400_000
#: Idle seconds before expiry in every engine of this benchmark (see the module doc).
TIMEOUT_S = 30 * 86_400.0
TENANT = "default"
FILLER = "the quick brown fox jumps over the lazy dog, and then over the lazy dog again."
#: Sessions one sweep statement expires (``_EXPIRE_BATCH`` of services/sessions.py).
SWEEP_BATCH = 5000
TARGETS = {"list_p50_ms": 5.0, "sweep_ms": 20.0, "expire_s": 3.0}


# -- the generated data ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Plan:
    """Which rows the bulk generation makes; session ``i`` is the ``i``-th oldest."""

    sessions: int
    messages: int
    expire: int
    now_ms: int
    users: int

    @property
    def base_ms(self) -> int:
        return self.now_ms - 60 * DAY_MS

    @property
    def step_ms(self) -> int:
        return max(1, 59 * DAY_MS // self.sessions)

    def created_ms(self, i: int) -> int:
        return self.base_ms + i * self.step_ms

    def message_count(self, i: int) -> int:
        q, r = divmod(self.messages, self.sessions)
        return q + (1 if i < r else 0)

    def session_id(self, i: int) -> str:
        """UUIDv7-shaped, increasing with ``i`` (its first 48 bits are created_at)."""
        c = self.created_ms(i)
        return f"{c // 65536:08x}-{c % 65536:04x}-7000-8000-{i:012x}"

    def created_at(self, i: int) -> datetime:
        return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=self.created_ms(i))

    @property
    def old(self) -> int:
        """How many sessions were created longer ago than the timeout (plus an hour)."""
        return (self.now_ms - int(TIMEOUT_S * 1000) - 3_600_000 - self.base_ms) // self.step_ms

    @property
    def stride(self) -> int:
        """Every ``stride``-th of the old sessions is idle, ``expire`` of them in all."""
        return max(1, self.old // self.expire) if self.expire else 1

    def is_idle(self, i: int) -> bool:
        return i % self.stride == 0 and i < self.expire * self.stride

    def check(self) -> None:
        if self.sessions < 100:
            raise SystemExit("--sessions must be at least 100")
        if self.expire * self.stride > self.old:
            raise SystemExit("--expire may be at most 45 % of --sessions")


def _sql_parts(dialect: str, plan: Plan) -> dict[str, Callable[..., str]]:
    """SQL expressions of the generated columns, per dialect (all integers are ours)."""
    if dialect == "sqlite":

        def ts(ms: str) -> str:
            return (
                f"(datetime(({ms}) / 1000, 'unixepoch') || printf('.%06d', (({ms}) % 1000) * 1000))"
            )

        def sid(c: str, i: str) -> str:
            return f"printf('%08x-%04x-7000-8000-%012x', ({c}) / 65536, ({c}) % 65536, {i})"

        def mid(i: str, k: str) -> str:
            return f"printf('%08x-%04x-7000-9000-%012x', {k}, 0, {i})"

        def js(doc: str) -> str:
            return f"'{doc}'"

    else:

        def ts(ms: str) -> str:
            return f"(timestamptz 'epoch' + ({ms}) * interval '1 millisecond')"

        def hexpad(x: str, width: int) -> str:
            return f"lpad(to_hex({x}), {width}, '0')"

        def sid(c: str, i: str) -> str:
            return (
                f"({hexpad(f'({c}) / 65536', 8)} || '-' || {hexpad(f'({c}) % 65536', 4)}"
                f" || '-7000-8000-' || {hexpad(i, 12)})"
            )

        def mid(i: str, k: str) -> str:
            return f"({hexpad(k, 8)} || '-0000-7000-9000-' || {hexpad(i, 12)})"

        def js(doc: str) -> str:
            return f"'{doc}'::jsonb"

    return {"ts": ts, "sid": sid, "mid": mid, "js": js}


def growth_sql(dialect: str, plan: Plan, a: int, b: int) -> list[str]:
    """INSERT ... SELECT statements adding sessions [a, b), their chats and messages."""
    p = _sql_parts(dialect, plan)
    ts, sid, mid, js = p["ts"], p["sid"], p["mid"], p["js"]
    q, r = divmod(plan.messages, plan.sessions)
    kmax = q + (1 if r else 0)
    if dialect == "sqlite":
        rows = (
            f"WITH RECURSIVE s(i) AS (SELECT {a} UNION ALL SELECT i + 1 FROM s WHERE i + 1 < {b}), "
            f"g(i, c, n) AS (SELECT i, {plan.base_ms} + i * {plan.step_ms}, {q} + (i < {r}) "
            "FROM s)"
        )
        seq = f", k(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM k WHERE k < {kmax})"
        per_message = "FROM g CROSS JOIN k WHERE k.k <= g.n"  # CROSS JOIN: g outer, in order
    else:
        rows = (
            f"WITH g AS (SELECT i, {plan.base_ms}::bigint + i * {plan.step_ms} AS c, "
            f"{q} + (i < {r})::int AS n FROM generate_series({a}::bigint, {b - 1}::bigint) AS i)"
        )
        seq = ""
        per_message = "FROM g CROSS JOIN LATERAL generate_series(1, g.n) AS k"
    # idle sessions were last active when created (over 30 days ago), the others about
    # two hours ago
    last = (
        f"CASE WHEN i % {plan.stride} = 0 AND i < {plan.expire * plan.stride} THEN c "
        f"ELSE {plan.now_ms} - 7200000 + (i % 3600) * 1000 END"
    )
    sessions = (
        f"{rows} INSERT INTO ctx_sessions (tenant_id, session_id, user_id, tier, status, name, "
        "metadata, tags, preferences, created_at, last_activity, ended_at, expires_at, "
        "request_count, error_count, total_processing_time, current_chat_id, chat_count, "
        "idle_timeout, idle_deadline) "
        f"SELECT '{TENANT}', {sid('c', 'i')}, 'user-' || (i % {plan.users}), 'free', 'active', "
        f"NULL, {js('{}')}, {js('[]')}, {js('{}')}, {ts('c')}, {ts(last)}, NULL, NULL, "
        f"0, 0, 0.0, 'default', 1, {TIMEOUT_S}, ({last}) / 1000.0 + {TIMEOUT_S} FROM g"
    )
    chats = (
        f"{rows} INSERT INTO ctx_chats (tenant_id, session_id, chat_id, name, metadata, "
        "max_messages, created_at, next_seq, message_count) "
        f"SELECT '{TENANT}', {sid('c', 'i')}, 'default', NULL, {js('{}')}, NULL, {ts('c')}, "
        "n, n FROM g"
    )
    content = f"'message ' || k || ' of session ' || i || ': {FILLER}'"
    messages = (
        f"{rows}{seq} INSERT INTO ctx_messages (tenant_id, session_id, chat_id, seq, "
        "message_id, role, content, metadata, tokens, created_at) "
        f"SELECT '{TENANT}', {sid('c', 'i')}, 'default', k, {mid('i', 'k')}, "
        "CASE WHEN k % 2 = 1 THEN 'user' ELSE 'assistant' END, "
        f"{content}, {js('{}')}, 20 + k, {ts('c + k * 1000')} {per_message}"
    )
    return [sessions, chats] + ([messages] if kmax else [])


# -- work done in the helper process (bulk SQL, EXPLAIN) -------------------------------------
def db_task(dialect: str, dsn: str, action: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Run in the helper process: ``grow``, ``analyze`` or ``explain``."""
    if dialect == "sqlite":
        return _sqlite_task(dsn, action, payload)
    return asyncio.run(_pg_task(dsn, action, payload))


def _sqlite_task(path: str, action: str, payload: dict[str, Any]) -> dict[str, Any]:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        # the bulk load's pragmas; the floor runs with the engine's
        bulk = ("synchronous=OFF", "cache_size=-1000000", "temp_store=MEMORY")
        engine = ("synchronous=NORMAL", "foreign_keys=ON")
        for pragma in ("journal_mode=WAL", "busy_timeout=60000"):
            db.execute(f"PRAGMA {pragma}")
        for pragma in engine if action == "floor" else bulk:
            db.execute(f"PRAGMA {pragma}")
        if action == "explain":
            rows = db.execute(
                "EXPLAIN QUERY PLAN " + payload["sql"], tuple(payload["params"])
            ).fetchall()
            return {"plan": "\n".join(f"{r[0]:>3} {r[1]:>3} {r[3]}" for r in rows)}
        started = time.perf_counter()
        timings = []
        changed = 0
        db.execute("BEGIN IMMEDIATE")
        for sql in payload["statements"]:
            t = time.perf_counter()
            changed = db.execute(sql).rowcount
            timings.append(time.perf_counter() - t)
        db.execute("ROLLBACK" if action == "floor" else "COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return {"seconds": time.perf_counter() - started, "statements": timings, "rows": changed}
    finally:
        db.close()


async def _pg_task(dsn: str, action: str, payload: dict[str, Any]) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        if action == "explain":
            tr = conn.transaction()
            await tr.start()
            try:
                rows = await conn.fetch(
                    "EXPLAIN (ANALYZE, BUFFERS) " + payload["sql"], *payload["params"]
                )
            finally:
                await tr.rollback()
            return {"plan": "\n".join(r[0] for r in rows)}
        if action == "floor":
            return await _pg_floor(conn, payload["statements"])
        started = time.perf_counter()
        timings = []
        status = ""
        if action == "analyze":
            for sql in payload["statements"]:
                t = time.perf_counter()
                await conn.execute(sql)
                timings.append(time.perf_counter() - t)
            return {"seconds": time.perf_counter() - started, "statements": timings, "rows": 0}
        # bulk load: the rows are consistent, so the per-row foreign-key triggers are off
        try:
            await conn.execute("SET session_replication_role = replica")
        except asyncpg.InsufficientPrivilegeError:
            pass  # not a superuser: the foreign keys are checked row by row (slower)
        await conn.execute("SET synchronous_commit = off")
        await conn.execute("SET work_mem = '64MB'")
        async with conn.transaction():
            for sql in payload["statements"]:
                t = time.perf_counter()
                status = await conn.execute(sql)
                timings.append(time.perf_counter() - t)
        rows = int(status.rsplit(" ", 1)[-1]) if status else 0
        # write the load back now, so that the engine's next calls do not pay for it
        t = time.perf_counter()
        try:
            await conn.execute("CHECKPOINT")
        except asyncpg.InsufficientPrivilegeError:
            pass
        timings.append(time.perf_counter() - t)
        # what autovacuum does after a tenth more rows (it may be off on a test server):
        # without statistics the engine's cached plans can be those of a tiny table
        t = time.perf_counter()
        await conn.execute("ANALYZE ctx_sessions, ctx_chats, ctx_messages")
        timings.append(time.perf_counter() - t)
        return {"seconds": time.perf_counter() - started, "statements": timings, "rows": rows}
    finally:
        await conn.close()


async def _checkpoint(conn: asyncpg.Connection) -> None:
    try:
        await conn.execute("CHECKPOINT")
    except asyncpg.InsufficientPrivilegeError:
        pass


async def _pg_floor(conn: asyncpg.Connection, statements: list[str]) -> dict[str, Any]:
    """The statements' own time, each row's change written to the WAL after a
    checkpoint (as the sweep's are), rolled back; then the table as it was (VACUUM)."""
    await _checkpoint(conn)
    timings = []
    changed = 0
    tr = conn.transaction()
    await tr.start()
    try:
        for sql in statements:
            t = time.perf_counter()
            status = await conn.execute(sql)
            timings.append(time.perf_counter() - t)
            changed = int(status.rsplit(" ", 1)[-1])
    finally:
        await tr.rollback()
    await conn.execute("VACUUM ctx_sessions")
    await _checkpoint(conn)
    return {"seconds": sum(timings), "statements": timings, "rows": changed}


class Helper:
    """One spawned helper process that runs :func:`db_task`."""

    def __init__(self, dialect: str, dsn: str) -> None:
        self.dialect = dialect
        self.dsn = dsn
        self.pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))

    async def __call__(self, action: str, **payload: Any) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.pool, db_task, self.dialect, self.dsn, action, payload
        )

    def close(self) -> None:
        self.pool.shutdown()


# -- measuring --------------------------------------------------------------------------------
def rss_mb() -> float:
    """Resident set size of this process now, in MB (VmRSS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return maxrss_mb()


def maxrss_mb() -> float:
    """Peak resident set size of this process so far, in MB (getrusage)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def peak_rss(period: float = 0.005) -> Iterator[list[tuple[float, float]]]:
    """Sample RSS in a thread while the block runs: (seconds since the start, MB)."""
    started = time.perf_counter()
    series = [(0.0, rss_mb())]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(period):
            series.append((time.perf_counter() - started, rss_mb()))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield series
    finally:
        stop.set()
        thread.join()
        series.append((time.perf_counter() - started, rss_mb()))


def engine_settings() -> EngineSettings:
    return EngineSettings(auto_cleanup=False, session_timeout=TIMEOUT_S)


# -- 1. growth, with the engine's memory sampled ------------------------------------------------
async def ordinary_calls(
    engine: ContextEngine, plan: Plan, upto: int, rng: random.Random, rounds: int
) -> dict[str, float]:
    """get_session, add_message, get_messages(50), a list_sessions page, on random
    sessions among the first ``upto`` (never the ones ``verify`` checks, nor the idle
    ones, which a work call would expire); p50 in ms."""
    times: dict[str, list[float]] = {
        "get_session": [],
        "add_message": [],
        "get_messages": [],
        "list_page": [],
    }

    def pick() -> str:
        while True:
            i = rng.randrange(upto)
            if i % 7 != 3 and not plan.is_idle(i):
                return plan.session_id(i)

    for _ in range(rounds):
        calls: list[tuple[str, Awaitable[Any]]] = [
            ("get_session", engine.get_session(pick())),
            ("add_message", engine.add_message(pick(), "user", "what is the weather like?")),
            ("get_messages", engine.get_messages(pick(), limit=50)),
            ("list_page", engine.list_sessions(limit=100, cursor=pick())),
        ]
        for name, call in calls:
            t = time.perf_counter()
            await call
            times[name].append(time.perf_counter() - t)
    return {name: summary(values)["p50_ms"] for name, values in times.items()}


async def grow(
    engine: ContextEngine, helper: Helper, plan: Plan, steps: int, rounds: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    rng = random.Random(7)
    samples: list[dict[str, Any]] = [
        {"sessions": 0, "messages": 0, "rss_mb": rss_mb(), "maxrss_mb": maxrss_mb()}
    ]
    bulk_steps = []
    bulk_seconds = 0.0
    bounds = [plan.sessions * s // steps for s in range(steps + 1)]
    for a, b in itertools.pairwise(bounds):
        done = await helper("grow", statements=growth_sql(helper.dialect, plan, a, b))
        bulk_seconds += done["seconds"]
        messages = _messages_below(plan, b)
        bulk_steps.append(
            {
                "sessions": b,
                "messages": messages,
                "seconds": done["seconds"],
                "statements_s": [round(s, 3) for s in done["statements"]],
            }
        )
        p50 = await ordinary_calls(engine, plan, b, rng, rounds)
        samples.append(
            {
                "sessions": b,
                "messages": messages,
                "rss_mb": rss_mb(),
                "maxrss_mb": maxrss_mb(),
                "p50_ms": p50,
            }
        )
        print(
            f"  grown to {b:,} sessions / {messages:,} messages "
            f"(step {done['seconds']:.1f} s), RSS {samples[-1]['rss_mb']:.1f} MB",
            flush=True,
        )
    analyzed = 0.0
    if helper.dialect == "postgresql":
        # autovacuum (off on some servers) would have analyzed the tables by now
        analyzed = (
            await helper(
                "analyze",
                statements=[
                    "VACUUM ANALYZE ctx_sessions",
                    "VACUUM ANALYZE ctx_chats",
                    "VACUUM ANALYZE ctx_messages",
                ],
            )
        )["seconds"]
    after_first = samples[1]["rss_mb"]
    last = samples[-1]["rss_mb"]
    bulk = {
        "seconds": bulk_seconds,
        "vacuum_analyze_seconds": analyzed,
        "sessions_per_s": plan.sessions / bulk_seconds,
        "messages_per_s": plan.messages / bulk_seconds,
        "steps": bulk_steps,
    }
    memory = {
        "samples": samples,
        "growth_after_first_step_mb": last - after_first,
        "max_minus_min_after_first_step_mb": max(s["rss_mb"] for s in samples[1:])
        - min(s["rss_mb"] for s in samples[1:]),
        # flat: at most 16 MB (or 10 %) more at the end than after the first tenth
        "flat": last - after_first <= max(16.0, 0.1 * after_first),
    }
    return bulk, memory


def _messages_below(plan: Plan, b: int) -> int:
    q, r = divmod(plan.messages, plan.sessions)
    return q * b + min(b, r)


async def verify(engine: ContextEngine, plan: Plan) -> dict[str, Any]:
    """Read a few bulk rows back through the public API."""
    picked = sorted(
        i
        for i in {j - (j % 7) + 3 for j in (0, 7, 14, plan.sessions // 2, plan.sessions - 8)}
        if not plan.is_idle(i)
    )
    for i in picked:
        sid = plan.session_id(i)
        session = await engine.get_session(sid)
        assert session is not None, sid
        assert session.status == "active" and session.is_active, session
        assert session.created_at == plan.created_at(i), (session.created_at, plan.created_at(i))
        assert session.current_chat_id == "default" and session.tenant_id == TENANT
        assert not session.is_expired(TIMEOUT_S)
        n = plan.message_count(i)
        assert await engine.count_messages(sid) == n
        history = await engine.get_messages(sid, limit=50)
        assert [m.seq for m in history] == list(range(max(1, n - 49), n + 1)), history
        assert all(m.created_at > session.created_at for m in history)
        chats = await engine.list_chats(sid)
        assert [c.chat_id for c in chats] == ["default"]
    # a write through the engine continues the bulk sequence numbers
    i = picked[-1]
    added = await engine.add_message(plan.session_id(i), "assistant", "checked")
    assert added.seq == plan.message_count(i) + 1, added
    first = await engine.list_sessions(limit=3)
    assert first[0].session_id == plan.session_id(plan.sessions - 1), first[0]
    total = await engine.count_sessions()
    assert total == plan.sessions, total
    idle = await engine.get_session(plan.session_id(0))
    assert idle is not None and idle.status == "active" and idle.is_expired(TIMEOUT_S), idle
    return {"sessions_checked": len(picked) + 1, "count_sessions": total, "ok": True}


# -- 2. list_sessions pages -------------------------------------------------------------------
async def list_pages(
    engine: ContextEngine, helper: Helper, plan: Plan, walk: int, rounds: int
) -> dict[str, Any]:
    """Walk ``walk`` consecutive pages (following the cursor) from three positions,
    ``rounds`` times each; every page is timed."""
    n = plan.sessions
    starts = {
        "start": None,
        "middle": plan.session_id(n // 2),
        # the walk from here ends exactly with the last page of the listing
        "end": plan.session_id(min(n - 1, 100 * walk)),
    }
    out: dict[str, Any] = {}
    for name, first_cursor in starts.items():
        for _ in range(5):  # warm-up
            await engine.list_sessions(limit=100, cursor=first_cursor)
        latencies = []
        for _ in range(rounds):
            cursor = first_cursor
            for _ in range(walk):
                t = time.perf_counter()
                page = await engine.list_sessions(limit=100, cursor=cursor)
                latencies.append(time.perf_counter() - t)
                if not page:
                    break
                if cursor is not None:  # keyset: the page starts right after the cursor
                    expected = plan.session_id(int(cursor.rsplit("-", 1)[1], 16) - 1)
                    assert page[0].session_id == expected, (page[0].session_id, expected)
                cursor = page[-1].session_id
        out[name] = summary(latencies)
    out["plan_middle_page"] = await explain(
        engine, helper, lambda: engine.list_sessions(limit=100, cursor=starts["middle"])
    )
    worst = max(out[k]["p50_ms"] for k in starts)
    out["pages_per_walk"] = walk
    out["target_p50_ms"] = TARGETS["list_p50_ms"]
    out["met"] = worst < TARGETS["list_p50_ms"]
    return out


# -- 3. expiring idle sessions, 4. an empty sweep -----------------------------------------------
async def expire_idle(engine: ContextEngine, helper: Helper, plan: Plan) -> dict[str, Any]:
    idle = await engine.count_sessions(status="active", idle_for=TIMEOUT_S)
    first_batch = await explain(
        engine, helper, engine.tenant(PROBE).cleanup_inactive_sessions, probe=True
    )
    # the floor: the database expiring the same rows with one UPDATE (rolled back, then
    # the table vacuumed and checkpointed, so that the sweep meets it as the floor did)
    floor = await helper("floor", statements=[expire_all_sql(helper.dialect)])
    gc.collect()
    before, max_before = rss_mb(), maxrss_mb()
    with peak_rss() as series:
        t = time.perf_counter()
        expired = await engine.cleanup_inactive_sessions()
        seconds = time.perf_counter() - t
    after, max_after = rss_mb(), maxrss_mb()
    remaining = await engine.count_sessions(status="active")
    peak = max(rss for _, rss in series)
    # flat: no growth over the second half of the sweep (a batch's working set is fine,
    # memory that grows with the number expired is not)
    half = [rss for at, rss in series if at >= seconds / 2] or [after]
    second_half = max(half) - min(half)
    batches = expired // SWEEP_BATCH + 1
    return {
        "made_idle": idle,
        "plan_first_batch": first_batch,
        "expired": expired,
        "active_after": remaining,
        "seconds": seconds,
        "rss_before_mb": before,
        "rss_peak_mb": peak,
        "rss_growth_second_half_mb": second_half,
        "rss_series_mb": [
            (round(at, 3), round(rss, 1)) for at, rss in series[:: max(1, len(series) // 40)]
        ],
        # with fewer batches the second half is one batch's working set: no verdict
        "memory_flat": second_half <= 2.0 if batches >= 4 else None,
        "rss_after_mb": after,
        "maxrss_before_mb": max_before,
        "maxrss_after_mb": max_after,
        "floor_s": floor["seconds"],
        "floor_rows": floor["rows"],
        "target_s": TARGETS["expire_s"],
        "met": expired == plan.expire and seconds < TARGETS["expire_s"],
    }


def expire_all_sql(dialect: str) -> str:
    """One UPDATE expiring every idle session, found as the sweep finds them (the range
    of the ``(status, idle_bucket)`` index up to now's bucket, then the deadline)."""
    now = datetime.now(UTC)
    epoch = now.timestamp()
    bucket = int(epoch // 10)
    if dialect == "sqlite":
        at = f"'{now.strftime('%Y-%m-%d %H:%M:%S.%f')}'"
    else:
        at = f"'{now.isoformat()}'::timestamptz"
    return (
        f"UPDATE ctx_sessions SET status = 'expired', ended_at = {at} WHERE status = 'active' "
        f"AND idle_bucket <= {bucket} AND idle_deadline < {epoch!r}"
    )


async def empty_sweeps(engine: ContextEngine, helper: Helper, repeats: int) -> dict[str, Any]:
    """Sweeps that find nothing, right after the expiry; on PostgreSQL again after a
    VACUUM (the expired rows' old index entries stay until one runs)."""

    async def median_of_sweeps() -> tuple[float, list[float]]:
        await engine.cleanup_inactive_sessions()  # warm-up
        samples = []
        for _ in range(repeats):
            t = time.perf_counter()
            assert await engine.cleanup_inactive_sessions() == 0
            samples.append((time.perf_counter() - t) * 1000)
        return statistics.median(samples), samples

    median, samples = await median_of_sweeps()
    out: dict[str, Any] = {
        "median_ms": median,
        "samples_ms": [round(x, 3) for x in samples],
        "cleanup_inactive_sessions_median_ms": median,  # the same call (kept for old readers)
        "plan": await explain(engine, helper, engine.cleanup_inactive_sessions),
        "target_ms": TARGETS["sweep_ms"],
        "met": median < TARGETS["sweep_ms"],
    }
    if helper.dialect == "postgresql":
        await helper("analyze", statements=["VACUUM ctx_sessions"])
        after, samples = await median_of_sweeps()
        out["after_vacuum_median_ms"] = after
        out["after_vacuum_samples_ms"] = [round(x, 3) for x in samples]
        out["after_vacuum_plan"] = await explain(engine, helper, engine.cleanup_inactive_sessions)
        out["after_vacuum_met"] = after < TARGETS["sweep_ms"]
    return out


#: A tenant with no sessions: a sweep of it runs the statements a sweep of "default"
#: runs and changes nothing (their plans, on the data as it is, are the dry run's).
PROBE = "bench-probe"


async def explain(
    engine: ContextEngine,
    helper: Helper,
    call: Callable[[], Awaitable[Any]],
    *,
    probe: bool = False,
) -> str:
    """EXPLAIN of the SELECT/UPDATE statements ``call`` runs, captured at the driver
    (:mod:`benchmarks.wire`) and run again by the helper (PostgreSQL: EXPLAIN ANALYZE
    in a rolled-back transaction; SQLite: EXPLAIN QUERY PLAN). With ``probe``, ``call``
    runs on tenant :data:`PROBE` and its statements are explained for tenant
    "default": the plan of the data as it is now, nothing written."""
    with wire.capture() as sent:
        await call()
    captured: list[tuple[str, Any]] = []
    for sql, params in sent:
        if not sql.lstrip().upper().startswith(("SELECT", "UPDATE", "WITH")):
            continue
        if probe:
            sql = sql.replace(f"'{PROBE}'", "'default'")
            params = ["default" if p == PROBE else p for p in params]
        captured.append((sql, params))
    parts = []
    for sql, params in captured:
        try:
            explained = await helper("explain", sql=sql, params=list(params or ()))
            parts.append(f"{sql}\n{explained['plan']}")
        except Exception as exc:  # a plan is a diagnostic: never fail the run for it
            parts.append(f"{sql}\n(EXPLAIN failed: {exc!r})")
    return "\n\n".join(parts)


# -- 5. the cost of the guarantees ---------------------------------------------------------------
class RawDriver:
    """The driver itself on the library's tables: asyncpg (autocommit) or sqlite3 with
    the engine's pragmas and one ``BEGIN IMMEDIATE … COMMIT`` per write."""

    def __init__(self, dialect: str, dsn: str) -> None:
        self.dialect = dialect
        self.dsn = dsn
        self.db: sqlite3.Connection | None = None
        self.pool: asyncpg.Pool | None = None

    async def __aenter__(self) -> RawDriver:
        if self.dialect == "sqlite":
            self.db = sqlite3.connect(self.dsn, isolation_level=None)
            for pragma in (
                "journal_mode=WAL",
                "synchronous=NORMAL",
                "busy_timeout=30000",
                "foreign_keys=ON",
            ):
                self.db.execute(f"PRAGMA {pragma}")
        else:
            self.pool = await raw_pool(self.dsn, 2)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.db is not None:
            self.db.close()
        if self.pool is not None:
            await self.pool.close()

    async def write(self, sql: str, *args: Any) -> None:
        if self.db is not None:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute(sql, args)
            self.db.execute("COMMIT")
        else:
            assert self.pool is not None
            await self.pool.execute(sql, *args)

    def ts(self, value: datetime) -> Any:
        if self.db is not None:  # the engine's SQLite text format
            return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
        return value


async def guarantees(engine: ContextEngine, dialect: str, dsn: str, n: int, repeats: int) -> Any:
    quota = (await engine.create_session(user_id="bench-quota", tier="enterprise")).session_id
    await engine.set_quota(quota, QuotaType.TOKENS, 10**15)
    free = (await engine.create_session(user_id="bench-free", tier="enterprise")).session_id
    hot = (await engine.create_session(user_id="bench-hot", tier="enterprise")).session_id
    raw_hot = (await engine.create_session(user_id="bench-raw", tier="enterprise")).session_id
    p = "?" if dialect == "sqlite" else "$"

    def arg(k: int) -> str:
        return "?" if p == "?" else f"${k}"

    json_empty = "'{}'" if dialect == "sqlite" else "'{}'::jsonb"
    insert_usage = (
        "INSERT INTO ctx_usage_records (tenant_id, record_id, session_id, user_id, operation, "
        f"resource_type, amount, metadata, created_at) VALUES ('{TENANT}', {arg(1)}, {arg(2)}, "
        f"'bench-raw', 'bench', 'tokens', 10, {json_empty}, {arg(3)})"
    )
    update_row = (
        "UPDATE ctx_sessions SET request_count = request_count + 1, "
        f"total_processing_time = total_processing_time + 0.001, last_activity = {arg(1)} "
        f"WHERE tenant_id = '{TENANT}' AND session_id = {arg(2)}"
    )
    async with RawDriver(dialect, dsn) as raw:

        async def usage_quota(i: int) -> None:
            await engine.track_usage(quota, "bench", QuotaType.TOKENS, 10)

        async def usage_free(i: int) -> None:
            await engine.track_usage(free, "bench", QuotaType.TOKENS, 10)

        async def raw_usage(i: int) -> None:
            now = raw.ts(datetime.now(UTC))
            await raw.write(insert_usage, str(uuid.uuid4()), raw_hot, now)

        async def update(i: int) -> None:
            await engine.update_session(hot, increment_requests=True, add_processing_time=0.001)

        async def raw_update(i: int) -> None:
            await raw.write(update_row, raw.ts(datetime.now(UTC)), raw_hot)

        plan: list[tuple[str, Op]] = [
            ("track_usage, quota set", usage_quota),
            ("track_usage, no quota", usage_free),
            ("raw INSERT of a usage row", raw_usage),
            ("update_session", update),
            ("raw UPDATE of the session row", raw_update),
        ]
        runs: dict[str, list[dict[str, float]]] = {name: [] for name, _ in plan}
        for _ in range(repeats):
            for name, op in plan:
                runs[name].append(await timed(op, n))
    out: dict[str, Any] = {}
    for name, results in runs.items():
        out[name] = {
            key: statistics.median(r[key] for r in results)
            for key in ("ops_per_s", "p50_ms", "p99_ms")
        }
    out["calls"] = n
    out["repeats"] = repeats
    return out


# -- 6. several engine processes ---------------------------------------------------------------
def multiprocess(url: str, procs: list[int], tasks: int, seconds: float) -> dict[str, Any]:
    """update_session and add_message from ``procs`` spawned engine processes of
    ``tasks`` tasks each (benchmarks/processes.py's workers, one pooled connection per
    task), on distinct sessions."""
    ops = ["update_session", "add_message"]
    out: dict[str, Any] = {"tasks_per_process": tasks, "seconds": seconds}
    per_count = {
        count: spawn(
            url,
            count,
            tasks=tasks,
            pool_size=tasks,
            seconds=seconds,
            operations=ops,
            settings={"session_timeout": TIMEOUT_S},
        )
        for count in procs
    }
    for op in ops:
        rows = []
        for count, answers in per_count.items():
            stats = merged(answers, op)[1].stats()
            rows.append(
                {
                    "processes": count,
                    "ops_per_s": stats["ops_per_s"],
                    "p99_ms": stats["p99_ms"],
                    "ops": stats["calls"],
                }
            )
        base = rows[0]["ops_per_s"] if rows and rows[0]["processes"] == 1 else None
        for row in rows:
            row["scaling_vs_1"] = None if base is None else row["ops_per_s"] / base
        out[op] = rows
    return out


# -- one backend -------------------------------------------------------------------------------
async def run_backend(dialect: str, url: str, dsn: str, args: argparse.Namespace) -> dict[str, Any]:
    plan = Plan(
        sessions=args.sessions,
        messages=args.messages,
        expire=args.expire,
        now_ms=int(time.time()) * 1000,
        users=max(1, args.sessions // 100),
    )
    plan.check()
    helper = Helper(dialect, dsn)
    started = time.perf_counter()
    out: dict[str, Any] = {"sizes": asdict(plan), "cpu_count": os.cpu_count(), "loadavg": {}}

    def section(name: str) -> None:
        """Announce a part; the 1-minute load average is kept (the machine may be shared)."""
        out["loadavg"][name] = os.getloadavg()[0]
        print(f"{dialect}: {name} (load average {out['loadavg'][name]:.2f})", flush=True)

    try:
        async with ContextEngine(url, settings=engine_settings()) as engine:  # migrates
            section("growth")
            out["bulk"], out["memory_growth"] = await grow(
                engine, helper, plan, args.steps, args.rounds
            )
            out["verify"] = await verify(engine, plan)
            walk = max(1, min(args.pages, plan.sessions // 300))
            section("list_sessions")
            out["list_sessions"] = await list_pages(engine, helper, plan, walk, args.walks)
            section("expire_idle")
            out["expire_idle"] = await expire_idle(engine, helper, plan)
            section("sweep_nothing_to_expire")
            out["sweep_nothing_to_expire"] = await empty_sweeps(engine, helper, args.sweeps)
            section("guarantees")
            out["guarantees"] = await guarantees(engine, dialect, dsn, args.ops, args.repeats)
    finally:
        helper.close()
    if args.procs:
        section("multiprocess")
        out["multiprocess"] = multiprocess(url, args.procs, args.proc_tasks, args.proc_seconds)
    else:
        out["multiprocess"] = {"skipped": True}
    section("done")
    out["total_seconds"] = time.perf_counter() - started
    return out


def _size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir()) / 2**20


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.backend in ("sqlite", "all"):
        with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmp:
            path = str(Path(tmp) / "scale.db")
            out["sqlite"] = await run_backend("sqlite", f"sqlite+aiosqlite:///{path}", path, args)
            out["sqlite"]["db_file_mb"] = _size_mb(Path(tmp))
        report("sqlite", out["sqlite"])
    if args.backend in ("postgres", "all"):
        admin = await asyncpg.connect(PG_SERVER)
        name = f"ctx_scale_{uuid.uuid4().hex[:8]}"
        await admin.execute(f'CREATE DATABASE "{name}"')
        dsn = PG_SERVER.rsplit("/", 1)[0] + f"/{name}"
        try:
            out["postgres"] = await run_backend("postgresql", dsn, dsn, args)
            size = await admin.fetchval("SELECT pg_database_size($1)", name)
            out["postgres"]["db_size_mb"] = size / 2**20
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.close()
        report("postgres", out["postgres"])
    return out


# -- the printed table --------------------------------------------------------------------------
def _verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def _line(name: str, result: str = "", target: str = "", verdict: str = "") -> None:
    print(f"{name:<44}{result:<46}{target:<14}{verdict}")


def report(backend: str, r: dict[str, Any]) -> None:
    s = r["sizes"]
    b = r["bulk"]
    analyzed = b["vacuum_analyze_seconds"]
    print(
        f"\n== {backend}: {s['sessions']:,} sessions, {s['messages']:,} messages, "
        f"{s['expire']:,} to expire; bulk generation {b['seconds']:.1f} s "
        f"({b['sessions_per_s']:,.0f} sessions/s, {b['messages_per_s']:,.0f} messages/s)"
        + (f" + VACUUM ANALYZE {analyzed:.1f} s" if analyzed else "")
    )
    load = ", ".join(f"{k} {v:.1f}" for k, v in r["loadavg"].items())
    print(f"1-minute load average ({r['cpu_count']} CPUs) at each part: {load}")
    _line("measurement", "result", "target", "verdict")
    ls = r["list_sessions"]
    for pos in ("start", "middle", "end"):
        row = ls[pos]
        _line(
            f"list_sessions page of 100, {pos}",
            f"p50 {row['p50_ms']:.2f} ms  p99 {row['p99_ms']:.2f} ms  (n={row['n']})",
            "p50 < 5 ms",
            _verdict(row["p50_ms"] < TARGETS["list_p50_ms"]),
        )
    sw = r["sweep_nothing_to_expire"]
    _line(
        "cleanup sweep, nothing to expire",
        f"median {sw['median_ms']:.2f} ms",
        "< 20 ms",
        _verdict(sw["met"]),
    )
    if "after_vacuum_median_ms" in sw:
        _line(
            "  the same after VACUUM ctx_sessions",
            f"median {sw['after_vacuum_median_ms']:.2f} ms",
            "< 20 ms",
            _verdict(sw["after_vacuum_met"]),
        )
    ex = r["expire_idle"]
    _line(
        f"expire {ex['expired']:,} idle sessions (one sweep)",
        f"{ex['seconds']:.2f} s",
        "< 3 s",
        _verdict(ex["met"]),
    )
    _line(
        "  floor: one raw UPDATE of the same rows",
        f"{ex['floor_s']:.2f} s ({ex['floor_rows']:,} rows; the sweep "
        f"{ex['seconds'] / ex['floor_s']:.2f}x)",
    )
    _line(
        "  RSS before / peak / after",
        f"{ex['rss_before_mb']:.1f} / {ex['rss_peak_mb']:.1f} / {ex['rss_after_mb']:.1f} MB "
        f"(2nd half {ex['rss_growth_second_half_mb']:+.1f})",
        "flat",
        "n/a (< 4 batches)" if ex["memory_flat"] is None else _verdict(ex["memory_flat"]),
    )
    mg = r["memory_growth"]
    _line(
        "engine RSS while growing, MB (0..100 %)",
        ", ".join(f"{x['rss_mb']:.0f}" for x in mg["samples"]),
        "flat",
        _verdict(mg["flat"]),
    )
    _line("  growth after the first step", f"{mg['growth_after_first_step_mb']:+.1f} MB")
    for op in ("get_session", "add_message", "get_messages", "list_page"):
        _line(
            f"  p50 ms while growing: {op}",
            ", ".join(f"{x['p50_ms'][op]:.2f}" for x in mg["samples"][1:]),
        )
    g = r["guarantees"]
    print(f"{'cost of the guarantees':<44}{'ops/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for name in (
        "track_usage, quota set",
        "track_usage, no quota",
        "raw INSERT of a usage row",
        "update_session",
        "raw UPDATE of the session row",
    ):
        row = g[name]
        print(
            f"{'  ' + name:<44}{row['ops_per_s']:>10,.0f}"
            f"{row['p50_ms']:>10.2f}{row['p99_ms']:>10.2f}"
        )
    mp = r["multiprocess"]
    if mp.get("skipped"):
        return
    print(
        f"{'engine processes, ' + str(mp['tasks_per_process']) + ' tasks each':<44}"
        f"{'procs':>10}{'ops/s':>10}{'scaling':>10}"
    )
    for op in ("update_session", "add_message"):
        for row in mp[op]:
            scaling = row["scaling_vs_1"]
            shown = "" if scaling is None else f"{scaling:.2f}x"
            print(f"{'  ' + op:<44}{row['processes']:>10}{row['ops_per_s']:>10,.0f}{shown:>10}")


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--backend", choices=["sqlite", "postgres", "all"], default="all")
    parser.add_argument("--sessions", type=int, default=1_000_000)
    parser.add_argument("--messages", type=int, default=10_000_000)
    parser.add_argument("--expire", type=int, default=100_000, help="idle sessions to expire")
    parser.add_argument("--steps", type=int, default=10, help="growth steps (RSS samples)")
    parser.add_argument("--rounds", type=int, default=100, help="ordinary calls per step")
    parser.add_argument("--pages", type=int, default=50, help="pages per cursor walk")
    parser.add_argument("--walks", type=int, default=4, help="walks per listing position")
    parser.add_argument("--sweeps", type=int, default=11, help="empty sweeps timed")
    parser.add_argument("--ops", type=int, default=2000, help="calls per guarantee measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--procs",
        type=lambda s: [int(x) for x in s.split(",") if x.strip()],
        default=[1, 2, 4],
        help="engine process counts, comma-separated ('' skips)",
    )
    parser.add_argument("--proc-tasks", type=int, default=4)
    parser.add_argument("--proc-seconds", type=float, default=5.0)
    parser.add_argument("--tmpdir", default=None, help="where the SQLite file goes")
    parser.add_argument("--json", dest="json_path", default=None, help="write results here")
    args = parser.parse_args()
    wire.watch()  # before any engine opens: the SQLite connections, for EXPLAIN
    results = asyncio.run(run(args))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
