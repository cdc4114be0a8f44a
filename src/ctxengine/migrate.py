"""Schema migrations: alembic scripts shipped in the wheel, run programmatically under a lock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

import anyio
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection as SyncConnection
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from .errors import ValidationError
from .settings import EngineSettings
from .storage import Store, normalize_url, open_store, resolve_url
from .storage.connection import Connection
from .storage.sqlite import SQLiteBackend

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


def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str | None:
    """The newest revision the scripts define."""
    return _scripts().get_current_head()


def resolve_revision(revision: str) -> str | None:
    """The full id of ``revision`` (``head``, ``base``, an id or a unique prefix of one);
    None for ``base``. An unknown revision raises :class:`ValidationError`."""
    scripts = _scripts()
    try:
        script = scripts.get_revision(revision)
    except CommandError:
        known = ", ".join(reversed([s.revision for s in scripts.walk_revisions()]))
        raise ValidationError(
            f"unknown revision {revision!r}; use head, base or one of: {known}",
            field="revision",
        ) from None
    return None if script is None else script.revision


def is_downgrade(current: str | None, target: str | None) -> bool:
    """Whether going from revision ``current`` to ``target`` (None: base) goes down."""
    if current is None or current == target:
        return False
    if target is None:
        return True
    try:
        below = {script.revision for script in _scripts().walk_revisions("base", current)}
    except CommandError:
        raise ValidationError(
            f"the database is at revision {current!r}, which this ctxengine does not know; "
            "upgrade ctxengine",
            field="revision",
        ) from None
    return target in below


def _read_revision(sync_conn: SyncConnection) -> str | None:
    context = MigrationContext.configure(sync_conn, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


async def run_locked(
    conn: Connection,
    store: Store,
    revision: str,
    *,
    down: bool,
    settings: EngineSettings | None = None,
) -> str | None:
    """Upgrade (or downgrade) on ``conn`` inside the caller's transaction, holding the
    migration lock so concurrent starters migrate once (the revision is re-read under it);
    the revision the database was at. ``settings`` give data migrations their defaults
    (else the environment's)."""
    await store.backend.lock(conn, MIGRATION_LOCK)

    def run(sync_conn: SyncConnection) -> str | None:
        before = _read_revision(sync_conn)
        config = alembic_config()
        config.attributes["connection"] = sync_conn
        config.attributes["settings"] = settings
        if down:
            command.downgrade(config, revision)
        else:
            command.upgrade(config, revision)
        return before

    return await conn.run_sync(run)


async def migrate(
    store: Store,
    revision: str = "head",
    *,
    down: bool = False,
    settings: EngineSettings | None = None,
) -> str | None:
    """Bring the database of ``store`` to ``revision`` in one transaction; the revision
    it was at before. ``settings``: see :func:`run_locked`."""

    async def work(conn: Connection) -> str | None:
        return await run_locked(conn, store, revision, down=down, settings=settings)

    return await store.run(work, operation="migrate")


@asynccontextmanager
async def maintenance(
    store: Store, target: str | URL | AsyncEngine | None, settings: EngineSettings
) -> AsyncIterator[Store]:
    """The store to migrate with: ``store`` itself, or, where ``store`` bounds its
    statements (``statement_timeout``), a store of its own for ``target`` without that
    bound, since migrating a large table (or even reading the revision, on a loaded
    server) may take longer than any call should."""
    if store.backend.call_timeout is None:
        yield store
        return
    own = open_store(target, settings.model_copy(update={"statement_timeout": None}))
    try:
        yield own
    finally:
        await own.dispose()


async def current_revision(store: Store) -> str | None:
    """The revision the database is at (None when never migrated)."""

    async def work(conn: Connection) -> str | None:
        return await conn.run_sync(_read_revision)

    return await store.run(work, write=False, operation="schema_revision")


async def schema_revision(url: str | None, settings: EngineSettings) -> str | None:
    """The revision of the ctxengine schema at ``url`` (None: there is none), creating
    nothing: an SQLite file that does not exist is not opened."""
    parsed, backend = normalize_url(resolve_url(url, settings))
    if backend is SQLiteBackend and not await anyio.Path(str(parsed.database)).is_file():
        return None
    store = open_store(parsed, settings)
    try:
        return await current_revision(store)
    finally:
        await store.dispose()
