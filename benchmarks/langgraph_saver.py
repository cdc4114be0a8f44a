"""LangGraph checkpointers: a 20-step graph of plain nodes, steps/s, ours beside LangGraph's.

    python -m benchmarks.langgraph_saver --backend all --runs 64 --json saver.json

A chain of ``--steps`` nodes (20), each incrementing a counter (no model in the
loop), compiled with each checkpointer and run with ``ainvoke`` (durability "async",
LangGraph's default): ``--runs`` runs one after the other, each on a thread of its
own, then the same number spread over 16 tasks on one event loop through one saver.
A step is a node run; steps/s = runs x steps / seconds. On SQLite, beside
``AsyncSqliteSaver`` (langgraph-checkpoint-sqlite, one aiosqlite connection to a file);
on PostgreSQL, beside ``AsyncPostgresSaver`` (langgraph-checkpoint-postgres, on a
psycopg pool of 16 connections; it holds one ``asyncio.Lock`` per saver). Each saver
gets a fresh database; repeats alternate the savers and the median is taken.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, TypedDict

import asyncpg
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import END, START, StateGraph

from ctxengine import ContextEngine, EngineSettings
from ctxengine.integrations.langgraph import ContextEngineSaver

PG_SERVER = os.environ.get(
    "CTXENGINE_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
TASKS = 16
OURS = "ContextEngineSaver"

Factory = Callable[[], AbstractAsyncContextManager[BaseCheckpointSaver[Any]]]


class Count(TypedDict):
    count: int


def graph_of(steps: int, saver: BaseCheckpointSaver[Any]) -> Any:
    builder = StateGraph(Count)
    previous = START
    for i in range(steps):
        builder.add_node(f"n{i}", lambda state: {"count": state["count"] + 1})
        builder.add_edge(previous, f"n{i}")
        previous = f"n{i}"
    builder.add_edge(previous, END)
    return builder.compile(checkpointer=saver)


async def steps_per_second(
    saver: BaseCheckpointSaver[Any], steps: int, runs: int, tasks: int
) -> float:
    """Run the graph ``runs`` times over ``tasks`` concurrent tasks, each run on a
    thread of its own; node runs per second."""
    graph = graph_of(steps, saver)
    prefix = uuid.uuid4().hex[:8]
    await graph.ainvoke({"count": 0}, {"configurable": {"thread_id": f"{prefix}-warm"}})

    async def task(t: int) -> None:
        for i in range(t, runs, tasks):
            config = {"configurable": {"thread_id": f"{prefix}-{i}"}}
            result = await graph.ainvoke({"count": 0}, config)
            assert result == {"count": steps}

    start = time.perf_counter()
    await asyncio.gather(*(task(t) for t in range(tasks)))
    return runs * steps / (time.perf_counter() - start)


# -- the savers, each on a database of its own ------------------------------------------


@contextlib.asynccontextmanager
async def pg_database() -> AsyncIterator[str]:
    """A new PostgreSQL database (dropped afterwards): its plain URL."""
    admin = await asyncpg.connect(PG_SERVER, timeout=10)
    name = f"ctx_bench_lg_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_SERVER.rsplit('/', 1)[0]}/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@contextlib.asynccontextmanager
async def ours_on(url: str) -> AsyncIterator[BaseCheckpointSaver[Any]]:
    async with ContextEngine(url, settings=EngineSettings(auto_cleanup=False)) as engine:
        yield ContextEngineSaver(engine)


@contextlib.asynccontextmanager
async def ours_sqlite() -> AsyncIterator[BaseCheckpointSaver[Any]]:
    with tempfile.TemporaryDirectory(prefix="ctx_bench_lg_") as folder:
        async with ours_on(f"sqlite:///{Path(folder) / 'ours.db'}") as saver:
            yield saver


@contextlib.asynccontextmanager
async def langgraph_sqlite() -> AsyncIterator[BaseCheckpointSaver[Any]]:
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    with tempfile.TemporaryDirectory(prefix="ctx_bench_lg_") as folder:
        async with AsyncSqliteSaver.from_conn_string(str(Path(folder) / "theirs.db")) as saver:
            yield saver


@contextlib.asynccontextmanager
async def ours_postgres() -> AsyncIterator[BaseCheckpointSaver[Any]]:
    async with pg_database() as url, ours_on(url) as saver:
        yield saver


@contextlib.asynccontextmanager
async def langgraph_postgres() -> AsyncIterator[BaseCheckpointSaver[Any]]:
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
    from psycopg.rows import dict_row
    from psycopg_pool import AsyncConnectionPool

    async with pg_database() as url:
        kwargs = {"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row}
        async with AsyncConnectionPool(
            url, min_size=TASKS, max_size=TASKS, kwargs=kwargs, open=False
        ) as pool:
            saver = AsyncPostgresSaver(pool)  # type: ignore[arg-type]
            await saver.setup()
            yield saver


SAVERS: dict[str, dict[str, Factory]] = {
    "sqlite": {OURS: ours_sqlite, "AsyncSqliteSaver": langgraph_sqlite},
    "postgres": {OURS: ours_postgres, "AsyncPostgresSaver": langgraph_postgres},
}


async def measure(backend: str, steps: int, runs: int, repeats: int) -> list[dict[str, Any]]:
    """Steps/s of every saver of ``backend``, sequential and with 16 tasks."""
    figures: dict[tuple[str, int], list[float]] = {}
    for _ in range(repeats):
        for name, factory in SAVERS[backend].items():
            for tasks in (1, TASKS):
                async with factory() as saver:
                    rate = await steps_per_second(saver, steps, runs, tasks)
                figures.setdefault((name, tasks), []).append(rate)
    rows = []
    for (name, tasks), rates in figures.items():
        median = statistics.median(rates)
        baseline = next(n for n in SAVERS[backend] if n != OURS)
        theirs = statistics.median(figures[(baseline, tasks)])
        rows.append(
            {
                "saver": name,
                "mode": "sequential" if tasks == 1 else f"{tasks} tasks",
                "steps_per_s": round(median, 1),
                "vs_langgraph": round(median / theirs, 2),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.langgraph_saver", description=__doc__
    )
    parser.add_argument("--backend", choices=["sqlite", "postgres", "all"], default="all")
    parser.add_argument("--steps", type=int, default=20, help="nodes of the graph")
    parser.add_argument("--runs", type=int, default=64, help="graph runs per figure")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    backends = ["sqlite", "postgres"] if args.backend == "all" else [args.backend]
    results: dict[str, list[dict[str, Any]]] = {}
    for backend in backends:
        rows = asyncio.run(measure(backend, args.steps, args.runs, args.repeats))
        results[backend] = rows
        print(f"\n{backend}: a {args.steps}-step graph, {args.runs} runs per figure")
        print(f"{'saver':<22}{'mode':<14}{'steps/s':>10}{'vs LangGraph':>14}")
        for row in rows:
            print(
                f"{row['saver']:<22}{row['mode']:<14}{row['steps_per_s']:>10.1f}"
                f"{row['vs_langgraph']:>13.2f}x"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
