"""Stored SQLite datetimes read back as aware UTC datetimes."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect

from ctxengine.storage.types import UTCDateTime


def parse(text: str | None) -> datetime | None:
    processor = UTCDateTime().result_processor(sqlite_dialect(), None)
    assert processor is not None
    result: datetime | None = processor(text)
    return result


def test_stored_text_reads_as_aware_utc() -> None:
    assert parse("2026-11-23 12:30:45.123456") == datetime(2026, 11, 23, 12, 30, 45, 123456, UTC)
    assert parse("2026-11-23 12:30:45") == datetime(2026, 11, 23, 12, 30, 45, tzinfo=UTC)
    assert parse(None) is None


def test_text_with_an_offset_of_its_own_still_reads() -> None:
    value = parse("2026-11-23T12:30:45+02:00")
    assert value is not None and value.tzinfo is UTC
