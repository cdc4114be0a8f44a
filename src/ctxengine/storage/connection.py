"""The connection a unit of work is given."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from sqlalchemy.engine import Connection as SyncConnection
from sqlalchemy.engine import CursorResult
from sqlalchemy.sql import Executable

T = TypeVar("T")


class Connection(Protocol):
    """What units of work execute statements on: an AsyncConnection, or on SQLite run
    inline, a thinner stand-in (:class:`~ctxengine.storage.sqlite.InlineConnection`)."""

    async def execute(
        self,
        statement: Executable,
        parameters: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    ) -> CursorResult[*tuple[Any, ...]]: ...

    async def run_sync(self, fn: Callable[[SyncConnection], T]) -> T: ...
