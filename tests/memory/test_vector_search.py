"""Semantic search through an index (SPEC §13): sqlite-vec on SQLite and pgvector's HNSW
on PostgreSQL (the tests' own PostgreSQL 18 with pgvector 0.8) find what exact search
finds: the same top 10 as numpy on random vectors (sqlite-vec compares every vector in
SQL; HNSW recall@10 >= 0.95), with the scope, tenant, expiry and metadata filters
applied, and bad input refused as before. Under CI=true neither skips."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg
import numpy as np
import pytest

from ctxengine import ContextEngine, EngineSettings
from ctxengine.embeddings import FunctionEmbedder
from ctxengine.errors import ValidationError
from ctxengine.storage.repositories.semantic_memory import SemanticMemoryRepository
from ctxengine.storage.sqlite import _vector_extension
from tests.cluster import Cluster
from tests.fixtures import FakeClock, _sqlite_template
from tests.pgvector import pgvector_cluster  # noqa: F401

REQUIRED = os.environ.get("CI") == "true"
DIMS = 64
COUNT = 1500
#: The vector of each query text "q<i>" (unit length, as every stored vector).
QUERIES = np.random.default_rng(11).standard_normal((40, DIMS)).astype("<f4")


async def _queries(texts: list[str]) -> list[list[float]]:
    return [QUERIES[int(t[1:])].tolist() for t in texts]


SETTINGS = EngineSettings(auto_cleanup=False, embedder=FunctionEmbedder(_queries, DIMS))
#: pgvector's index for DIMS (the statement of docs/howto/pgvector.md).
HNSW = (
    f"CREATE INDEX ix_ctx_memories_hnsw_{DIMS} ON ctx_memories USING hnsw "
    f"((embedding_vector::vector({DIMS})) vector_cosine_ops) WHERE dimensions = {DIMS}"
)


def _unit(rows: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype("<f4")


STORED = _unit(np.random.default_rng(5).standard_normal((COUNT, DIMS)))


def exact_top(query: int, k: int = 10) -> list[str]:
    """The texts of numpy's top ``k`` of STORED for query ``query``."""
    scores = STORED @ _unit(QUERIES[query : query + 1])[0]
    return [f"m{i}" for i in np.argsort(-scores, kind="stable")[:k]]


async def fill(engine: ContextEngine, user: str = "ann") -> None:
    for i, vector in enumerate(STORED):
        await engine.add_memory(
            f"m{i}", user_id=user, embedding=vector, metadata={"parity": i % 2, "n": i}
        )


def exact_searches(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Count the searches that read every vector of their scope (the exact search), so
    a test knows when the index answered: the list grows by one each time."""
    asked: list[str] = []
    every = SemanticMemoryRepository._every

    async def counted(*args: Any, **kwargs: Any) -> Any:
        asked.append("exact")
        return await every(*args, **kwargs)

    monkeypatch.setattr(SemanticMemoryRepository, "_every", counted)
    return asked


def migration_0011() -> ModuleType:
    """migrations/versions/0011_memory_vectors.py (its PGVECTOR block is the howto's)."""
    path = Path(__file__).parents[2] / "migrations" / "versions" / "0011_memory_vectors.py"
    spec = importlib.util.spec_from_file_location("migration_0011", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- SQLite with sqlite-vec --------------------------------------------------------------


@pytest.fixture
async def vec_url(tmp_path: Path) -> str:
    """A migrated SQLite file; the engines on it load sqlite-vec into their connections."""
    if _vector_extension() is None:
        reason = (
            'sqlite-vec is not installed (pip install -e ".[vector]") or this Python\'s '
            "sqlite3 cannot load extensions (a build without --enable-loadable-sqlite-"
            "extensions)"
        )
        if REQUIRED:
            pytest.fail(f"sqlite-vec is required under CI: {reason}")
        pytest.skip(reason)
    shutil.copyfile(await _sqlite_template(), tmp_path / "vec.db")
    return f"sqlite:///{tmp_path / 'vec.db'}"


async def test_sqlite_vec_finds_numpys_top_10_in_sql(
    vec_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = exact_searches(monkeypatch)
    async with ContextEngine(vec_url, settings=SETTINGS) as engine:
        assert (await engine._store.backend.vector_search(None)).blob_distance  # type: ignore[arg-type]
        await fill(engine)
        for q in range(20):
            hits = await engine.search_memory(f"q{q}", user_id="ann", limit=10)
            assert [h.record.text for h in hits] == exact_top(q)
            wanted = np.sort(STORED @ _unit(QUERIES[q : q + 1])[0])[::-1][:10]
            assert [h.score for h in hits] == pytest.approx(wanted.tolist(), abs=1e-6)
        assert engine._store.connections_in_use() == 0
    assert asked == []


async def test_sqlite_vec_keeps_scope_tenant_expiry_and_metadata(
    vec_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _filters_hold(vec_url, monkeypatch, exact=True)


async def test_sqlite_vec_refuses_bad_input_as_exact_search_does(vec_url: str) -> None:
    async with ContextEngine(vec_url, settings=SETTINGS) as engine:
        await engine.add_memory("three", user_id="ann", embedding=STORED[0])
    await _bad_input(vec_url)
    # a namespace holding vectors of two lengths is found out (the exact search explains)
    async with (
        ContextEngine(vec_url, settings=SETTINGS) as engine,
        engine._store.engine.begin() as conn,
    ):
        from sqlalchemy import text

        await conn.execute(
            text(
                "INSERT INTO ctx_memories SELECT tenant_id, 'other', user_id, session_id,"
                " namespace, 'two', metadata, importance, 2, :vector, created_at,"
                " last_accessed_at, expires_at, NULL FROM ctx_memories"
            ),
            {"vector": np.asarray([1.0, 0.0], dtype="<f4").tobytes()},
        )
    async with ContextEngine(vec_url, settings=SETTINGS) as engine:
        with pytest.raises(ValidationError) as info:
            await engine.search_memory("q0", user_id="ann")
    assert info.value.field == "namespace" and "several dimensions" in str(info.value)


# -- PostgreSQL with pgvector ------------------------------------------------------------


@pytest.fixture
async def pg_vector_url(pgvector_cluster: Cluster) -> AsyncIterator[str]:  # noqa: F811
    """A fresh database on the PostgreSQL with pgvector, migrated (0011 creates the
    extension and the vector column)."""
    admin = await asyncpg.connect(pgvector_cluster.url(driver="postgresql"), timeout=10)
    name = f"ctx_vec_{os.getpid()}_{id(admin) % 100000}"
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        await ContextEngine(pgvector_cluster.url(name), settings=SETTINGS).migrate()
        yield pgvector_cluster.url(name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def _sql(url: str, *statements: str) -> list[Any]:
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"), timeout=10)
    try:
        found: list[Any] = []
        for statement in statements:
            found = await conn.fetch(statement)
        return found
    finally:
        await conn.close()


async def _index_scans(url: str, seconds: float = 10.0) -> int:
    """How often the HNSW index was scanned (statistics reach the view once the
    scanning connections flush them: they are closed before this is asked)."""
    name = f"ix_ctx_memories_hnsw_{DIMS}"
    count = 0
    for _ in range(int(seconds / 0.1)):
        rows = await _sql(
            url,
            "SELECT pg_stat_clear_snapshot()",
            f"SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = '{name}'",
        )
        count = int(rows[0][0]) if rows else 0
        if count:
            break
        await asyncio.sleep(0.1)
    return count


async def test_hnsw_recall_at_10_against_numpy(
    pg_vector_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with ContextEngine(pg_vector_url, settings=SETTINGS) as engine:
        await fill(engine)
    await _sql(pg_vector_url, HNSW, "ANALYZE ctx_memories")
    asked = exact_searches(monkeypatch)
    found = 0
    async with ContextEngine(pg_vector_url, settings=SETTINGS) as engine:
        for q in range(20):
            hits = await engine.search_memory(f"q{q}", user_id="ann", limit=10)
            assert len(hits) == 10
            found += len({h.record.text for h in hits} & set(exact_top(q)))
            scores = [h.score for h in hits]
            assert scores == sorted(scores, reverse=True)
            stored = {f"m{i}": i for i in range(COUNT)}
            for hit in hits:  # each score is the exact cosine, as without the index
                i = stored[hit.record.text]
                cosine = float(STORED[i] @ _unit(QUERIES[q : q + 1])[0])
                assert hit.score == pytest.approx(cosine, abs=1e-6)
    assert found / 200 >= 0.95
    assert asked == []
    assert await _index_scans(pg_vector_url) >= 1


async def test_hnsw_keeps_scope_tenant_expiry_and_metadata(
    pg_vector_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _sql(pg_vector_url, HNSW)
    await _filters_hold(pg_vector_url, monkeypatch, exact=False)


async def test_hnsw_scope_written_into_the_sql_is_quoted(
    pg_vector_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tenant, namespace and user ids of any characters (quotes, backslashes) are
    written into the HNSW statement as constants, escaped."""
    await _sql(pg_vector_url, HNSW)
    odd = "o'brien \\' or 1=1 --"
    async with ContextEngine(pg_vector_url, settings=SETTINGS) as engine:
        view = engine.tenant("t'\\")
        for i in range(40):
            await view.add_memory(f"m{i}", user_id=odd, namespace="n'", embedding=STORED[i])
        await view.add_memory("other user", user_id="o", namespace="n'", embedding=STORED[0])
        asked = exact_searches(monkeypatch)
        hits = await view.search_memory("q0", user_id=odd, namespace="n'", limit=10)
        assert asked == []
    scores = STORED[:40] @ _unit(QUERIES[0:1])[0]
    wanted = {f"m{i}" for i in np.argsort(-scores)[:10]}
    assert len({h.record.text for h in hits} & wanted) >= 9
    assert "other user" not in {h.record.text for h in hits}


async def test_hnsw_refuses_bad_input_as_exact_search_does(pg_vector_url: str) -> None:
    await _sql(pg_vector_url, HNSW)
    async with ContextEngine(pg_vector_url, settings=SETTINGS) as engine:
        await engine.add_memory("one", user_id="ann", embedding=STORED[0])
    await _bad_input(pg_vector_url)


async def test_add_memory_writes_pgvectors_copy_itself(pg_vector_url: str) -> None:
    """ctxengine's inserts write embedding_vector themselves (the trigger, disabled here,
    is for other writers), bit for bit, and a replaced memory's copy is replaced too."""
    await _sql(pg_vector_url, "ALTER TABLE ctx_memories DISABLE TRIGGER ctx_memories_fill_vector")
    async with ContextEngine(pg_vector_url, settings=SETTINGS) as engine:
        await engine.add_memory("a", user_id="ann", embedding=STORED[0])
        await engine.add_memory("b", user_id="ann", embedding=STORED[1], source="s", ttl=1)
        await asyncio.sleep(1.1)  # expired: a new memory of that source replaces it
        await engine.add_memory("c", user_id="ann", embedding=STORED[2], source="s")
    rows = await _sql(
        pg_vector_url, "SELECT text, embedding, embedding_vector::text FROM ctx_memories"
    )
    assert sorted(text for text, _, _ in rows) == ["a", "c"]
    for _, blob, vector in rows:
        decoded = np.asarray([float(x) for x in vector.strip("[]").split(",")], dtype="<f4")
        assert np.array_equal(decoded, np.frombuffer(blob, dtype="<f4"))


async def test_vectors_written_by_others_are_filled_and_pgvector_installed_later(
    pg_vector_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row written by SQL of its own gets its vector from the trigger, bit for bit;
    and a database migrated before its server had pgvector takes
    the howto's block, which fills the existing rows, and then its index."""
    migration = migration_0011()
    async with ContextEngine(pg_vector_url, settings=SETTINGS) as engine:
        await fill(engine)
    # the state migration 0011 leaves where the server has no pgvector (the extension
    # itself may stay: CREATE EXTENSION IF NOT EXISTS)
    await _sql(
        pg_vector_url,
        "DROP TRIGGER ctx_memories_fill_vector ON ctx_memories",
        "DROP FUNCTION ctx_memories_fill_vector()",
        "DROP FUNCTION ctx_memory_vector(bytea)",
        "ALTER TABLE ctx_memories DROP COLUMN embedding_vector",
    )
    columns = await _sql(
        pg_vector_url,
        "SELECT count(*) FROM information_schema.columns WHERE table_name = 'ctx_memories'"
        " AND column_name = 'embedding_vector'",
    )
    assert columns[0][0] == 0
    # a row of SQL of its own, without a vector: the trigger decodes the blob
    await _sql(pg_vector_url, migration.PGVECTOR, HNSW)
    await _sql(
        pg_vector_url,
        "INSERT INTO ctx_memories (tenant_id, memory_id, user_id, session_id, namespace, text,"
        " metadata, importance, dimensions, embedding, created_at, last_accessed_at)"
        " SELECT tenant_id, 'copy', user_id, session_id, namespace, 'copy of ' || text,"
        " metadata, importance, dimensions, embedding, created_at, last_accessed_at"
        " FROM ctx_memories WHERE text = 'm1'",
    )
    rows = await _sql(pg_vector_url, "SELECT embedding, embedding_vector::text FROM ctx_memories")
    assert len(rows) == COUNT + 1
    for blob, vector in rows:
        decoded = np.asarray([float(x) for x in vector.strip("[]").split(",")], dtype="<f4")
        assert np.array_equal(decoded, np.frombuffer(blob, dtype="<f4"))
    asked = exact_searches(monkeypatch)
    async with ContextEngine(pg_vector_url, settings=SETTINGS) as engine:
        hits = await engine.search_memory("q3", user_id="ann", limit=10)
        assert len({h.record.text for h in hits} & set(exact_top(3))) >= 9
    assert asked == []


# -- shared ----------------------------------------------------------------------------


async def _filters_hold(url: str, monkeypatch: pytest.MonkeyPatch, *, exact: bool) -> None:
    """Scope, tenant, expiry and metadata filters on the indexed path (``exact``: the
    index compares every vector, so the hits are numpy's; else 9 of 10 at least)."""
    clock = FakeClock()
    async with ContextEngine(url, settings=SETTINGS, clock=clock) as engine:
        await fill(engine)
        near = STORED[int(exact_top(0, 1)[0][1:])]  # the stored vector nearest to q0
        await engine.add_memory("bob's twin", user_id="bob", embedding=near)
        await engine.add_memory("shared twin", embedding=near)
        await engine.tenant("acme").add_memory("acme twin", user_id="ann", embedding=near)
        await engine.add_memory("brief twin", user_id="ann", embedding=near, ttl=60)
        await engine.add_memory(
            "bool twin", user_id="ann", embedding=near, metadata={"parity": True}
        )
        asked = exact_searches(monkeypatch)

        async def texts(**options: Any) -> list[str]:
            options.setdefault("user_id", "ann")
            hits = await engine.search_memory("q0", **options)
            return [hit.record.text for hit in hits]

        own = await texts(limit=12, include_shared=False)
        assert {"brief twin", "bool twin"} <= set(own[:3])
        assert not {"bob's twin", "acme twin", "shared twin"} & set(own)
        shared = await texts(limit=12)
        assert "shared twin" in shared[:4] and "bob's twin" not in shared
        assert asked == []
        # a scope of one: the index finds fewer than asked for, the exact search answers
        acme = await engine.tenant("acme").search_memory("q0", user_id="ann", limit=10)
        assert [hit.record.text for hit in acme] == ["acme twin"]
        # metadata as JSON: parity 0 is not false, true is not 1
        even = await texts(limit=10, metadata={"parity": 0})
        numpys = [t for t in exact_top(0, 60) if int(t[1:]) % 2 == 0][:10]
        if exact:
            assert even == numpys
        else:
            assert len(set(even) & set(numpys)) >= 9
        assert await texts(limit=10, metadata={"parity": True}) == ["bool twin"]
        assert await texts(limit=3, metadata={"n": 7}) == ["m7"]
        # expired: absent at once
        clock.advance(61)
        assert "brief twin" not in await texts(limit=12, include_shared=False)


async def _bad_input(url: str) -> None:
    async with ContextEngine(url, settings=SETTINGS) as engine:
        for bad, field in (
            ({"limit": 0}, "limit"),
            ({"limit": 1001}, "limit"),
            ({"min_score": 1.5}, "min_score"),
        ):
            with pytest.raises(ValidationError) as info:
                await engine.search_memory("q1", user_id="ann", **bad)
            assert info.value.field == field
        with pytest.raises(ValidationError):
            await engine.search_memory(" ", user_id="ann")
    # a query of another dimension than the namespace's vectors
    other = EngineSettings(auto_cleanup=False, embedder=FunctionEmbedder(_short, 3))
    async with ContextEngine(url, settings=other) as wrong:
        with pytest.raises(ValidationError) as info:
            await wrong.search_memory("x", user_id="ann")
        assert info.value.field == "embedding"


async def _short(texts: list[str]) -> list[list[float]]:
    return [[1.0, 0.0, 0.0] for _ in texts]


def test_the_howto_runs_the_block_of_migration_0011() -> None:
    """docs/howto/pgvector.md's block for a server given pgvector after migrating is the
    migration's own (the test above runs that)."""
    howto = (Path(__file__).parents[2] / "docs" / "howto" / "pgvector.md").read_text()
    blocks = [b.split("```", 1)[0] for b in howto.split("```sql\n")[1:]]
    block = next(b for b in blocks if b.startswith("DO $ctx$"))
    assert block.strip().rstrip(";") == migration_0011().PGVECTOR.strip()
