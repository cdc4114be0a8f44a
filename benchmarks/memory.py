"""Semantic memory search: top-10 among one user's memories, exact and indexed.

    python -m benchmarks.memory --backend all --memories 10000 --indexed 100000 --dimensions 384

Exact: ``--memories`` random unit vectors given to ``add_memory`` (no model in the
loop), searched with every vector compared (on SQLite without sqlite-vec), beside the
raw driver reading the same rows into the same numpy product. Indexed: ``--indexed``
vectors shaped like a text model's (:func:`embedding_like`) loaded in bulk, searched
through sqlite-vec (SQLite, where this Python can load it) and pgvector's HNSW index
(the PostgreSQL of ``CTXENGINE_BENCH_PGVECTOR_URL``, else one the harness starts from
the tests' cluster, with room for the index in ``shared_buffers``), beside the raw
driver running the same SQL, with recall@10 against numpy's exact top 10. The
query's vector comes from a ``FunctionEmbedder``, so what is timed is the search:
candidates read and scored, the hits read and marked accessed. PostgreSQL runs
against databases the harness creates and drops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from operator import itemgetter
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np

from ctxengine import ContextEngine, EngineSettings
from ctxengine.embeddings import FunctionEmbedder
from ctxengine.ids import new_id
from ctxengine.storage import sqlite as sqlite_backend
from ctxengine.storage.repositories.semantic_memory import EF_SEARCH

PG_SERVER = os.environ.get(
    "CTXENGINE_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
PGVECTOR_SERVER = os.environ.get("CTXENGINE_BENCH_PGVECTOR_URL")
#: The scope's filter, as the engine's search reads it (raw-driver baselines).
SCOPE = (
    "tenant_id = 'default' AND namespace = 'default' AND user_id IN ('bench', '')"
    " AND (expires_at IS NULL OR expires_at > {now})"
)


def stamp_sqlite(now: datetime) -> str:
    """A timestamp as the engine stores it in SQLite (UTC text)."""
    return now.strftime("%Y-%m-%d %H:%M:%S.%f")


def unit(rows: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype("<f4")


def embedding_like(seed: int, count: int, dimensions: int) -> np.ndarray[Any, Any]:
    """Unit vectors shaped like a text model's: the image of a 32-dimensional latent
    space plus noise (nearest cosines about 0.5-0.7, unrelated ones about 0). Gaussian
    vectors of 384 dimensions are all about equally far apart, which no embedding
    model produces and on which HNSW's recall falls (0.45 at 20,000, ef_search 100)."""
    basis = np.random.default_rng(1).standard_normal((dimensions, 32)) / np.sqrt(32)
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((count, 32))
    return unit(latent @ basis.T + 0.3 * rng.standard_normal((count, dimensions)))


class Queries:
    """The query vectors, handed to the engine's embedder one search at a time."""

    def __init__(self, dimensions: int, count: int, *, like_text: bool = False) -> None:
        if like_text:
            self.vectors = embedding_like(99, count, dimensions)
        else:
            self.vectors = unit(np.random.default_rng(99).standard_normal((count, dimensions)))

    def settings(self) -> EngineSettings:
        async def embed(texts: list[str]) -> list[list[float]]:
            return [self.vectors[int(t)].tolist() for t in texts]

        return EngineSettings(
            auto_cleanup=False, embedder=FunctionEmbedder(embed, self.vectors.shape[1])
        )


def summary(took: list[float]) -> dict[str, float]:
    took = sorted(took)
    return {
        "p50_ms": round(statistics.median(took) * 1000, 2),
        "p99_ms": round(took[min(len(took) - 1, int(len(took) * 0.99))] * 1000, 2),
    }


async def alternate(
    searches: int, engine: Callable[[int], Awaitable[list[str]]], raw: Callable[[int], Any]
) -> tuple[list[float], list[float], list[list[str]]]:
    """``searches`` queries, the engine's and the raw driver's in turn (same minutes,
    same noise); the engine's hits."""
    for q in range(3):  # warm-up
        await engine(q)
        await raw(q)
    mine: list[float] = []
    theirs: list[float] = []
    found: list[list[str]] = []
    for q in range(searches):
        t = time.perf_counter()
        found.append(await engine(q))
        mine.append(time.perf_counter() - t)
        t = time.perf_counter()
        await raw(q)
        theirs.append(time.perf_counter() - t)
    return mine, theirs, found


def recall(found: list[list[str]], stored: np.ndarray[Any, Any], queries: Queries) -> float:
    """recall@10 of ``found`` (texts "m<i>") against numpy's exact top 10."""
    hits = 0
    for q, texts in enumerate(found):
        scores = stored @ queries.vectors[q]
        exact = {f"m{i}" for i in np.argpartition(-scores, 9)[:10]}
        hits += len(exact & set(texts))
    return hits / (10 * len(found))


# -- exact ----------------------------------------------------------------------------


async def exact(url: str, raw_url: str, count: int, dimensions: int, searches: int) -> None:
    queries = Queries(dimensions, searches + 3)
    stored = unit(np.random.default_rng(7).standard_normal((count, dimensions)))
    async with ContextEngine(url, settings=queries.settings()) as engine:
        started = time.perf_counter()
        for i, vector in enumerate(stored):
            await engine.add_memory(f"m{i}", user_id="bench", embedding=vector)
        added = count / (time.perf_counter() - started)

        async def search(q: int) -> list[str]:
            hits = await engine.search_memory(str(q), user_id="bench", limit=10)
            assert len(hits) == 10
            return [h.record.text for h in hits]

        async with raw_exact(raw_url, dimensions) as raw:

            def query(q: int) -> Awaitable[list[str]]:
                return raw(queries.vectors[q])

            mine, theirs, found = await alternate(searches, search, query)
    print(
        f"  exact, {count:,} x {dimensions}: add_memory {added:,.0f}/s; search",
        summary(mine),
        "| raw driver + numpy",
        summary(theirs),
        f"| recall@10 {recall(found, stored, queries):.3f}",
    )


@contextlib.asynccontextmanager
async def raw_exact(
    url: str, dimensions: int
) -> AsyncIterator[Callable[[np.ndarray[Any, Any]], Awaitable[list[str]]]]:
    """The raw driver's exact search: the scope's rows read, one numpy product."""
    sql = f"SELECT memory_id, dimensions, embedding FROM ctx_memories WHERE {SCOPE}"
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.split("///", 1)[1])
        statement = sql.format(now="?")

        async def fetch() -> list[Any]:
            return conn.execute(statement, (datetime.now(UTC).isoformat(),)).fetchall()

        closing: Callable[[], Awaitable[None]] = _nothing
    else:
        pg = await asyncpg.connect(url)
        statement = sql.format(now="$1")

        async def fetch() -> list[Any]:
            return list(await pg.fetch(statement, datetime.now(UTC)))

        closing = pg.close

    async def search(query: np.ndarray[Any, Any]) -> list[str]:
        rows = await fetch()
        matrix = np.frombuffer(b"".join(map(itemgetter(2), rows)), dtype="<f4")
        scores = matrix.reshape(len(rows), dimensions) @ query
        return [rows[i][0] for i in np.argpartition(-scores, 9)[:10]]

    try:
        yield search
    finally:
        await closing()


async def _nothing() -> None:
    return None


@contextlib.contextmanager
def exact_on_sqlite() -> Iterator[None]:
    """Engines made in the block compare every vector on SQLite (sqlite-vec not
    loaded), as where the extra is not installed."""
    saved = sqlite_backend._vector_extension
    sqlite_backend._vector_extension = lambda: None
    try:
        yield
    finally:
        sqlite_backend._vector_extension = saved


# -- indexed --------------------------------------------------------------------------


def rows_of(stored: np.ndarray[Any, Any]) -> Iterator[tuple[Any, ...]]:
    """ctx_memories rows of the user "bench", as add_memory writes them (texts "m<i>")."""
    now = datetime.now(UTC)
    for i, vector in enumerate(stored):
        yield (
            "default",
            new_id(),
            "bench",
            "",
            "default",
            f"m{i}",
            "{}",
            1.0,
            len(vector),
            vector.tobytes(),
            now,
            now,
        )


COLUMNS = (
    "tenant_id, memory_id, user_id, session_id, namespace, text, metadata, importance,"
    " dimensions, embedding, created_at, last_accessed_at"
)


async def indexed_sqlite(path: Path, stored: np.ndarray[Any, Any], searches: int) -> None:
    if sqlite_backend._vector_extension() is None:
        print("  sqlite-vec: not measured (not installed, or this Python cannot load it)")
        return
    count, dimensions = stored.shape
    url = f"sqlite:///{path}"
    queries = Queries(dimensions, searches + 3, like_text=True)
    await ContextEngine(url, settings=queries.settings()).migrate()
    conn = sqlite3.connect(path)
    with conn:
        conn.executemany(
            f"INSERT INTO ctx_memories ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            ((*row[:10], stamp_sqlite(row[10]), stamp_sqlite(row[11])) for row in rows_of(stored)),
        )
    conn.enable_load_extension(True)
    conn.load_extension(str(sqlite_backend._vector_extension()))
    conn.execute(f"PRAGMA mmap_size={sqlite_backend.VECTOR_MMAP_SIZE}")  # as the engine
    sql = (  # the ten nearest ids and distances
        "SELECT memory_id, vec_distance_cosine(embedding, ?) AS d FROM ctx_memories"
        f" WHERE {SCOPE.format(now='?')} ORDER BY d LIMIT 10"
    )

    async def raw(q: int) -> None:
        now = datetime.now(UTC).isoformat()
        conn.execute(sql, (queries.vectors[q].tobytes(), now)).fetchall()

    async with ContextEngine(url, settings=queries.settings()) as engine:

        async def search(q: int) -> list[str]:
            hits = await engine.search_memory(str(q), user_id="bench", limit=10)
            return [h.record.text for h in hits]

        mine, theirs, found = await alternate(searches, search, raw)
    conn.close()
    print(
        f"  sqlite-vec, {count:,} x {dimensions}: search",
        summary(mine),
        "| raw sqlite3, same SQL",
        summary(theirs),
        f"| recall@10 {recall(found, stored, queries):.3f}",
    )


async def indexed_postgres(server: str, stored: np.ndarray[Any, Any], searches: int) -> None:
    count, dimensions = stored.shape
    async with database(server) as url:
        queries = Queries(dimensions, searches + 3, like_text=True)
        await ContextEngine(url, settings=queries.settings()).migrate()
        conn = await asyncpg.connect(url.replace("+asyncpg", ""))
        try:
            if not await conn.fetchval(
                "SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'vector')"
            ):
                print(f"  pgvector: not measured ({server} has no extension vector)")
                return
            started = time.perf_counter()
            rows = list(rows_of(stored))
            for start in range(0, count, 5000):  # the vector given: the trigger decodes nothing
                batch = rows[start : start + 5000]
                await conn.executemany(
                    f"INSERT INTO ctx_memories ({COLUMNS}, embedding_vector)"
                    " VALUES ($1,$2,$3,$4,$5,$6,$7::jsonb,$8,$9,$10,$11,$12,$13::text::vector)",
                    [(*row, _text(stored[start + i])) for i, row in enumerate(batch)],
                )
            loaded = time.perf_counter() - started
            started = time.perf_counter()
            await conn.execute("SET maintenance_work_mem = '1GB'")
            await conn.execute(
                f"CREATE INDEX ix_ctx_memories_hnsw_{dimensions} ON ctx_memories USING hnsw"
                f" ((embedding_vector::vector({dimensions})) vector_cosine_ops)"
                f" WHERE dimensions = {dimensions}"
            )
            await conn.execute("VACUUM ANALYZE ctx_memories")
            built = time.perf_counter() - started
            with contextlib.suppress(asyncpg.PostgresError):  # into memory, as in use
                await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
                await conn.execute(
                    f"SELECT pg_prewarm('ix_ctx_memories_hnsw_{dimensions}'),"
                    " pg_prewarm('ctx_memories')"
                )
            sql = (
                "SELECT memory_id, embedding FROM ctx_memories"
                f" WHERE {SCOPE.format(now='$2')} AND dimensions = {dimensions}"
                f" ORDER BY embedding_vector::vector({dimensions})"
                f" <=> $1::real[]::vector({dimensions}) LIMIT 10"
            )
            await conn.execute(
                f"SET hnsw.ef_search = {EF_SEARCH}; SET hnsw.iterative_scan = relaxed_order"
            )

            async def raw(q: int) -> None:
                await conn.fetch(sql, queries.vectors[q].tolist(), datetime.now(UTC))

            async with ContextEngine(url, settings=queries.settings()) as engine:

                async def search(q: int) -> list[str]:
                    hits = await engine.search_memory(str(q), user_id="bench", limit=10)
                    return [h.record.text for h in hits]

                mine, theirs, found = await alternate(searches, search, raw)
            scans = await conn.fetchval(
                "SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = $1",
                f"ix_ctx_memories_hnsw_{dimensions}",
            )
        finally:
            await conn.close()
    print(
        f"  pgvector HNSW, {count:,} x {dimensions} (loaded in {loaded:.0f} s, index built in"
        f" {built:.0f} s, ef_search {EF_SEARCH}): search",
        summary(mine),
        "| raw asyncpg, same SQL",
        summary(theirs),
        f"| recall@10 {recall(found, stored, queries):.3f} | index scans so far {scans}",
    )


def _text(vector: np.ndarray[Any, Any]) -> str:
    return "[" + ",".join(map(repr, vector.tolist())) + "]"


@contextlib.asynccontextmanager
async def database(server: str) -> AsyncIterator[str]:
    """A new database on ``server`` (an asyncpg URL of its postgres database), dropped
    afterwards; its SQLAlchemy URL."""
    admin = await asyncpg.connect(server)
    name = f"ctx_bench_memory_{uuid.uuid4().hex[:8]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield server.rsplit("/", 1)[0].replace("postgresql:", "postgresql+asyncpg:") + f"/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@contextlib.contextmanager
def pgvector_server() -> Iterator[str | None]:
    """CTXENGINE_BENCH_PGVECTOR_URL, else a throwaway PostgreSQL with pgvector (the
    tests' cluster); None when neither can be had."""
    if PGVECTOR_SERVER:
        yield PGVECTOR_SERVER
        return
    try:
        from tests.cluster import Cluster, ClusterUnavailable, pgvector_bin_dir
    except ImportError:
        yield None
        return
    try:
        cluster = Cluster.create(pgvector_bin_dir())
    except ClusterUnavailable as exc:
        print(f"  pgvector: not measured ({exc})")
        yield None
        return
    try:
        # a server's memory holds its HNSW index (100,000 x 384: about 200 MB); the
        # tests' 16 MB made each search read 2,700 pages from the OS (11 ms)
        cluster.start(settings={"shared_buffers": "1GB"})
        yield cluster.url(driver="postgresql")
    finally:
        cluster.destroy()


# -- main -----------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> None:
    stored = embedding_like(8, args.indexed, args.dimensions)
    if args.backend in ("sqlite", "all"):
        print("sqlite")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "exact.db"
            with exact_on_sqlite():
                if args.memories:
                    await exact(
                        f"sqlite:///{path}",
                        f"sqlite:///{path}",
                        args.memories,
                        args.dimensions,
                        args.searches,
                    )
            if args.indexed:
                await indexed_sqlite(Path(tmp) / "indexed.db", stored, args.searches)
    if args.backend in ("postgres", "all"):
        print("postgres")
        if args.memories:
            async with database(PG_SERVER) as url:
                raw_url = url.replace("+asyncpg", "")
                await exact(url, raw_url, args.memories, args.dimensions, args.searches)
        if args.indexed:
            with pgvector_server() as server:
                if server is not None:
                    await indexed_postgres(server, stored, args.searches)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__)
    parser.add_argument("--backend", choices=["sqlite", "postgres", "all"], default="all")
    parser.add_argument("--memories", type=int, default=10_000, help="exact search's (0: none)")
    parser.add_argument("--indexed", type=int, default=100_000, help="0: exact only")
    parser.add_argument("--dimensions", type=int, default=384)
    parser.add_argument("--searches", type=int, default=50)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
