"""Alembic environment for ctxengine.

Programmatic runs (``ContextEngine.migrate()``, ``ctxengine migrate``) pass an open
connection in ``config.attributes["connection"]``, already inside a transaction that
holds the migration lock. ``alembic upgrade head`` from the command line connects to
``-x url=…``, else ``sqlalchemy.url`` of alembic.ini, else ``CTXENGINE_DATABASE_URL``
(else the embedded default) and takes the same lock; with ``--sql`` (offline) it
prints the SQL for that URL's database instead.
"""

from __future__ import annotations

import asyncio
import logging.config

from alembic import context
from sqlalchemy import URL, Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from ctxengine.migrate import MIGRATION_LOCK, VERSION_TABLE
from ctxengine.storage.schema import metadata

config = context.config


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def command_line_url() -> URL:
    """The database of an ``alembic`` command line run (see the module docstring)."""
    from ctxengine.settings import EngineSettings
    from ctxengine.storage import normalize_url, resolve_url

    given = context.get_x_argument(as_dictionary=True).get("url")
    given = given or config.get_main_option("sqlalchemy.url") or None
    return normalize_url(resolve_url(given, EngineSettings()))[0]


async def run_from_url() -> None:
    """The ``alembic`` command line: connect, take the migration lock, migrate."""
    from ctxengine.settings import EngineSettings
    from ctxengine.storage import open_store

    store = open_store(command_line_url(), EngineSettings())

    async def work(conn: AsyncConnection) -> None:
        await store.backend.lock(conn, MIGRATION_LOCK)
        await conn.run_sync(run_migrations)

    try:
        await store.run(work, operation="alembic")
    finally:
        await store.dispose()


connection = config.attributes.get("connection")
if connection is not None:
    run_migrations(connection)
elif context.is_offline_mode():
    url = command_line_url()
    context.configure(
        url=url,
        target_metadata=metadata,
        render_as_batch=url.get_backend_name() == "sqlite",
        version_table=VERSION_TABLE,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    if config.config_file_name is not None:
        logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)
    asyncio.run(run_from_url())
