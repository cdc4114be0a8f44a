"""The connection a unit of work is given, and what it returns."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from sqlalchemy.engine import Connection as SyncConnection
from sqlalchemy.engine import CursorResult
from sqlalchemy.sql import Executable

T = TypeVar("T")
#: The parameters of one execution, or of one per row.
Params = Mapping[str, Any] | Sequence[Mapping[str, Any]]


class Record(Protocol):
    """A row, read by position or by column name (SQLAlchemy's Row is one)."""

    def __getitem__(self, index: int) -> Any: ...

    def __getattr__(self, name: str) -> Any: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Any]: ...


class Rows(Protocol):
    """What the hot paths read from a result (SQLAlchemy's CursorResult has all of it)."""

    @property
    def rowcount(self) -> int: ...

    def first(self) -> Record | None: ...

    def scalar_one(self) -> Any: ...

    def scalar_one_or_none(self) -> Any: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """What units of work execute statements on. Each backend gives its own kind
    (:meth:`~ctxengine.storage.backend.Backend.unit_of_work`)."""

    async def run(
        self, statement: Executable, parameters: Params, as_dicts: bool = False, raw: bool = False
    ) -> Rows:
        """Execute a statement built once (see :func:`~ctxengine.storage.prebuilt.run`),
        on the driver directly where the backend can; rows as dicts keyed by column
        when ``as_dicts``; with ``raw``, plain sequences read by position, as the driver
        made them when no column needs converting (no object of ours per row)."""
        ...

    async def execute(
        self,
        statement: Executable,
        parameters: Params | None = None,
    ) -> CursorResult[*tuple[Any, ...]]:
        """Execute any statement through SQLAlchemy."""
        ...

    async def run_sync(self, fn: Callable[[SyncConnection], T]) -> T:
        """Call ``fn`` with a synchronous SQLAlchemy Connection (alembic, reflection)."""
        ...
