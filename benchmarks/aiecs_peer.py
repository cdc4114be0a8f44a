"""AIECS 2.2's context engine on Redis, measured for benchmarks/throughput.py.

    python benchmarks/aiecs_peer.py --tasks 1,16,64 --seconds 1 (REDIS_HOST, REDIS_PORT)

Standalone on purpose: AIECS pins older versions of libraries ctxengine's environment
has newer ones of (httpx, openai, fastapi, python-dateutil), so it runs with the
Python of a virtual environment of its own and prints its results as JSON on stdout;
it imports nothing of ctxengine. Each cell: ``tasks`` concurrent tasks calling
``update_session(increment_requests=True)`` (each on its own session, or all on one)
or ``add_conversation_message`` (each to its own session, or all to one) for
``seconds``; then what Redis holds: the request count against the calls that
returned True (lost increments), and the messages kept against those added.
AIECS swallows Redis errors (it logs them and falls back to process memory), so a
call that returned False, or whose write went to memory, is counted, not raised.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
import uuid
from typing import Any

#: Calls each task makes before the clock starts (connections, imports).
WARMUP = 3


async def cell(engine: Any, op: str, one: bool, tasks: int, seconds: float) -> dict[str, Any]:
    run = uuid.uuid4().hex[:8]
    sids = [f"aiecs-{run}-{t}" for t in range(1 if one else tasks)]
    for sid in sids:
        await engine.create_session(sid, "bench")
    ok = [0] * tasks
    failed = [0] * tasks
    latencies: list[float] = []

    async def call(t: int, i: int) -> bool:
        sid = sids[0 if one else t]
        if op == "update_session":
            done = await engine.update_session(
                sid, increment_requests=True, add_processing_time=0.001
            )
        else:
            done = await engine.add_conversation_message(
                sid, "user", f"task {t} call {i}: what is the weather like today?"
            )
        return bool(done)

    async def loop(t: int, deadline: float | None, count: int) -> None:
        i = 0
        while (deadline is None and i < count) or (
            deadline is not None and time.perf_counter() < deadline
        ):
            started = time.perf_counter()
            try:
                done = await call(t, i)
            except Exception:
                done = False
            if deadline is not None:
                latencies.append(time.perf_counter() - started)
            if done:
                ok[t] += 1
            else:
                failed[t] += 1
            i += 1
            await asyncio.sleep(0)

    await asyncio.gather(*(loop(t, None, WARMUP) for t in range(tasks)))
    before = sum(ok) + sum(failed)
    ok_before = sum(ok)
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(*(loop(t, deadline, 0) for t in range(tasks)))
    elapsed = time.perf_counter() - started
    timed = sum(ok) + sum(failed) - before
    out: dict[str, Any] = {
        "operation": op,
        "one": one,
        "tasks": tasks,
        "calls": timed,
        "ops_per_s": timed / elapsed,
        "ok_ops_per_s": (sum(ok) - ok_before) / elapsed,
        "returned_true": sum(ok),
        "returned_false": sum(failed),
    }
    latencies.sort()
    out["p99_ms"] = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
    client = engine.redis_client
    if op == "update_session":
        counted = 0
        for sid in sids:
            raw = await client.hget("sessions", sid)
            counted += json.loads(raw)["request_count"] if raw else 0
        expected = sum(ok)
        out.update(stored=counted, expected=expected, lost=expected - counted)
    else:
        kept = sum([await client.llen(f"conversation:{sid}") for sid in sids])
        expected = sum(ok)
        out.update(stored=kept, expected=expected, lost=expected - kept)
    # AIECS keeps what it could not write to Redis in process memory
    out["in_process_memory"] = len(engine._memory_sessions) + sum(
        len(v) for v in engine._memory_conversations.values()
    )
    return out


async def main_async(tasks: list[int], seconds: float) -> dict[str, Any]:
    logging.disable(logging.CRITICAL)  # AIECS logs every swallowed error
    from aiecs.domain.context.context_engine import (  # type: ignore[import-not-found,unused-ignore]
        ContextEngine,
    )

    engine = ContextEngine()
    # AIECS caps a conversation at 1000 messages, and with its LPUSH then
    # LTRIM(-limit, -1) the cap keeps the oldest: past it every new message is dropped.
    # ctxengine runs here without a cap, so AIECS does too; what it loses is then what
    # concurrency and its connection pool cost.
    engine.conversation_limit = 10**9
    if not await engine.initialize() or engine.redis_client is None:
        raise SystemExit("AIECS could not reach Redis")
    info = await engine.redis_client.info("persistence")
    rows = []
    try:
        for op in ("update_session", "add_conversation_message"):
            for one in (False, True):
                for n in tasks:
                    rows.append(await cell(engine, op, one, n, seconds))
    finally:
        await engine.close()
    from importlib.metadata import version

    return {
        "aiecs": version("aiecs"),
        "redis_aof": info.get("aof_enabled"),
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", default="1,16,64")
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    tasks = [int(x) for x in args.tasks.split(",") if x.strip()]
    result = asyncio.run(main_async(tasks, args.seconds))
    result["redis"] = f"{os.environ.get('REDIS_HOST')}:{os.environ.get('REDIS_PORT')}"
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
