"""Stateless SQL: repositories execute statements on a connection and never commit."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, Table, and_


def of_session(table: Table, tenant: str, session_id: str, **columns: Any) -> ColumnElement[bool]:
    """The rows of ``table`` that belong to one session (and have the given ``columns``
    values): every table is keyed by tenant and session first."""
    c = table.c
    return and_(
        c.tenant_id == tenant,
        c.session_id == session_id,
        *(c[name] == value for name, value in columns.items()),
    )
