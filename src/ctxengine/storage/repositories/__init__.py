"""Stateless SQL: repositories execute statements on a connection and never commit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    CTE,
    ColumnElement,
    FromClause,
    Select,
    Table,
    and_,
    case,
    func,
    literal,
    select,
    true,
)

if TYPE_CHECKING:
    from ..backend import Backend


class Repository:
    """The statements of one table family, for one backend."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    @property
    def writes_at_once(self) -> bool:
        """Whether this repository's one-statement writes (a touch, a check and a write
        in one round trip: data-modifying CTEs) run on this backend; where they do not,
        services take the general transaction."""
        return self.backend.data_modifying_ctes


def of_session(table: Table, tenant: str, session_id: str, **columns: Any) -> ColumnElement[bool]:
    """The rows of ``table`` that belong to one session (and have the given ``columns``
    values): every table is keyed by tenant and session first."""
    c = table.c
    return and_(
        c.tenant_id == tenant,
        c.session_id == session_id,
        *(c[name] == value for name, value in columns.items()),
    )


def written_or_abort(
    touched: CTE,
    written: CTE,
    present: ColumnElement[Any],
    *columns: ColumnElement[Any],
    due: ColumnElement[bool] | None = None,
) -> Select[Any]:
    """The final SELECT of a one-statement write (data-modifying CTEs): ``columns`` of
    the session ``touched`` and of the row ``written`` (``present`` is a column of it
    that is never NULL), or no row when the session was not touched. When it was
    touched but nothing was written (a concurrent writer took the room between the
    statement's check in its snapshot and its write on the locked row), the SELECT
    divides by zero: the whole statement aborts, writing nothing, and is retried as a
    transient conflict (see ``PostgresBackend.is_transient``). ``due``: when a row was
    to be written at all (by default, always)."""
    missing = present.is_(None) if due is None else and_(present.is_(None), due)
    written_or_not = touched.outerjoin(written, true())
    return select(*columns, abort_unless(~missing)).select_from(written_or_not)


def abort_unless(condition: ColumnElement[bool]) -> ColumnElement[int]:
    """1 where ``condition`` holds; elsewhere a division by zero (SQLSTATE 22012,
    which ctxengine raises only there), aborting the one-statement write that
    selects it, to be retried as a transient conflict (see ``written_or_abort``)."""
    return literal(1) // case((condition, 1), else_=0)


def locked_in_key_order(
    table: Table, wanted: FromClause, on: Sequence[ColumnElement[bool]], *carried: Any
) -> CTE:
    """The rows of ``table`` matched by ``wanted`` (``on``), locked in the order of its
    primary key (sorted, then locked), with ``carried`` columns of ``wanted``: every
    write of several sessions (or chats, or quotas) locks them in one order, so two
    batches never wait on each other in a cycle. The lock is the one an UPDATE of
    non-key columns takes (``FOR NO KEY UPDATE``): the write that follows needs no
    stronger one, and inserts of rows referencing these (their foreign keys) do not
    wait for it."""
    key = list(table.primary_key.columns)
    return (
        select(*key, *carried)
        .join_from(table, wanted, and_(*on))
        .order_by(*key)
        .with_for_update(of=table, key_share=True)
        .cte(f"{table.name}_locked")
    )


def after_locking(locked: CTE) -> ColumnElement[bool]:
    """A condition that is always true but is evaluated, before the statement's own
    rows are read, by counting the rows of ``locked``: a write made conditional on it
    takes no lock before every row of ``locked`` is locked (in key order)."""
    return select(func.count()).select_from(locked).scalar_subquery() >= 0
