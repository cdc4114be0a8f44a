"""The blocking facade against the async engine it wraps, in one run.

    python -m benchmarks.sync_facade --backend all --n 4000

``ctxengine.sync.ContextEngine`` calls from a plain thread against the same calls
awaited on ``ctxengine.ContextEngine`` (each engine on sessions of its own in one
database), interleaved in blocks so both meet the same machine, the median of
``--repeats`` runs: one caller (the target: the facade at 0.7x the async call's
throughput or better), and 16 threads against 16 tasks. PostgreSQL runs against a
database the harness creates on ``CTXENGINE_BENCH_PG_URL`` and drops afterwards.

Placement: by default the harness runs on one CPU (the facade's loop thread with its
callers, as one warm CPU; for PostgreSQL the server on the others, as ``python -m
benchmarks`` places it); ``--free`` leaves all threads to the scheduler, which on a
small virtual machine wakes the loop thread on a CPU gone idle for each call.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg

from benchmarks.placement import database_apart
from benchmarks.timing import interleaved
from ctxengine import ContextEngine, EngineSettings
from ctxengine.sync import ContextEngine as BlockingEngine

PG_SERVER = os.environ.get(
    "CTXENGINE_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)

#: Threads (facade) and tasks (async) of the concurrent rows.
WORKERS = 16
#: The facade's floor, as a share of the async call's throughput (issue 19).
TARGET = 0.7


async def measure(url: str, n: int) -> list[dict[str, Any]]:
    """One run of every row on the database at ``url``."""
    settings = EngineSettings(auto_cleanup=False)
    rows = []
    with (
        BlockingEngine(url, settings=settings) as blocking,
        ThreadPoolExecutor(WORKERS) as pool,
    ):
        async with ContextEngine(url, settings=settings) as engine:
            for w in range(WORKERS):
                blocking.get_or_create_session(f"sync-{w}", "bench")
                await engine.get_or_create_session(f"async-{w}", "bench")

            def sync_update(session_id: str) -> None:
                blocking.update_session(session_id, increment_requests=True)

            async def async_update(session_id: str) -> None:
                await engine.update_session(session_id, increment_requests=True)

            def sync_read(session_id: str) -> None:
                blocking.get_session(session_id)

            async def async_read(session_id: str) -> None:
                await engine.get_session(session_id)

            for name, sync_op, async_op in (
                ("update_session", sync_update, async_update),
                ("get_session", sync_read, async_read),
            ):
                ours, theirs = await sequential(sync_op, async_op, n)
                rows.append(row(name, ours, theirs))
            ours, theirs = await concurrent(sync_update, async_update, n, pool)
            rows.append(row(f"update_session, {WORKERS} threads / tasks", ours, theirs))
    return rows


async def sequential(
    sync_op: Callable[[str], None], async_op: Callable[[str], Any], n: int
) -> tuple[dict[str, float], dict[str, float]]:
    """``n`` calls in a row from one caller, each side, interleaved in 20 blocks."""
    for _ in range(min(100, n)):  # warm-up
        sync_op("sync-0")
        await async_op("async-0")

    async def block(which: int, calls: range, latencies: list[float]) -> None:
        for _ in calls:
            started = time.perf_counter()
            if which == 0:
                sync_op("sync-0")
            else:
                await async_op("async-0")
            latencies.append(time.perf_counter() - started)

    return await interleaved(block, max(1, n // 20), 20)


async def concurrent(
    sync_op: Callable[[str], None],
    async_op: Callable[[str], Any],
    n: int,
    pool: ThreadPoolExecutor,
) -> tuple[dict[str, float], dict[str, float]]:
    """``n`` calls spread over :data:`WORKERS` threads (the facade) or tasks (async),
    each on its own session, interleaved in 4 blocks."""

    def thread(w: int, calls: range, latencies: list[float]) -> None:
        for _ in calls:
            started = time.perf_counter()
            sync_op(f"sync-{w}")
            latencies.append(time.perf_counter() - started)

    async def task(w: int, calls: range, latencies: list[float]) -> None:
        for _ in calls:
            started = time.perf_counter()
            await async_op(f"async-{w}")
            latencies.append(time.perf_counter() - started)

    async def block(which: int, calls: range, latencies: list[float]) -> None:
        share = range(max(1, len(calls) // WORKERS))
        if which == 0:
            futures = [pool.submit(thread, w, share, latencies) for w in range(WORKERS)]
            for future in futures:
                future.result()
        else:
            await asyncio.gather(*(task(w, share, latencies) for w in range(WORKERS)))

    return await interleaved(block, max(WORKERS, n // 4), 4)


def row(name: str, ours: dict[str, float], theirs: dict[str, float]) -> dict[str, Any]:
    return {
        "operation": name,
        "sync_ops_per_s": ours["ops_per_s"],
        "async_ops_per_s": theirs["ops_per_s"],
        "ratio": ours["ops_per_s"] / theirs["ops_per_s"],
        "sync_p50_ms": ours["p50_ms"],
        "async_p50_ms": theirs["p50_ms"],
    }


def median_of(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per operation, the run of median ratio."""
    rows = []
    for same in zip(*runs, strict=True):
        ranked = sorted(same, key=lambda r: r["ratio"])
        rows.append(ranked[len(ranked) // 2])
    return rows


@contextlib.contextmanager
def one_cpu(pin: bool) -> Iterator[str]:
    """With ``pin``, this process on its first CPU for the block (the facade's threads,
    started inside it, inherit that): both sides run on one warm CPU."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not pin or len(cpus) < 2:
        yield "not pinned"
        return
    os.sched_setaffinity(0, {cpus[0]})
    try:
        yield f"on CPU {cpus[0]}"
    finally:
        os.sched_setaffinity(0, set(cpus))


async def run(backend: str, n: int, repeats: int, pin: bool) -> dict[str, list[dict[str, Any]]]:
    results: dict[str, list[dict[str, Any]]] = {}
    if backend in ("sqlite", "all"):
        runs = []
        with one_cpu(pin) as placement:
            for _ in range(repeats):
                with tempfile.TemporaryDirectory() as tmp:
                    runs.append(await measure(f"sqlite:///{Path(tmp) / 'sync.db'}", n))
        print(f"sqlite: {placement}")
        results["sqlite"] = median_of(runs)
    if backend in ("postgres", "all"):
        admin = await asyncpg.connect(PG_SERVER)
        name = f"ctx_bench_sync_{uuid.uuid4().hex[:8]}"
        await admin.execute(f'CREATE DATABASE "{name}"')
        apart = database_apart(admin.get_server_pid()) if pin else one_cpu(False)
        try:
            url = PG_SERVER.rsplit("/", 1)[0] + f"/{name}"
            with apart as placement:
                results["postgres"] = median_of([await measure(url, n) for _ in range(repeats)])
            print(f"postgres: {placement}")
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.close()
    return results


def report(results: dict[str, list[dict[str, Any]]]) -> None:
    for backend, rows in results.items():
        print(f"\n{backend}")
        print(f"{'operation':40} {'blocking/s':>11} {'async/s':>9} {'ratio':>6}  p50 ms (b/a)")
        for r in rows:
            print(
                f"{r['operation']:40} {r['sync_ops_per_s']:11.0f} {r['async_ops_per_s']:9.0f}"
                f" {r['ratio']:6.2f}  {r['sync_p50_ms']:.3f} / {r['async_p50_ms']:.3f}"
            )
        first = rows[0]
        verdict = "meets" if first["ratio"] >= TARGET else "MISSES"
        print(f"update_session {verdict} the {TARGET}x target ({first['ratio']:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sync_facade", description=__doc__)
    parser.add_argument("--backend", choices=["sqlite", "postgres", "all"], default="all")
    parser.add_argument("--n", type=int, default=4000, help="calls per side and row")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument(
        "--free",
        action="store_true",
        help="leave the threads where the scheduler puts them (default: the harness on "
        "one CPU, PostgreSQL on the others, as python -m benchmarks does)",
    )
    args = parser.parse_args()
    results = asyncio.run(run(args.backend, args.n, args.repeats, not args.free))
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
