"""PostgreSQL (asyncpg): jsonb operators, advisory transaction locks, retryable SQLSTATEs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Boolean, ColumnElement, String, Table, cast, func, literal, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from ..models import Event
from ..settings import EngineSettings
from .backend import Backend, lock_key
from .relay import EventRelay

#: serialization_failure, deadlock_detected, lock_not_available
_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03"})


class PostgresBackend(Backend):
    name = "postgresql"

    def engine_options(self, settings: EngineSettings) -> dict[str, Any]:
        return {
            "pool_size": settings.pool_size,
            "max_overflow": settings.max_overflow,
            "pool_timeout": settings.pool_timeout,
            "pool_recycle": settings.pool_recycle,
            "pool_pre_ping": settings.pool_pre_ping,
        }

    async def lock(self, conn: AsyncConnection, name: str) -> None:
        await conn.execute(select(func.pg_advisory_xact_lock(lock_key(name))))

    def _insert(self, table: Table) -> Any:
        return pg_insert(table)

    def json_merge(self, column: ColumnElement[Any], patch: dict[str, Any]) -> ColumnElement[Any]:
        return column.op("||")(cast(literal(patch, JSONB), JSONB))

    def json_remove(self, column: ColumnElement[Any], key: str) -> ColumnElement[Any]:
        return column.op("-")(literal(key, String))

    def json_contains_all(
        self, column: ColumnElement[Any], items: Sequence[str]
    ) -> ColumnElement[bool]:
        contains = column.op("@>", return_type=Boolean)
        return contains(cast(literal(list(items), JSONB), JSONB))

    def event_relay(self, deliver: Callable[[Event], None]) -> EventRelay:
        return EventRelay(self.url, deliver)

    def is_transient(self, exc: BaseException) -> bool:
        orig = exc.orig if isinstance(exc, DBAPIError) else exc
        state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
        return state in _TRANSIENT_SQLSTATES
