"""A longer chaos run: engine processes under random database faults, then invariants.

    python -m benchmarks.chaos --backend postgres --processes 2 --tasks 4 --minutes 0.5
    python -m benchmarks.chaos --backend sqlite --processes 2 --tasks 4 --minutes 0.5
    python -m benchmarks.chaos --url postgresql://postgres@127.0.0.1:5432/mydb ...

Not part of CI (tests/faults/ proves each fault in isolation, in minutes); this runs
them at random, for as long as asked, against one database:

- ``--processes`` OS processes, each with its own ContextEngine and ``--tasks`` tasks
  making mixed calls on sessions of their own: update_session(increment_requests=True),
  track_usage (under a quota), add_message, enforce_rate_limit (under a tight rule),
  create_session and end_session. Some calls are cancelled at random (an
  ``asyncio.timeout`` of 0-20 ms); how long each took to return control after its
  deadline is recorded (the contract: within 50 ms).
- each acknowledged write is logged (a JSON lines file per process); a write whose
  outcome is unknown (a StorageError, a cancellation) is logged as uncertain; every
  error is counted by class.
- meanwhile a fault injector: on PostgreSQL (through an admin connection to the
  server's ``postgres`` database) it terminates some or all of the workers' backends
  (``pg_terminate_backend``) or refuses connections for a while (``ALTER DATABASE …
  ALLOW_CONNECTIONS false``, every backend terminated, then allowed again); on SQLite
  another process holds the write lock (``BEGIN IMMEDIATE``) for a random while.

At the end, checked in the database: every acknowledged write is there (sessions,
ends, messages), requests counted = acknowledged increments (plus at most the
uncertain ones), usage counters = their records, quota never overshot, message
sequences gapless per chat with the chat's count equal to its messages, and no raw
(non-ctxengine) exception escaped a call. The exit status is 1 if any of these fails.
The database is one the run creates (a temporary SQLite file, a PostgreSQL database
on ``CTXENGINE_BENCH_PG_URL`` dropped afterwards) unless ``--url`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import sqlite3
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from benchmarks.timing import summary
from ctxengine import ContextEngine, EngineSettings, QuotaType
from ctxengine.errors import (
    ContextEngineError,
    QuotaExceededError,
    RateLimitError,
    SessionNotActiveError,
    StorageError,
)

PG_SERVER = os.environ.get(
    "CTXENGINE_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
#: The tokens quota of each worker session, and the largest amount tracked per call.
QUOTA = 400.0
MAX_AMOUNT = 20
#: The rate limit of each worker session: calls of "chaos" per window (seconds).
RATE_CALLS, RATE_WINDOW = 20, 1.0
#: Share of the calls cancelled at random, and their deadline (seconds).
CANCEL_SHARE, CANCEL_WITHIN = 0.15, 0.02
#: The contract: a cancelled call returns control within this (seconds).
CANCEL_CONTRACT = 0.050
#: Refusals a call may meet that are the engine doing its job, not failures.
REFUSALS = (QuotaExceededError, RateLimitError, SessionNotActiveError)


#: Seconds after the faults end within which the engine must work again.
RECOVERY = 30


def settings() -> EngineSettings:
    # short timeouts: a call meets a refused or killed connection often here
    return EngineSettings(auto_cleanup=False, connect_timeout=2, statement_timeout=5)


def _where(exc: BaseException) -> str:
    """Where in ctxengine ``exc`` was raised (its innermost frame there)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "ctxengine" in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" (at {Path(f.filename).name}:{f.lineno} {f.name})"


# -- the workers -----------------------------------------------------------------------------
@dataclass
class Tally:
    """What one process saw."""

    errors: Counter[str] = field(default_factory=Counter)
    refusals: Counter[str] = field(default_factory=Counter)
    raw: list[str] = field(default_factory=list)
    cancel_latencies: list[float] = field(default_factory=list)
    calls: int = 0
    cancelled: int = 0
    #: the first message of each error class
    samples: dict[str, str] = field(default_factory=dict)


class Worker:
    def __init__(self, engine: ContextEngine, log: Any, tally: Tally, deadline: float) -> None:
        self.engine = engine
        self.log = log
        self.tally = tally
        self.deadline = deadline

    def ack(self, **entry: Any) -> None:
        self.log.write(json.dumps(entry) + "\n")

    async def call(self, kind: str, call: Awaitable[Any], *, cancel: bool) -> tuple[str, Any]:
        """("ok", result) | ("refused", None) | ("uncertain", None):
        the call, maybe under a random deadline; every error counted by its class."""
        loop = asyncio.get_running_loop()
        self.tally.calls += 1
        at = loop.time() + random.uniform(0, CANCEL_WITHIN) if cancel else None
        try:
            async with asyncio.timeout_at(at):
                return "ok", await call
        except REFUSALS as exc:
            self.tally.refusals[type(exc).__name__] += 1
            return "refused", None
        except StorageError as exc:
            self.tally.errors[type(exc).__name__] += 1
            self.tally.samples.setdefault(type(exc).__name__, str(exc)[:200])
            return "uncertain", None
        except TimeoutError:
            if at is not None and loop.time() >= at:  # our deadline, not the engine's
                self.tally.cancelled += 1
                self.tally.cancel_latencies.append(loop.time() - at)
                return "uncertain", None
            self.tally.errors["TimeoutError"] += 1
            self.tally.raw.append(f"{kind}: bare TimeoutError")
            return "uncertain", None
        except ContextEngineError as exc:  # e.g. EngineClosedError: outcome unknown
            self.tally.errors[type(exc).__name__] += 1
            return "uncertain", None
        except asyncio.CancelledError as exc:
            # nothing cancels these tasks but the deadline above, which asyncio turns into
            # TimeoutError: a CancelledError here came out of the engine itself
            self.tally.errors[type(exc).__name__] += 1
            self.tally.raw.append(f"{kind}: {type(exc).__name__} out of the call{_where(exc)}")
            if at is not None and loop.time() >= at:  # our deadline: control is back
                self.tally.cancelled += 1
                self.tally.cancel_latencies.append(loop.time() - at)
            task = asyncio.current_task()
            if task is not None:
                while task.cancelling():
                    task.uncancel()
            return "uncertain", None
        except Exception as exc:  # the contract: none of these
            self.tally.errors[type(exc).__name__] += 1
            self.tally.raw.append(
                f"{kind}: {type(exc).__module__}.{type(exc).__name__}: {exc}{_where(exc)}"
            )
            return "uncertain", None

    async def until_done(self, kind: str, make: Callable[[], Awaitable[Any]]) -> Any:
        """``make()``'s call, made again until the database lets it through; past
        :data:`RECOVERY` seconds after the run's deadline, the engine never recovered
        (a finding: the task dies of it, and the run fails)."""
        while True:
            status, result = await self.call(kind, make(), cancel=False)
            if status == "ok":
                return result
            if time.time() > self.deadline + RECOVERY:
                raise RuntimeError(f"{kind} still failing {RECOVERY} s after the faults ended")
            await asyncio.sleep(0.1)

    async def setup(self, name: str) -> str:
        """A session of this task's, with its quota and rate limit."""
        engine = self.engine
        session = await self.until_done(
            "create_session",
            partial(engine.create_session, user_id=name, tier="enterprise", max_messages=None),
        )
        sid: str = session.session_id
        self.ack(op="create", sid=sid)
        await self.until_done("set_quota", partial(engine.set_quota, sid, QuotaType.TOKENS, QUOTA))
        self.ack(op="quota", sid=sid, limit=QUOTA)
        await self.until_done(
            "set_rate_limit", partial(engine.set_rate_limit, sid, "chaos", RATE_CALLS, RATE_WINDOW)
        )
        return sid

    async def task(self, name: str) -> None:
        sid = await self.setup(name)
        engine = self.engine
        ops = ["inc", "usage", "msg", "rate", "create", "end"]
        weights = [30, 20, 25, 15, 5, 5]
        while time.time() < self.deadline:
            op = random.choices(ops, weights)[0]
            cancel = random.random() < CANCEL_SHARE
            if op == "inc":
                status, _ = await self.call(
                    op, engine.update_session(sid, increment_requests=True), cancel=cancel
                )
                self.ack(op="inc", sid=sid, status=status)
            elif op == "usage":
                amount = random.randint(1, MAX_AMOUNT)
                status, _ = await self.call(
                    op,
                    engine.track_usage(sid, "chaos", QuotaType.TOKENS, amount),
                    cancel=cancel,
                )
                self.ack(op="usage", sid=sid, amount=amount, status=status)
            elif op == "msg":
                text = f"{name} {uuid.uuid4().hex[:8]}"
                status, message = await self.call(
                    op, engine.add_message(sid, "user", text), cancel=cancel
                )
                if status == "ok":
                    self.ack(
                        op="msg",
                        sid=sid,
                        chat=message.chat_id,
                        seq=message.seq,
                        message_id=message.message_id,
                        status=status,
                    )
            elif op == "rate":
                status, _ = await self.call(
                    op, engine.enforce_rate_limit(sid, "chaos"), cancel=cancel
                )
            elif op == "create":
                status, session = await self.call(
                    op,
                    engine.create_session(user_id=name, tier="enterprise"),
                    cancel=cancel,
                )
                if status == "ok":
                    self.ack(op="create", sid=session.session_id)
            else:
                status, _ = await self.call(op, engine.end_session(sid), cancel=cancel)
                if status == "ok":
                    self.ack(op="end", sid=sid)
                if status in ("ok", "uncertain", "refused"):
                    sid = await self.setup(name)  # a fresh session for this task


async def _worker(index: int, url: str, tasks: int, deadline: float, out: str) -> dict[str, Any]:
    tally = Tally()
    engine = ContextEngine(url, settings=settings())
    while True:  # the database may be refusing connections right now
        try:
            await engine.initialize()
            break
        except StorageError as exc:
            tally.errors[type(exc).__name__] += 1
            engine = ContextEngine(url, settings=settings())
            await asyncio.sleep(0.2)
    with open(out, "w", buffering=1) as log:  # noqa: ASYNC230 - a local log, line by line
        worker = Worker(engine, log, tally, deadline)
        done = await asyncio.gather(
            *(worker.task(f"chaos-{index}-{t}") for t in range(tasks)), return_exceptions=True
        )
        for result in done:
            if isinstance(result, BaseException):
                tally.raw.append(f"task died: {type(result).__name__}: {result}")
    try:
        await engine.close()
    except Exception as exc:
        tally.raw.append(f"close: {type(exc).__name__}: {exc}")
    return {
        "errors": dict(tally.errors),
        "refusals": dict(tally.refusals),
        "raw": tally.raw,
        "cancel_latencies": tally.cancel_latencies,
        "calls": tally.calls,
        "cancelled": tally.cancelled,
        "samples": tally.samples,
    }


def worker(index: int, url: str, tasks: int, deadline: float, out: str) -> dict[str, Any]:
    return asyncio.run(_worker(index, url, tasks, deadline, out))


# -- the faults ------------------------------------------------------------------------------
async def postgres_faults(url: str, deadline: float, done: Counter[str]) -> None:
    """Until ``deadline``: every 1-4 s, terminate some of the database's backends, all of
    them, or refuse connections for 0.3-1.5 s."""
    name = make_url(url).database
    admin = await asyncpg.connect(PG_SERVER.rsplit("/", 1)[0] + "/postgres")
    kill = (
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE datname = $1 AND pid <> pg_backend_pid() AND random() < $2"
    )
    try:
        while time.time() < deadline - 2:
            await asyncio.sleep(random.uniform(1, 4))
            fault = random.choice(["terminate some", "terminate all", "refuse"])
            if fault == "refuse":
                await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
                try:
                    await admin.fetchval(kill, name, 1.0)
                    await asyncio.sleep(random.uniform(0.3, 1.5))
                finally:
                    await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            else:
                share = 0.5 if fault == "terminate some" else 1.0
                killed = await admin.fetchval(kill, name, share)
                done["backends terminated"] += killed
            done[fault] += 1
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()


def _hold_lock(path: str, seconds: float) -> None:
    db = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        time.sleep(seconds)
        db.execute("COMMIT")
    finally:
        db.close()


async def sqlite_faults(path: str, deadline: float, done: Counter[str]) -> None:
    """Until ``deadline``: every 1-4 s, hold the write lock from this (another)
    process for 0.2-3 s."""
    while time.time() < deadline - 3:
        await asyncio.sleep(random.uniform(1, 4))
        await asyncio.to_thread(_hold_lock, path, random.uniform(0.2, 3.0))
        done["write lock held"] += 1


# -- the invariants --------------------------------------------------------------------------
@dataclass
class Acks:
    created: set[str] = field(default_factory=set)
    ended: set[str] = field(default_factory=set)
    quotas: dict[str, float] = field(default_factory=dict)
    inc: Counter[str] = field(default_factory=Counter)
    inc_maybe: Counter[str] = field(default_factory=Counter)
    usage: Counter[str] = field(default_factory=Counter)
    usage_maybe: Counter[str] = field(default_factory=Counter)
    messages: dict[str, tuple[str, str, int]] = field(default_factory=dict)

    def read(self, path: Path) -> None:
        for line in path.read_text().splitlines():
            if not line.endswith("}"):
                continue  # a line the process did not finish writing
            e = json.loads(line)
            op, sid, status = e["op"], e["sid"], e.get("status", "ok")
            if op == "create":
                self.created.add(sid)
            elif op == "end":
                self.ended.add(sid)
            elif op == "quota":
                self.quotas[sid] = e["limit"]
            elif op == "inc":
                if status == "ok":
                    self.inc[sid] += 1
                elif status == "uncertain":
                    self.inc_maybe[sid] += 1
            elif op == "usage":
                if status == "ok":
                    self.usage[sid] += e["amount"]
                elif status == "uncertain":
                    self.usage_maybe[sid] += e["amount"]
            elif op == "msg":
                self.messages[e["message_id"]] = (sid, e["chat"], e["seq"])


class Database:
    """The engine's tables read back with the driver (after the run)."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def rows(self, sql: str) -> list[tuple[Any, ...]]:
        if self.url.startswith("sqlite"):
            path = make_url(self.url).database
            assert path is not None
            db = sqlite3.connect(path)
            try:
                return [tuple(r) for r in db.execute(sql).fetchall()]
            finally:
                db.close()
        conn = await asyncpg.connect(self.url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            return [tuple(r) for r in await conn.fetch(sql)]
        finally:
            await conn.close()


async def check(url: str, acks: Acks) -> list[tuple[str, bool, str]]:
    db = Database(url)
    sessions = {
        sid: (status, requests)
        for sid, status, requests in await db.rows(
            "SELECT session_id, status, request_count FROM ctx_sessions WHERE tenant_id = 'default'"
        )
    }
    out: list[tuple[str, bool, str]] = []

    missing = acks.created - sessions.keys()
    out.append(
        (
            "acknowledged sessions present",
            not missing,
            f"{len(acks.created)} acknowledged, {len(missing)} missing",
        )
    )
    still_open = [sid for sid in acks.ended if sessions.get(sid, ("?",))[0] == "active"]
    out.append(
        (
            "acknowledged ends applied",
            not still_open,
            f"{len(acks.ended)} acknowledged, {len(still_open)} still active",
        )
    )

    stored = {
        mid: (sid, chat, seq)
        for mid, sid, chat, seq in await db.rows(
            "SELECT message_id, session_id, chat_id, seq FROM ctx_messages"
            " WHERE tenant_id = 'default'"
        )
    }
    lost = [m for m, where in acks.messages.items() if stored.get(m) != where]
    out.append(
        (
            "acknowledged messages present (same chat, same seq)",
            not lost,
            f"{len(acks.messages)} acknowledged, {len(lost)} missing or moved",
        )
    )

    off = []
    for sid in set(acks.inc) | set(acks.inc_maybe):
        counted = sessions.get(sid, (None, -1))[1]
        if not acks.inc[sid] <= counted <= acks.inc[sid] + acks.inc_maybe[sid]:
            off.append((sid, acks.inc[sid], acks.inc_maybe[sid], counted))
    out.append(
        (
            "requests counted = acknowledged increments (+ at most the uncertain ones)",
            not off,
            f"{sum(acks.inc.values())} acknowledged, {sum(acks.inc_maybe.values())} uncertain,"
            f" {len(off)} sessions off" + (f", e.g. {off[0]}" if off else ""),
        )
    )

    quotas = {
        sid: (used, limit)
        for sid, used, limit in await db.rows(
            "SELECT session_id, used, quota_limit FROM ctx_quotas"
            " WHERE tenant_id = 'default' AND resource_type = 'tokens'"
        )
    }
    records = {
        sid: float(total)
        for sid, total in await db.rows(
            "SELECT session_id, sum(amount) FROM ctx_usage_records"
            " WHERE tenant_id = 'default' AND resource_type = 'tokens' GROUP BY session_id"
        )
    }
    unequal = [
        (sid, used, records.get(sid, 0.0))
        for sid, (used, _) in quotas.items()
        if abs(used - records.get(sid, 0.0)) > 1e-6
    ]
    out.append(
        (
            "usage counters = their records",
            not unequal,
            f"{len(quotas)} counters, {len(unequal)} unequal"
            + (f", e.g. {unequal[0]}" if unequal else ""),
        )
    )
    bounds = [
        (sid, acks.usage[sid], acks.usage_maybe[sid], records.get(sid, 0.0))
        for sid in set(acks.usage) | set(acks.usage_maybe)
        if not acks.usage[sid] <= records.get(sid, 0.0) <= acks.usage[sid] + acks.usage_maybe[sid]
    ]
    out.append(
        (
            "usage recorded = acknowledged usage (+ at most the uncertain)",
            not bounds,
            f"{sum(acks.usage.values()):.0f} acknowledged, {len(bounds)} sessions off"
            + (f", e.g. {bounds[0]}" if bounds else ""),
        )
    )
    over = [
        (sid, used, limit)
        for sid, (used, limit) in quotas.items()
        if limit is not None and used > limit + 1e-9
    ]
    out.append(
        ("quota never overshot", not over, f"{len(over)} over" + (f": {over[0]}" if over else ""))
    )

    chats = await db.rows(
        "SELECT c.session_id, c.chat_id, c.message_count, count(m.seq), min(m.seq), max(m.seq)"
        " FROM ctx_chats c LEFT JOIN ctx_messages m ON m.tenant_id = c.tenant_id"
        " AND m.session_id = c.session_id AND m.chat_id = c.chat_id"
        " WHERE c.tenant_id = 'default' GROUP BY c.session_id, c.chat_id, c.message_count"
    )
    gaps = [
        chat
        for chat in chats
        if chat[3] != chat[2] or (chat[3] and (chat[4] != 1 or chat[5] != chat[3]))
    ]
    out.append(
        (
            "message sequences gapless, chat counts = messages",
            not gaps,
            f"{len(chats)} chats, {len(gaps)} off" + (f", e.g. {gaps[0]}" if gaps else ""),
        )
    )
    return out


# -- the run ---------------------------------------------------------------------------------
async def run(args: argparse.Namespace, url: str, workdir: Path) -> int:
    await ContextEngine(url, settings=settings()).migrate()
    deadline = time.time() + args.minutes * 60
    faults: Counter[str] = Counter()
    if url.startswith("sqlite"):
        path = make_url(url).database
        assert path is not None
        injector = sqlite_faults(path, deadline, faults)
    else:
        injector = postgres_faults(url, deadline, faults)
    loop = asyncio.get_running_loop()
    logs = [workdir / f"worker-{i}.jsonl" for i in range(args.processes)]
    context = multiprocessing.get_context("spawn")
    started = time.perf_counter()
    with ProcessPoolExecutor(args.processes, mp_context=context) as pool:
        runs = [
            loop.run_in_executor(pool, worker, i, url, args.tasks, deadline, str(logs[i]))
            for i in range(args.processes)
        ]
        injected = asyncio.ensure_future(injector)
        results = await asyncio.gather(*runs)
        await injected
    took = time.perf_counter() - started

    acks = Acks()
    for log in logs:
        acks.read(log)
    checks = await check(url, acks)
    errors: Counter[str] = Counter()
    refusals: Counter[str] = Counter()
    raw: list[str] = []
    latencies: list[float] = []
    for r in results:
        errors.update(r["errors"])
        refusals.update(r["refusals"])
        raw += r["raw"]
        latencies += r["cancel_latencies"]
    checks.append(("no raw (non-ctxengine) exception escaped", not raw, f"{len(raw)} escaped"))

    calls = sum(r["calls"] for r in results)
    print(
        f"chaos: {args.processes} processes x {args.tasks} tasks, {took:.0f} s,"
        f" {'sqlite' if url.startswith('sqlite') else 'postgresql'}"
    )
    print(
        f"calls: {calls:,} ({calls / took:,.0f}/s), cancelled at random: "
        f"{sum(r['cancelled'] for r in results):,}"
    )
    print(
        "faults injected: " + (", ".join(f"{k} {v}" for k, v in sorted(faults.items())) or "none")
    )
    print("errors by class: " + (", ".join(f"{k} {v}" for k, v in errors.most_common()) or "none"))
    print(
        "refusals (the engine's own): "
        + (", ".join(f"{k} {v}" for k, v in refusals.most_common()) or "none")
    )
    samples: dict[str, str] = {}
    for r in results:
        for key, text in r["samples"].items():
            samples.setdefault(key, text)
    for key, text in sorted(samples.items()):
        print(f"  e.g. {key}: {text}")
    for line in raw[:10]:
        print(f"  raw: {line}")
    if latencies:
        s = summary(latencies)
        verdict = "met" if s["max_ms"] <= CANCEL_CONTRACT * 1000 else "NOT met"
        print(
            f"cancelled calls returned control after their deadline: p50 {s['p50_ms']:.1f} ms,"
            f" p99 {s['p99_ms']:.1f} ms, max {s['max_ms']:.1f} ms (n={s['n']});"
            f" contract 50 ms: {verdict}"
        )
    print("invariants:")
    for name, ok, detail in checks:
        print(f"  {'ok  ' if ok else 'FAIL'} {name}: {detail}")
    return 0 if all(ok for _, ok, _ in checks) else 1


async def main_async(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="ctx-chaos-") as tmp:
        workdir = Path(tmp)
        if args.url:
            return await run(args, args.url, workdir)
        if args.backend == "sqlite":
            return await run(args, f"sqlite:///{workdir / 'chaos.db'}", workdir)
        admin = await asyncpg.connect(PG_SERVER)
        name = f"ctx_chaos_{uuid.uuid4().hex[:8]}"
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            return await run(args, PG_SERVER.rsplit("/", 1)[0] + f"/{name}", workdir)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="postgres")
    parser.add_argument("--url", default=None, help="an existing database (not dropped)")
    sys.exit(asyncio.run(main_async(parser.parse_args())))


if __name__ == "__main__":
    main()
