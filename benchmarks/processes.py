"""Engine processes on one PostgreSQL, directly and through PgBouncer.

    python -m benchmarks.processes --processes 1,2,4,8 --pgbouncer
    python -m benchmarks.processes --processes 1,2 --tasks 4 --seconds 1 --json out.json

On a database created on ``CTXENGINE_BENCH_PG_URL`` (migrated by the harness, dropped
afterwards), for each process count ``P`` and each way in (``direct``; with
``--pgbouncer`` also ``pgbouncer``, the two cells of one count run back to back): ``P``
spawned processes, each with its own ContextEngine of ``--pool-size`` connections
(``max_overflow=0``) and ``--tasks`` tasks, each task on a session of its own. The
processes run the operations one after the other (update_session, add_message,
track_usage with a quota set, get_session), each for ``--seconds``, all starting
together (a barrier, then throughput.py's block: a warm-up of a few calls per task,
then the clock). A cell's ops/s is the calls of all processes over the longest
process's timed seconds; its p99 is over every call's latency.

Through PgBouncer the harness starts one as the tests do (tests/pgbouncer.py, from a
checkout: transaction mode, six server connections per database, on a free port) and
the engines run with ``transaction_pooling=True`` and a direct ``events_url`` (as
docs/howto/postgresql.md says an engine behind it must; cross-process events stay
off here).

After each cell the harness checks the database with throughput.py's checks: every
session's ``request_count`` equals the update_session calls its process reports,
usage rows and the quota's ``used`` equal the track_usage calls, each chat holds
exactly the messages added, gap-free and in its task's order. A broken invariant or a
call that raised makes the run exit with status 1. The server's ``max_connections``
bounds ``P x pool_size`` on the direct side: a cell that would not fit is refused
before it starts. Timings are never asserted by the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from benchmarks.placement import database_apart
from benchmarks.throughput import (
    OPERATIONS as THROUGHPUT_OPERATIONS,
)
from benchmarks.throughput import (
    Bench,
    Database,
    EngineSide,
    Operation,
    Peers,
    PgConn,
    Tally,
    block,
    conclude,
    engine_settings,
    postgres_database,
    verify_engine,
)
from ctxengine import ContextEngine, QuotaType

_THROUGHPUT = {op.name: op for op in THROUGHPUT_OPERATIONS}
#: The operations, by name, in the order each process runs them.
OPERATIONS = {
    **{
        name: _THROUGHPUT[name]
        for name in ("update_session", "add_message", "track_usage, quota set")
    },
    "get_session": Operation("get_session", "read"),
}


# -- one engine process ----------------------------------------------------------------------
class ProcessSide(EngineSide):
    """throughput.py's engine side on the process's one engine (opened once, for all
    the operations); its block starts when every process is ready."""

    def __init__(self, engine: ContextEngine, op: Operation, sids: list[str], barrier: Any) -> None:
        super().__init__(Database("postgres", "", ""), op, sids, len(sids))
        self.engine = engine
        self.barrier = barrier

    async def open(self) -> None:
        await asyncio.to_thread(self.barrier.wait, 300)

    async def call(self, t: int, i: int) -> bool:
        if self.op.kind == "read":
            assert self.engine is not None
            await self.engine.get_session(self.sids[t])
            return True
        return await super().call(t, i)

    async def close(self) -> None:
        """The engine outlives the block."""


async def _process(job: dict[str, Any], barrier: Any) -> dict[str, Any]:
    settings = engine_settings(job["pool_size"]).model_copy(update=job["settings"])
    out: dict[str, Any] = {}
    async with ContextEngine(job["url"], settings=settings) as engine:
        for name in job["operations"]:
            op = OPERATIONS[name]
            sids = [
                (
                    await engine.create_session(
                        user_id=f"{job['run']}-p{job['index']}-t{t}", tier="enterprise"
                    )
                ).session_id
                for t in range(job["tasks"])
            ]
            if op.quota:
                for sid in sids:
                    await engine.set_quota(sid, QuotaType.TOKENS, 10**15)
            tally = Tally(len(sids))
            await block(ProcessSide(engine, op, sids, barrier), tally, job["seconds"])
            out[name] = {"sids": sids, **vars(tally)}
    return out


def _entry(job: dict[str, Any], barrier: Any, results: Any) -> None:
    try:
        results.put({"index": job["index"], **asyncio.run(_process(job, barrier))})
    except BaseException as exc:
        barrier.abort()  # the others stop waiting
        results.put({"index": job["index"], "error": f"{type(exc).__name__}: {exc}"[:500]})
        raise


def spawn(
    url: str,
    count: int,
    *,
    tasks: int,
    pool_size: int,
    seconds: float,
    operations: list[str],
    settings: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """``count`` spawned engine processes running ``operations`` together: each
    process's answer, per operation its sessions and its :class:`Tally`'s fields.
    Raises when a process failed."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(count)
    results = ctx.Queue()
    run = uuid.uuid4().hex[:8]
    workers = [
        ctx.Process(
            target=_entry,
            args=(
                {
                    "url": url,
                    "index": k,
                    "run": run,
                    "tasks": tasks,
                    "pool_size": pool_size,
                    "seconds": seconds,
                    "operations": operations,
                    "settings": settings or {},
                },
                barrier,
                results,
            ),
        )
        for k in range(count)
    ]
    for w in workers:
        w.start()
    answers = [results.get(timeout=120 + 3 * seconds * len(operations)) for _ in workers]
    for w in workers:
        w.join(60)
    errors = [a["error"] for a in answers if "error" in a]
    if errors:
        raise RuntimeError(f"{count} engine processes: {errors}")
    return sorted(answers, key=lambda a: a["index"])


def merged(answers: list[dict[str, Any]], name: str) -> tuple[list[str], Tally]:
    """The sessions and one :class:`Tally` of operation ``name`` over all processes:
    the calls of each, over the longest timed seconds."""
    parts = [a[name] for a in answers]
    tally = Tally(sum(p["tasks"] for p in parts))
    tally.ok = [n for p in parts for n in p["ok"]]
    tally.latencies = [x for p in parts for x in p["latencies"]]
    tally.timed = sum(p["timed"] for p in parts)
    tally.elapsed = max(p["elapsed"] for p in parts)
    tally.errors = sum(p["errors"] for p in parts)
    tally.first_error = next((p["first_error"] for p in parts if p["first_error"]), None)
    return [sid for p in parts for sid in p["sids"]], tally


# -- the harness -----------------------------------------------------------------------------
async def free_connections(check: PgConn) -> int:
    (row,) = await check.fetch(
        "SELECT current_setting('max_connections')::int"
        " - current_setting('superuser_reserved_connections')::int - count(*) AS n"
        " FROM pg_stat_activity WHERE backend_type = 'client backend'"
    )
    return int(row["n"])


async def cell(
    bench: Bench, args: argparse.Namespace, count: int, way: str, url: str
) -> dict[str, Any]:
    check = bench.check
    assert isinstance(check, PgConn)
    if way == "direct":
        free = await free_connections(check)
        if count * args.pool_size > free:
            raise SystemExit(
                f"{count} processes x pool_size {args.pool_size} = "
                f"{count * args.pool_size} connections, the server has {free} free:"
                " lower --pool-size or --processes"
            )
    await check.write("VACUUM ANALYZE")  # what autovacuum would do (off on the server measured)
    settings: dict[str, Any] = {}
    if way == "pgbouncer":
        settings = {"transaction_pooling": True, "events_url": bench.db.dsn}
    load = os.getloadavg()[0]
    began = time.perf_counter()
    answers = await asyncio.to_thread(
        spawn,
        url,
        count,
        tasks=args.tasks,
        pool_size=args.pool_size,
        seconds=args.seconds,
        operations=list(OPERATIONS),
        settings=settings,
    )
    row: dict[str, Any] = {
        "processes": count,
        "way": way,
        "pool_size": args.pool_size,
        "tasks_per_process": args.tasks,
        "loadavg_before": load,
        "operations": {},
    }
    problems: list[str] = []
    for name, op in OPERATIONS.items():
        sids, tally = merged(answers, name)
        row["operations"][name] = tally.stats()
        if tally.errors:
            problems.append(f"{name}: {tally.errors} calls raised ({tally.first_error})")
        if op.kind != "read":
            problems += [f"{name}: {p}" for p in await verify_engine(bench, op, sids, tally)]
    row["invariants"] = {"ok": not problems, "problems": problems}
    row["wall_s"] = time.perf_counter() - began
    row["loadavg_after"] = os.getloadavg()[0]
    return row


@contextlib.contextmanager
def pgbouncer(wanted: bool, direct: str) -> Any:
    """The PgBouncer of tests/pgbouncer.py (its URL maker), or None."""
    if not wanted:
        yield None
        return
    from tests.fixtures import PG_SERVER as TEST_SERVER  # a checkout's tests/
    from tests.pgbouncer import POOL_SIZE, pgbouncer_binary, running_pgbouncer

    if pgbouncer_binary() is None:
        raise SystemExit("--pgbouncer: no pgbouncer binary (Debian: apt install pgbouncer)")
    ours, theirs = urlsplit(direct), urlsplit(TEST_SERVER)
    if (ours.hostname, ours.port) != (theirs.hostname, theirs.port):
        raise SystemExit(
            "--pgbouncer: tests/pgbouncer.py fronts CTXENGINE_TEST_PG_URL's server;"
            " set it to CTXENGINE_BENCH_PG_URL's"
        )
    with running_pgbouncer() as bouncer:
        yield bouncer, POOL_SIZE


async def run(args: argparse.Namespace) -> dict[str, Any]:
    ways = ["direct", "pgbouncer"] if args.pgbouncer else ["direct"]
    out: dict[str, Any] = {
        "command": " ".join(["python -m benchmarks.processes", *sys.argv[1:]]),
        "cpu_count": os.cpu_count(),
        "seconds": args.seconds,
        "tasks_per_process": args.tasks,
        "pool_size": args.pool_size,
        "operations": list(OPERATIONS),
        "loadavg_start": os.getloadavg(),
        "rows": [],
    }
    async with postgres_database() as (dsn, server_pid):
        url = dsn.replace("postgresql://", "postgresql+asyncpg://", 1)
        db = Database("postgres", url, dsn)
        with pgbouncer(args.pgbouncer, dsn) as bouncer:
            if bouncer is not None:
                out["pgbouncer_server_connections"] = bouncer[1]
            setup_settings = engine_settings(1).model_copy(update={"auto_migrate": True})
            async with ContextEngine(url, settings=setup_settings) as setup:  # migrates
                check = db.check = PgConn(await asyncpg.connect(dsn))
                try:
                    bench = Bench(db, args.seconds, 1, setup, check, {}, Peers(Path(), False, 0))
                    placed = database_apart(server_pid) if args.pin else contextlib.nullcontext()
                    with placed as placement:
                        out["placement"] = placement or "not pinned"
                        for count in args.processes:
                            for way in ways:
                                target = url if way == "direct" else bouncer[0].url(url)
                                row = await cell(bench, args, count, way, target)
                                out["rows"].append(row)
                                print(progress(row), flush=True)
                finally:
                    db.check = None
                    await check.close()
    out["loadavg_end"] = os.getloadavg()
    return out


# -- the printed table ---------------------------------------------------------------------------
def progress(row: dict[str, Any]) -> str:
    rates = ", ".join(f"{name} {r['ops_per_s']:,.0f}/s" for name, r in row["operations"].items())
    broken = "" if row["invariants"]["ok"] else "  INVARIANTS BROKEN"
    return (
        f"  {row['processes']} processes, {row['way']}: {rates}"
        f" ({row['wall_s']:.1f} s, load {row['loadavg_before']:.2f}){broken}"
    )


def report(result: dict[str, Any]) -> list[str]:
    """Print the table; the broken invariants."""
    start, end = result["loadavg_start"][0], result["loadavg_end"][0]
    bouncer = result.get("pgbouncer_server_connections")
    print(
        f"\n{result['command']}\n{result['tasks_per_process']} tasks and pool_size"
        f" {result['pool_size']} (max_overflow 0) per process"
        + (f"; PgBouncer: transaction mode, {bouncer} server connections" if bouncer else "")
        + f"; {result['seconds']} s per operation; {result['placement']};"
        f" load average {start:.2f} -> {end:.2f} on {result['cpu_count']} CPUs"
    )
    names = result["operations"]
    print(f"{'procs':>5} {'via':<10}{'server':>7}" + "".join(f"{n[:22]:>24}" for n in names))
    print(f"{'':>5} {'':<10}{'conns':>7}" + f"{'ops/s   p99 ms':>24}" * len(names))
    broken = []
    for row in result["rows"]:
        cells = "".join(
            f"{r['ops_per_s']:>14,.0f}{r['p99_ms']:>10.2f}" for r in row["operations"].values()
        )
        conns = row["processes"] * row["pool_size"]
        if row["way"] == "pgbouncer":
            conns = min(conns, bouncer)
        print(f"{row['processes']:>5} {row['way']:<10}{conns:>7}{cells}")
        broken += [
            f"{row['processes']} processes, {row['way']}: {p}"
            for p in row["invariants"]["problems"]
        ]
    return broken


def _counts(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.processes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--processes", type=_counts, default=[1, 2, 4, 8])
    parser.add_argument("--tasks", type=int, default=8, help="tasks per process")
    parser.add_argument(
        "--pool-size", type=int, default=8, help="connections per process (max_overflow 0)"
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per operation")
    parser.add_argument(
        "--pgbouncer", action="store_true", help="also through PgBouncer (transaction mode)"
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="the harness and its processes on CPU 0, PostgreSQL on the others",
    )
    parser.add_argument("--json", dest="json_path", default=None, help="write results here")
    args = parser.parse_args()
    print(
        f"pool_size {args.pool_size} per process, max_overflow 0:"
        f" up to {max(args.processes) * args.pool_size} direct connections",
        flush=True,
    )
    result = asyncio.run(run(args))
    conclude(result, report(result), args.json_path)


if __name__ == "__main__":
    main()
