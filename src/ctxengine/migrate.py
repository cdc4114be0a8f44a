"""Schema migrations: alembic scripts shipped in the wheel, run programmatically under a lock."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection as SyncConnection

from .storage import Store
from .storage.connection import Connection

#: Alembic's version table for ctxengine's schema (leaves the user's own alembic alone).
VERSION_TABLE = "ctxengine_alembic_version"
MIGRATION_LOCK = "ctxengine.migrate"


def script_location() -> str:
    """The migration scripts: inside the installed wheel, else the source checkout."""
    shipped = resources.files("ctxengine") / "_migrations"
    if shipped.is_dir():
        return str(shipped)
    checkout = Path(__file__).resolve().parents[2] / "migrations"
    if checkout.is_dir():
        return str(checkout)
    raise FileNotFoundError("ctxengine's migration scripts are missing from this installation")


def alembic_config() -> Config:
    """An alembic Config pointing at ctxengine's scripts."""
    config = Config()
    config.set_main_option("script_location", script_location())
    return config


def head_revision() -> str | None:
    """The newest revision the scripts define."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


async def run_locked(conn: Connection, store: Store, revision: str, *, down: bool) -> None:
    """Upgrade (or downgrade) on ``conn`` inside the caller's transaction, holding the
    migration lock so concurrent starters migrate once (the revision is re-read under it)."""
    await store.backend.lock(conn, MIGRATION_LOCK)

    def run(sync_conn: SyncConnection) -> None:
        config = alembic_config()
        config.attributes["connection"] = sync_conn
        if down:
            command.downgrade(config, revision)
        else:
            command.upgrade(config, revision)

    await conn.run_sync(run)


async def migrate(store: Store, revision: str = "head", *, down: bool = False) -> None:
    """Bring the database of ``store`` to ``revision`` in one transaction."""

    async def work(conn: Connection) -> None:
        await run_locked(conn, store, revision, down=down)

    await store.run(work, operation="migrate")


async def current_revision(store: Store) -> str | None:
    """The revision the database is at (None when never migrated)."""

    async def work(conn: Connection) -> str | None:
        def read(sync_conn: SyncConnection) -> str | None:
            context = MigrationContext.configure(sync_conn, opts={"version_table": VERSION_TABLE})
            return context.get_current_revision()

        return await conn.run_sync(read)

    return await store.run(work, write=False, operation="schema revision")
