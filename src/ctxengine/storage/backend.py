"""What differs between databases, as methods of one backend class per dialect."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from sqlalchemy import ColumnElement, Select, Table, and_, select
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.sql.dml import Insert

from ..errors import ValidationError
from ..models import Event
from ..settings import EngineSettings
from .connection import Connection
from .relay import EventRelay


def _loads(document: str) -> Any:
    """``json.loads``, without parsing the empty documents most JSON columns hold."""
    if document == "{}":
        return {}
    if document == "[]":
        return []
    return json.loads(document)


def first_locked(
    found: Select[Any], where: Sequence[ColumnElement[bool]], order_by: Any, limit: int
) -> Select[Any]:
    """``found`` limited to its first ``limit`` rows where ``where`` holds, by
    ``order_by``, each locked as it is found (rows locked elsewhere are skipped)."""
    return found.where(*where).order_by(order_by).limit(limit).with_for_update(skip_locked=True)


def lock_key(name: str) -> int:
    """A stable signed 64-bit key for a named lock."""
    return int.from_bytes(
        hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True
    )


class Backend:
    """Base class; one subclass per supported dialect."""

    name: ClassVar[str]
    #: Whether units of work must be serialized in this process (one shared connection).
    serialize: bool = False
    #: Whether write transactions exclude each other (a database-wide write lock), so
    #: that rows read in one cannot change before it commits.
    exclusive_writes: bool = False

    def __init__(self, url: URL) -> None:
        self.url = url

    @property
    def engine_url(self) -> URL:
        """The URL of the engines this backend creates (its driver may differ)."""
        return self.url

    def create_engine(self, settings: EngineSettings) -> AsyncEngine:
        engine = create_async_engine(
            self.engine_url, json_deserializer=_loads, **self.engine_options(settings)
        )
        self.prepare(engine, settings)
        return engine

    def engine_options(self, settings: EngineSettings) -> dict[str, Any]:
        raise NotImplementedError

    def prepare(self, engine: AsyncEngine, settings: EngineSettings) -> None:
        """Attach connection-level setup (pragmas, functions) to ``engine``."""

    #: Whether INSERT … RETURNING may feed other INSERTs in one statement (WITH).
    data_modifying_ctes: bool = False
    #: Units of work a sweep with a backlog runs at once (their batches are disjoint:
    #: the rows of each are locked, and skipped by the others).
    sweep_workers: int = 1
    #: The isolation level under which units of work that need no transaction (reads,
    #: single-statement writes) run, without BEGIN and COMMIT; None: they run as others.
    autocommit_level: str | None = None

    async def begin(self, conn: AsyncConnection, *, write: bool) -> None:
        """Open the transaction of one unit of work (see :meth:`Store.run`)."""

    async def lock(self, conn: Connection, name: str) -> None:
        """Hold a named lock until the transaction ends (mutual exclusion across processes)."""

    def locked(
        self, table: Table, where: Sequence[ColumnElement[bool]], order_by: Any, limit: int
    ) -> ColumnElement[bool]:
        """A condition, for an UPDATE of ``table``, matching the first ``limit`` rows
        where ``where`` holds in the order of ``order_by``, each locked as it is found
        and ``where`` checked again on the version locked; rows other transactions hold
        locked are skipped (SELECT … FOR UPDATE SKIP LOCKED)."""
        key = list(table.primary_key.columns)
        found = first_locked(select(*key), where, order_by, limit).subquery()
        return and_(*(column == found.c[column.key] for column in key))

    def _insert(self, table: Table) -> Any:
        """The dialect's INSERT construct (it has ``on_conflict_do_*`` and ``excluded``)."""
        raise NotImplementedError

    def insert_or_ignore(self, table: Table, key: Sequence[str]) -> Insert:
        """An INSERT that does nothing when a row with the same ``key`` columns exists."""
        stmt: Insert = self._insert(table).on_conflict_do_nothing(index_elements=list(key))
        return stmt

    def upsert(
        self,
        table: Table,
        key: Sequence[str],
        values: dict[str, Any] | Select[Any],
        update: Callable[[Any], dict[str, Any]],
        where: Callable[[Any], ColumnElement[bool]] | None = None,
    ) -> Insert:
        """INSERT ``values`` (or the rows of a SELECT whose columns are labelled with the
        table's); on a key conflict apply ``update(excluded)`` to the existing row, only
        where ``where(excluded)`` holds (then nothing is returned)."""
        stmt = self._insert(table)
        if isinstance(values, Select):
            stmt = stmt.from_select([c.key for c in values.selected_columns], values)
        else:
            stmt = stmt.values(**values)
        result: Insert = stmt.on_conflict_do_update(
            index_elements=list(key),
            set_=update(stmt.excluded),
            where=None if where is None else where(stmt.excluded),
        )
        return result

    def json_merge(self, column: ColumnElement[Any], patch: dict[str, Any]) -> ColumnElement[Any]:
        """``column`` with the top-level keys of ``patch`` set (a shallow merge)."""
        raise NotImplementedError

    def json_remove(self, column: ColumnElement[Any], key: str) -> ColumnElement[Any]:
        """``column`` without the top-level ``key``."""
        raise NotImplementedError

    def json_contains_all(
        self, column: ColumnElement[Any], items: ColumnElement[Any]
    ) -> ColumnElement[bool]:
        """True when the JSON array ``column`` holds every string of the JSON array
        ``items`` (a bound parameter of type ``JSONDocument``)."""
        raise NotImplementedError

    def event_relay(self, deliver: Callable[[Event], None]) -> EventRelay:
        """What carries events between engines on this database."""
        raise ValidationError(
            f"cross_process_events needs PostgreSQL (LISTEN/NOTIFY); {self.name} engines "
            "hear only their own events: turn the setting off",
            field="cross_process_events",
        )

    def is_transient(self, exc: BaseException) -> bool:
        """Whether retrying the whole transaction may succeed (lock conflicts, serialization)."""
        return False
