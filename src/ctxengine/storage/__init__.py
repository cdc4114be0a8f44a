"""Storage: chosen in one place, from the connection URL."""

from __future__ import annotations

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine

from ..errors import ValidationError
from ..settings import EngineSettings
from .backend import Backend
from .postgres import PostgresBackend
from .sqlite import SQLiteBackend
from .uow import Store

__all__ = ["DEFAULT_URL", "Store", "describe_url", "normalize_url", "open_store", "resolve_url"]

#: The embedded default: an SQLite file in the working directory.
DEFAULT_URL = "sqlite+aiosqlite:///ctxengine.db"

_DRIVERS: dict[str, tuple[str, type[Backend]]] = {
    "sqlite": ("sqlite+aiosqlite", SQLiteBackend),
    "sqlite+aiosqlite": ("sqlite+aiosqlite", SQLiteBackend),
    "sqlite+ctxengine": ("sqlite+aiosqlite", SQLiteBackend),
    "postgres": ("postgresql+asyncpg", PostgresBackend),
    "postgresql": ("postgresql+asyncpg", PostgresBackend),
    "postgresql+asyncpg": ("postgresql+asyncpg", PostgresBackend),
}


_SUPPORTED = "sqlite:///path.db, sqlite+aiosqlite:///:memory:, postgresql://user@host/db"


def resolve_url(url: str | URL | None, settings: EngineSettings) -> str | URL:
    """The URL given, else ``settings.database_url`` (``CTXENGINE_DATABASE_URL``), else
    the embedded default."""
    if url is not None:
        return url
    return settings.database_url or DEFAULT_URL


def describe_url(url: str | URL) -> str:
    """``url`` for a message: its password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return str(url)


def normalize_url(url: str | URL, *, require_database: bool = True) -> tuple[URL, type[Backend]]:
    """Map a URL (shorthands included) to its async driver and backend class.

    A URL naming no database (``postgresql://host/``, ``sqlite://``) is refused unless
    ``require_database`` is false (an engine the caller built is taken as it is).
    """
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ValidationError(f"not a database URL: {url!r}", field="url") from exc
    entry = _DRIVERS.get(parsed.drivername)
    if entry is None:
        raise ValidationError(
            f"unsupported database URL scheme {parsed.drivername!r}; use one of: {_SUPPORTED}",
            field="url",
        )
    if require_database and not parsed.database:
        raise ValidationError(
            f"the database URL {describe_url(parsed)!r} names no database; "
            f"use one of: {_SUPPORTED}",
            field="url",
        )
    drivername, backend = entry
    return parsed.set(drivername=drivername), backend


def open_store(target: str | URL | AsyncEngine | None, settings: EngineSettings) -> Store:
    """A :class:`Store` for a URL (or the default) or for an existing AsyncEngine."""
    if isinstance(target, AsyncEngine):
        url, backend_class = normalize_url(target.url, require_database=False)
        backend = backend_class(url)
        backend.bind(target, settings, owned=False)
    else:
        url, backend_class = normalize_url(resolve_url(target, settings))
        backend = backend_class(url)
        backend.bind(backend.create_engine(settings), settings, owned=True)
    return Store(backend, retries=settings.transient_retries)
