"""SQLite (aiosqlite): WAL, BEGIN IMMEDIATE for writes, Python JSON helpers."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, Table, event, func, literal
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import StaticPool

from ..settings import EngineSettings
from .backend import Backend


def _json_contains_all(array: str | None, wanted: str) -> int:
    have = set(json.loads(array)) if array else set()
    return int(have.issuperset(json.loads(wanted)))


def _json_merge(target: str | None, patch: str) -> str:
    merged = json.loads(target) if target else {}
    merged.update(json.loads(patch))
    return json.dumps(merged, separators=(",", ":"), ensure_ascii=False)


def _json_remove(target: str | None, key: str) -> str:
    document = json.loads(target) if target else {}
    document.pop(key, None)
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False)


class SQLiteBackend(Backend):
    name = "sqlite"

    @property
    def in_memory(self) -> bool:
        return self.url.database in (None, "", ":memory:")

    @property
    def serialize(self) -> bool:  # type: ignore[override]
        return self.in_memory

    def engine_options(self, settings: EngineSettings) -> dict[str, Any]:
        if self.in_memory:
            return {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}}
        return {
            "pool_size": settings.pool_size,
            "max_overflow": settings.max_overflow,
            "pool_timeout": settings.pool_timeout,
            "connect_args": {"timeout": settings.sqlite_busy_timeout},
        }

    def prepare(self, engine: AsyncEngine, settings: EngineSettings) -> None:
        busy_ms = int(settings.sqlite_busy_timeout * 1000)
        in_memory = self.in_memory

        @event.listens_for(engine.sync_engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # We issue BEGIN ourselves (BEGIN IMMEDIATE for writes).
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            if not in_memory:
                cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()
            dbapi_connection.create_function("ctx_json_merge", 2, _json_merge, deterministic=True)
            dbapi_connection.create_function("ctx_json_remove", 2, _json_remove, deterministic=True)
            dbapi_connection.create_function(
                "ctx_json_contains_all", 2, _json_contains_all, deterministic=True
            )

    async def begin(self, conn: AsyncConnection, *, write: bool) -> None:
        # Writers take the lock up front. Reads run in autocommit: each statement
        # sees a consistent snapshot of its own, and no BEGIN/COMMIT round trips.
        if write:
            await conn.exec_driver_sql("BEGIN IMMEDIATE")

    def _insert(self, table: Table) -> Any:
        return sqlite_insert(table)

    def json_merge(self, column: ColumnElement[Any], patch: dict[str, Any]) -> ColumnElement[Any]:
        text = json.dumps(patch, separators=(",", ":"), ensure_ascii=False)
        return func.ctx_json_merge(column, literal(text))

    def json_remove(self, column: ColumnElement[Any], key: str) -> ColumnElement[Any]:
        return func.ctx_json_remove(column, literal(key))

    def json_contains_all(
        self, column: ColumnElement[Any], items: Sequence[str]
    ) -> ColumnElement[bool]:
        wanted = json.dumps(list(items), ensure_ascii=False)
        return func.ctx_json_contains_all(column, literal(wanted)) == 1

    def is_transient(self, exc: BaseException) -> bool:
        orig = exc.orig if isinstance(exc, DBAPIError) else exc
        if isinstance(orig, sqlite3.OperationalError):
            text = str(orig).lower()
            return "locked" in text or "busy" in text
        return False
