"""Context windows and compaction over a long chat, each figure beside the raw driver.

    python -m benchmarks.context --backend all --messages 10000 --n 300

One session's chat holds a system prompt and ``--messages`` messages in turns (a user
question, sometimes a tool call and its JSON result, an answer; about 80 tokens a
message, none given: the default estimate counts them). Measured, sequentially after a
warm-up, interleaved with the raw driver reading the same rows (the newest rows of the
chat, as many as the window holds, and its system prompt, by the primary key):

- ``get_context(max_tokens=4000)``: the token counts remembered (the engine keeps them
  per message), and "cold" (forgotten before each call: every message counted again);
- ``get_context`` of the same chat whose messages were given ``tokens``;
- ``get_messages(limit=50)`` of the chat (the history page, with the summary lookup);
- ``compact_history(keep_last_turns=4)`` of the whole chat once (a summarizer that
  answers at once), and ``get_context`` after it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiosqlite
import asyncpg

from benchmarks.timing import raw_pool, summary, timed_pair
from ctxengine import ContextEngine, EngineSettings, Message
from ctxengine.tokens import estimate_tokens

PG_SERVER = os.environ.get(
    "CTXENGINE_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
BUDGET = 4000
WORDS = (
    "the session keeps its history in order while tools answer questions about "
    "weather flights prices and the user asks for a summary of what happened before "
    "because agents send a bounded context to the model every turn"
).split()


def turns(count: int, seed: int = 7) -> list[dict[str, Any]]:
    """``count`` messages in turns, deterministic."""
    rnd = random.Random(seed)

    def prose(low: int, high: int) -> str:
        return " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(low, high)))

    out: list[dict[str, Any]] = []
    while len(out) < count:
        out.append({"role": "user", "content": prose(8, 40)})
        if rnd.random() < 0.4:
            call = {"name": "lookup", "arguments": {"q": prose(2, 6)}}
            out.append({"role": "assistant", "content": json.dumps({"tool_call": call})})
            result = {"results": [{"title": prose(3, 8), "score": rnd.random()} for _ in range(3)]}
            out.append({"role": "tool", "content": json.dumps(result)})
        out.append({"role": "assistant", "content": prose(30, 120)})
    return out[:count]


async def fill(engine: ContextEngine, sid: str, messages: list[dict[str, Any]]) -> None:
    await engine.create_session(sid, "bench", system_prompt="You are a helpful assistant.")
    for start in range(0, len(messages), 200):
        await engine.add_messages(sid, messages[start : start + 200])


class Raw:
    """The raw driver reading a chat's system prompt and its newest ``k`` rows."""

    async def open(self, url: str, path: str | None) -> None:
        self.pg: asyncpg.Pool | None = None
        self.lite: aiosqlite.Connection | None = None
        if path is not None:
            self.lite = await aiosqlite.connect(path)
            await self.lite.execute("PRAGMA journal_mode=WAL")
        else:
            self.pg = await raw_pool(url.replace("+asyncpg", ""), 1)

    async def read(self, sid: str, k: int) -> int:
        newest = (
            "SELECT * FROM ctx_messages WHERE tenant_id = 'default' AND session_id = {s} "
            "AND chat_id = 'default' ORDER BY seq DESC LIMIT {k}"
        )
        prompt = (
            "SELECT * FROM ctx_messages WHERE tenant_id = 'default' AND session_id = {s} "
            "AND chat_id = 'default' AND seq = 1"
        )
        if self.lite is not None:
            async with self.lite.execute(newest.format(s="?", k="?"), (sid, k)) as cur:
                rows = list(await cur.fetchall())
            async with self.lite.execute(prompt.format(s="?"), (sid,)) as cur:
                rows += list(await cur.fetchall())
            return len(rows)
        assert self.pg is not None
        async with self.pg.acquire() as conn:
            rows = list(await conn.fetch(newest.format(s="$1", k="$2"), sid, k))
            rows += list(await conn.fetch(prompt.format(s="$1"), sid))
        return len(rows)

    async def close(self) -> None:
        if self.lite is not None:
            await self.lite.close()
        if self.pg is not None:
            await self.pg.close()


async def bench(url: str, path: str | None, count: int, n: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    settings = EngineSettings(auto_cleanup=False, max_messages_per_chat=None)
    messages = turns(count)
    given = [{**m, "tokens": estimate_tokens(m["content"])} for m in messages]
    raw = Raw()
    async with ContextEngine(url, settings=settings) as engine:
        started = time.perf_counter()
        await fill(engine, "long", messages)
        await fill(engine, "given", given)
        results["fill_s"] = time.perf_counter() - started
        await raw.open(url, path)
        try:
            window = await engine.get_context("long", max_tokens=BUDGET)
            k = len(window.messages) - 1
            results["window"] = {"messages": len(window.messages), "tokens": window.tokens}

            async def warm(i: int) -> None:
                await engine.get_context("long", max_tokens=BUDGET)

            async def cold(i: int) -> None:
                engine._runtime().context._counts.clear()
                await engine.get_context("long", max_tokens=BUDGET)

            async def tokens_given(i: int) -> None:
                await engine.get_context("given", max_tokens=BUDGET)

            async def page(i: int) -> None:
                await engine.get_messages("long", limit=50)

            async def raw_window(i: int) -> None:
                await raw.read("long", k)

            async def raw_page(i: int) -> None:
                await raw.read("long", 49)

            for name, op, base in (
                ("get_context(max_tokens=4000)", warm, raw_window),
                ("get_context, counts forgotten", cold, raw_window),
                ("get_context, tokens given", tokens_given, raw_window),
                ("get_messages(limit=50)", page, raw_page),
            ):
                ours, theirs = await timed_pair(op, base, n)
                results[name] = {"ctxengine": ours, "raw": theirs}

            async def summarize(replaced: list[Message]) -> str:
                return f"summary of {len(replaced)} messages"

            started = time.perf_counter()
            summary_message = await engine.compact_history("long", summarize, keep_last_turns=4)
            results["compact_history of the chat, s"] = time.perf_counter() - started
            assert summary_message is not None
            after: list[float] = []
            for _ in range(n):
                t = time.perf_counter()
                await engine.get_context("long", max_tokens=BUDGET)
                after.append(time.perf_counter() - t)
            results["get_context after compaction"] = summary(after)
        finally:
            await raw.close()
    return results


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["sqlite", "postgres", "all"], default="all")
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    out: dict[str, Any] = {}
    if args.backend in ("sqlite", "all"):
        with tempfile.TemporaryDirectory() as folder:
            path = str(Path(folder) / "context.db")
            out["sqlite"] = await bench(f"sqlite:///{path}", path, args.messages, args.n)
    if args.backend in ("postgres", "all"):
        admin = await asyncpg.connect(PG_SERVER)
        name = f"ctx_bench_context_{uuid.uuid4().hex[:8]}"
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            url = PG_SERVER.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
            out["postgres"] = await bench(f"{url}/{name}", None, args.messages, args.n)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.close()
    print(json.dumps(out, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
