"""The fixtures of every test folder (tests/fixtures.py), and the backend marks:
``-m sqlite`` or ``-m postgres`` runs one backend's tests (those taking ``db_url``
are parametrized over both; those taking ``pg_url`` or ``pg_admin`` are PostgreSQL's)."""

from __future__ import annotations

import pytest

from tests.blocking import facade_on_postgres
from tests.fixtures import clock, db_url, engine, pg_admin, pg_url  # noqa: F401

_POSTGRES_FIXTURES = {"pg_url", "pg_admin"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    dropped = [item for item in items if facade_on_postgres(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if not facade_on_postgres(item)]
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & _POSTGRES_FIXTURES:
            item.add_marker(pytest.mark.postgres)
        callspec = getattr(item, "callspec", None)
        backend = callspec.params.get("db_url") if callspec is not None else None
        if backend is not None:
            item.add_marker(getattr(pytest.mark, backend))
