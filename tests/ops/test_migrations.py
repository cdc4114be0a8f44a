"""The schema: alembic scripts and models never drift; up, down, concurrent starts."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text

from ctxengine import ContextEngine, EngineSettings, SessionStatus
from ctxengine import migrate as migrations
from ctxengine.migrate import VERSION_TABLE, head_revision
from ctxengine.storage.schema import memory_items as memory_items_table
from ctxengine.storage.schema import metadata
from ctxengine.storage.schema import sessions as sessions_table
from tests.fixtures import new_pg_database

from . import _workers

ROOT = Path(__file__).resolve().parents[2]
TABLES = {
    "ctx_sessions",
    "ctx_quotas",
    "ctx_usage_records",
    "ctx_rate_limit_rules",
    "ctx_rate_limit_state",
    "ctx_leases",
    "ctx_chats",
    "ctx_messages",
    "ctx_checkpoints",
    "ctx_shared_state",
    "ctx_memory_items",
    "ctx_memories",
    "ctx_graph_checkpoints",
    "ctx_graph_blobs",
    "ctx_graph_writes",
}


@pytest.fixture(params=["sqlite", "postgres"])
async def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """A database with no tables at all."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
        return
    from tests.fixtures import pg_connect

    admin = await pg_connect()
    url = await new_pg_database(admin)
    try:
        yield url
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
        await admin.close()


def engine_for(url: str, **kw: Any) -> ContextEngine:
    return ContextEngine(url, settings=EngineSettings(auto_cleanup=False, **kw))


async def diff(engine: ContextEngine, target: sa.MetaData) -> list[Any]:
    async with engine._store.engine.connect() as conn:

        def compare(sync_conn: sa.Connection) -> list[Any]:
            ctx = MigrationContext.configure(
                sync_conn, opts={"version_table": VERSION_TABLE, "compare_type": True}
            )
            return list(compare_metadata(ctx, target))

        return await conn.run_sync(compare)


async def tables(engine: ContextEngine) -> set[str]:
    """The tables, and on PostgreSQL the functions, of the database."""
    async with engine._store.engine.connect() as conn:
        found = set(await conn.run_sync(lambda c: sa.inspect(c).get_table_names()))
        if conn.dialect.name == "postgresql":
            functions = await conn.execute(
                sa.text("SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace")
            )
            found |= set(functions.scalars())
        return found


async def test_models_and_migrations_do_not_drift(empty_url: str) -> None:
    async with engine_for(empty_url) as engine:
        assert await diff(engine, metadata) == []
        drifted = sa.MetaData()
        for table in metadata.tables.values():
            table.to_metadata(drifted)
        drifted.tables["ctx_sessions"].append_column(sa.Column("extra", sa.Integer))
        assert await diff(engine, drifted) != []  # a real drift is seen


async def test_upgrade_downgrade_and_upgrade_again(empty_url: str) -> None:
    engine = engine_for(empty_url, auto_migrate=False)
    async with engine:
        assert not (await tables(engine)) & TABLES
        await engine.migrate()
        assert TABLES <= await tables(engine)
        assert (await engine.health_check())["schema_revision"] == head_revision()
        if empty_url.startswith("postgresql"):  # the rate-limit rule of revision 0005
            assert "ctx_rate_limit_take" in await tables(engine)
            await migrations.migrate(engine._store, "0004_shared_state", down=True)
            assert "ctx_rate_limit_take" not in await tables(engine)
        await migrations.migrate(engine._store, "0001_sessions", down=True)
        assert "ctx_quotas" not in await tables(engine) and "ctx_sessions" in await tables(engine)
        await migrations.migrate(engine._store, "base", down=True)
        assert not (await tables(engine)) & TABLES
        await engine.migrate()
        assert TABLES <= await tables(engine)
        await engine.create_session("works", "u")


def old_session(session_id: str, *, created_at: datetime, last_activity: datetime) -> Any:
    """An INSERT of an active session with the columns every revision has."""
    return sessions_table.insert().values(
        tenant_id="default",
        session_id=session_id,
        user_id="u",
        tier="free",
        status="active",
        metadata={},
        tags=[],
        preferences={},
        created_at=created_at,
        last_activity=last_activity,
        request_count=0,
        error_count=0,
        total_processing_time=0.0,
    )


async def test_sessions_from_before_0003_get_their_default_chat(empty_url: str) -> None:
    async with engine_for(empty_url, auto_migrate=False) as engine:
        await migrations.migrate(engine._store, "0002_usage_and_limits")
        now = datetime(2099, 1, 1, tzinfo=UTC)
        async with engine._store.engine.begin() as conn:
            # the columns revision 0002 has (chat_count arrives with 0003)
            await conn.execute(old_session("old", created_at=now, last_activity=now))
        await engine.migrate()
        session = await engine.get_session("old")
        assert session is not None and session.current_chat_id == "default"
        assert [c.chat_id for c in await engine.list_chats("old")] == ["default"]
        assert (await engine.add_message("old", "user", "still here")).seq == 1
        await migrations.migrate(engine._store, "0002_usage_and_limits", down=True)
        assert "ctx_chats" not in await tables(engine)
        async with engine._store.engine.connect() as conn:
            left = (await conn.execute(text("SELECT count(*) FROM ctx_sessions"))).scalar_one()
        assert left == 1


async def test_sessions_from_before_0006_are_swept_by_their_idle_bucket(empty_url: str) -> None:
    async with engine_for(empty_url, auto_migrate=False, session_timeout=60) as engine:
        await migrations.migrate(engine._store, "0005_rate_limit_take")
        long_ago = datetime(2001, 1, 1, tzinfo=UTC)
        async with engine._store.engine.begin() as conn:
            for sid, last_activity in (("idle", long_ago), ("fresh", datetime.now(UTC))):
                await conn.execute(
                    old_session(sid, created_at=long_ago, last_activity=last_activity)
                )
        await engine.migrate()  # computes the bucket of the sessions already stored
        assert await engine.cleanup_inactive_sessions() == 1
        assert (await engine.get_session("idle")).status is SessionStatus.EXPIRED  # type: ignore[union-attr]
        await migrations.migrate(engine._store, "0005_rate_limit_take", down=True)
        async with engine._store.engine.connect() as conn:
            inspected = await conn.run_sync(
                lambda c: (
                    {i["name"] for i in sa.inspect(c).get_indexes("ctx_sessions")},
                    {col["name"] for col in sa.inspect(c).get_columns("ctx_sessions")},
                )
            )
        indexes, columns = inspected
        assert "ix_ctx_sessions_status_last_activity" in indexes
        assert "ix_ctx_sessions_status_idle_bucket" not in indexes
        assert "idle_bucket" not in columns


async def memory_item_columns(engine: ContextEngine) -> set[str]:
    async with engine._store.engine.connect() as conn:
        columns = await conn.run_sync(lambda c: sa.inspect(c).get_columns("ctx_memory_items"))
    return {col["name"] for col in columns}


async def test_memory_items_from_before_0014_have_no_ttl(empty_url: str) -> None:
    """0014 adds ``ttl_seconds`` (NULL for the items already stored: none to refresh);
    its downgrade drops it and keeps the items."""
    from ctxengine.integrations.langgraph import ContextEngineStore

    async with engine_for(empty_url, auto_migrate=False) as engine:
        await migrations.migrate(engine._store, "0013_graph_checkpoints")
        assert "ttl_seconds" not in await memory_item_columns(engine)
        now = datetime.now(UTC)
        async with engine._store.engine.begin() as conn:
            # the columns revision 0013 has
            row = memory_items_table.insert().values(
                tenant_id="default",
                user_id="",
                session_id="",
                namespace="old",
                key="k",
                value={"v": 1},
                version=1,
                created_at=now,
                updated_at=now,
                expires_at=now + timedelta(days=1),
            )
            await conn.execute(row)
        await engine.migrate()
        assert "ttl_seconds" in await memory_item_columns(engine)
        found = await ContextEngineStore(engine).aget(("old",), "k")  # a read: no refresh
        assert found is not None and found.value == {"v": 1}
        item = await engine.get_memory("k", namespace="old")
        assert item is not None and item.expires_at == now + timedelta(days=1)
        await engine.remember("new", {"v": 2}, namespace="old", ttl=60)
        await migrations.migrate(engine._store, "0013_graph_checkpoints", down=True)
        assert "ttl_seconds" not in await memory_item_columns(engine)
        async with engine._store.engine.connect() as conn:
            kept = await conn.execute(text("SELECT key FROM ctx_memory_items ORDER BY key"))
            assert [r[0] for r in kept] == ["k", "new"]


async def test_auto_migrate_setting(empty_url: str) -> None:
    async with engine_for(empty_url, auto_migrate=False) as engine:
        assert not (await tables(engine)) & TABLES
    async with engine_for(empty_url) as engine:
        assert TABLES <= await tables(engine)


async def test_concurrent_starters_migrate_once(empty_url: str) -> None:
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.map(_workers.migrate, [empty_url] * 4)
    async with engine_for(empty_url, auto_migrate=False) as engine:
        async with engine._store.engine.connect() as conn:
            rows = (await conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}"))).all()
        assert [r[0] for r in rows] == [head_revision()]
        assert await diff(engine, metadata) == []


def test_alembic_command_line_from_the_repository_root(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    env = {**os.environ, "CTXENGINE_DATABASE_URL": url}
    alembic = [sys.executable, "-m", "alembic"]
    subprocess.run([*alembic, "upgrade", "head"], cwd=ROOT, env=env, check=True)
    current = subprocess.run(
        [*alembic, "current"], cwd=ROOT, env=env, check=True, capture_output=True, text=True
    )
    assert head_revision() in current.stdout


async def test_alembic_command_line_on_postgres(pg_admin: asyncpg.Connection) -> None:
    url = await new_pg_database(pg_admin)
    try:
        env = {**os.environ, "CTXENGINE_DATABASE_URL": url}
        command = [sys.executable, "-m", "alembic", "upgrade", "head"]
        await asyncio.to_thread(subprocess.run, command, cwd=ROOT, env=env, check=True)
        async with engine_for(url, auto_migrate=False) as engine:
            assert TABLES <= await tables(engine)
            assert await diff(engine, metadata) == []
    finally:
        await pg_admin.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


def alembic_sql(*args: str, env: dict[str, str]) -> str:
    """``alembic <args> upgrade head --sql`` from the repository root: the SQL printed."""
    command = [sys.executable, "-m", "alembic", *args, "upgrade", "head", "--sql"]
    done = subprocess.run(
        command, cwd=ROOT, env={**os.environ, **env}, check=True, capture_output=True, text=True
    )
    return done.stdout


@pytest.mark.parametrize(
    ("url", "dialect_sql"),
    [
        ("sqlite:///{tmp}/offline.db", "VIRTUAL"),
        ("postgresql://postgres@127.0.0.1/ctx_never_created", "STORED"),
    ],
)
def test_alembic_offline_sql_from_the_environment_or_x_url(
    tmp_path: Path, url: str, dialect_sql: str
) -> None:
    url = url.format(tmp=tmp_path)
    for args, env in (((), {"CTXENGINE_DATABASE_URL": url}), (("-x", f"url={url}"), {})):
        sql = alembic_sql(*args, env={"CTXENGINE_DATABASE_URL": "", **env})
        assert "CREATE TABLE ctx_sessions" in sql and dialect_sql in sql
        assert f"version_num='{head_revision()}'" in sql
    assert not (tmp_path / "offline.db").exists()  # offline: nothing connects


def test_alembic_x_url_online(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    env = {**os.environ, "CTXENGINE_DATABASE_URL": f"sqlite:///{tmp_path / 'not-this.db'}"}
    alembic = [sys.executable, "-m", "alembic", "-x", f"url={url}"]
    subprocess.run([*alembic, "upgrade", "head"], cwd=ROOT, env=env, check=True)
    current = subprocess.run(
        [*alembic, "current"], cwd=ROOT, env=env, check=True, capture_output=True, text=True
    )
    assert head_revision() in current.stdout
    assert not (tmp_path / "not-this.db").exists()


async def test_migrations_are_not_cut_by_the_statement_timeout(
    pg_admin: asyncpg.Connection,
) -> None:
    """A migration may run longer than any call should: with a statement_timeout far
    shorter than one of its statements, the engine (auto_migrate) still migrates, while
    a call of the same engine is bounded."""
    from ctxengine.errors import StorageTimeoutError
    from tests.fixtures import new_pg_database

    url = await new_pg_database(pg_admin)
    quick = EngineSettings(auto_cleanup=False, statement_timeout=0.001)
    await ContextEngine(url, settings=quick).migrate("0006_idle_bucket")
    conn = await asyncpg.connect(url.replace("+asyncpg", ""))
    try:
        await conn.execute(
            "INSERT INTO ctx_sessions (tenant_id, session_id, user_id, tier, status, metadata,"
            " tags, preferences, created_at, last_activity, request_count, error_count,"
            " total_processing_time, current_chat_id, chat_count) SELECT 'default', 's' || i,"
            " 'u', 'free', 'active', '{}', '[]', '{}', now(), now(), 0, 0, 0, 'default', 1"
            " FROM generate_series(1, 50000) AS i"
        )
        with pytest.raises(asyncpg.QueryCanceledError):  # 0007's UPDATE, bounded
            async with conn.transaction():
                await conn.execute("SET LOCAL statement_timeout = 1")
                await conn.execute("UPDATE ctx_sessions SET tier = tier")
    finally:
        await conn.close()
    async with ContextEngine(url, settings=quick) as engine:  # auto_migrate to head
        conn = await asyncpg.connect(url.replace("+asyncpg", ""))
        try:
            revision = await conn.fetchval(f"SELECT version_num FROM {VERSION_TABLE}")
            assert revision == head_revision()
            assert await conn.fetchval("SELECT count(idle_timeout) FROM ctx_sessions") == 50000
        finally:
            await conn.close()
        with pytest.raises(StorageTimeoutError):
            await engine._store.run(
                lambda c: c.execute(text("SELECT pg_sleep(0.05)")), operation="probe"
            )
    await pg_admin.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
