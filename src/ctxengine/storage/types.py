"""Column types that behave the same on every backend."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

#: PostgreSQL's type OID of ``timestamptz``.
_TIMESTAMPTZ = 1184

#: JSON everywhere, JSONB on PostgreSQL (indexable, mergeable with ``||``).
JSONDocument = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out.

    PostgreSQL stores ``timestamptz``; SQLite stores UTC text in a fixed-width
    format, so comparing the text compares the instants.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime) or value.tzinfo is None:
            raise ValueError("ctxengine stores timezone-aware datetimes only")
        return value.astimezone(UTC)

    def result_processor(self, dialect: Dialect, coltype: Any) -> Any:
        if dialect.name == "sqlite":
            # The stored text is ISO 8601 in UTC: parse it directly (the generic
            # SQLite processor uses a regular expression, slow on long histories).
            def parse(value: str | None) -> datetime | None:
                if value is None:
                    return None
                try:  # parsing the offset is several times faster than replace(tzinfo=)
                    return datetime.fromisoformat(value + "+00:00")
                except ValueError:  # text written with an offset of its own
                    return datetime.fromisoformat(value).replace(tzinfo=UTC)

            return parse
        if dialect.driver == "asyncpg" and coltype == _TIMESTAMPTZ:
            return None  # asyncpg reads timestamptz as aware datetimes in UTC already
        return super().result_processor(dialect, coltype)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)
