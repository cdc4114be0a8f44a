"""Semantic memory search: top-10 among one user's N memories of D dimensions, exact.

    python -m benchmarks.memory --backend all --memories 10000 --dimensions 384

The memories' vectors are random unit vectors given to ``add_memory`` (no model in the
loop); the query's comes from a ``FunctionEmbedder``, so what is timed is the search:
reading the scope's vectors, one matrix product, the top hits read and marked
accessed. PostgreSQL runs against a database the harness creates on
``CTXENGINE_BENCH_PG_URL`` and drops afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import numpy as np

from ctxengine import ContextEngine, EngineSettings
from ctxengine.embeddings import FunctionEmbedder

PG_SERVER = os.environ.get(
    "CTXENGINE_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


async def measure(url: str, memories: int, dimensions: int, searches: int) -> dict[str, float]:
    rng = np.random.default_rng(7)

    async def query_vectors(texts: list[str]) -> list[list[float]]:
        return [rng.standard_normal(dimensions).tolist() for _ in texts]

    settings = EngineSettings(
        auto_cleanup=False, embedder=FunctionEmbedder(query_vectors, dimensions)
    )
    async with ContextEngine(url, settings=settings) as engine:
        vectors = rng.standard_normal((memories, dimensions))
        started = time.perf_counter()
        for i, vector in enumerate(vectors):
            await engine.add_memory(f"memory {i}", user_id="bench", embedding=vector.tolist())
        added = memories / (time.perf_counter() - started)
        for _ in range(3):  # warm-up
            await engine.search_memory("q", user_id="bench", limit=10)
        took = []
        for _ in range(searches):
            t = time.perf_counter()
            hits = await engine.search_memory("q", user_id="bench", limit=10)
            took.append(time.perf_counter() - t)
            assert len(hits) == 10
    took.sort()
    return {
        "add_memory_per_s": added,
        "search_p50_ms": statistics.median(took) * 1000,
        "search_p99_ms": took[min(len(took) - 1, int(len(took) * 0.99))] * 1000,
    }


async def run(backend: str, memories: int, dimensions: int, searches: int) -> None:
    if backend in ("sqlite", "all"):
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{Path(tmp) / 'memory.db'}"
            print("sqlite", await measure(url, memories, dimensions, searches))
    if backend in ("postgres", "all"):
        admin = await asyncpg.connect(PG_SERVER)
        name = f"ctx_bench_memory_{uuid.uuid4().hex[:8]}"
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            url = PG_SERVER.rsplit("/", 1)[0] + f"/{name}"
            print("postgres", await measure(url, memories, dimensions, searches))
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__)
    parser.add_argument("--backend", choices=["sqlite", "postgres", "all"], default="all")
    parser.add_argument("--memories", type=int, default=10_000)
    parser.add_argument("--dimensions", type=int, default=384)
    parser.add_argument("--searches", type=int, default=50)
    args = parser.parse_args()
    asyncio.run(run(args.backend, args.memories, args.dimensions, args.searches))


if __name__ == "__main__":
    main()
