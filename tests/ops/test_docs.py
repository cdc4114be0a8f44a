"""Docs kept in step with the code: the event table of the lifecycle concept page, and the
free tier's limits in the quickstart."""

from __future__ import annotations

import re
from pathlib import Path

from ctxengine.events import EVENT_TYPES
from ctxengine.models import QuotaType, RateLimitType
from ctxengine.settings import DEFAULT_TIERS

DOCS = Path(__file__).resolve().parents[2] / "docs"


def table(path: Path, header: str) -> list[list[str]]:
    """The rows (cells stripped) of the Markdown table whose header row starts with
    ``header``, without the header and the delimiter row."""
    lines = path.read_text(encoding="utf-8").splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(header)]
    assert len(starts) == 1, f"one table starting {header!r} in {path.name}"
    rows = []
    for line in lines[starts[0] + 2 :]:
        if not line.startswith("|"):
            break
        # split on the pipes that separate cells, not on an escaped \| inside one
        cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
        rows.append([cell.strip() for cell in cells])
    assert rows, f"the table starting {header!r} in {path.name} has rows"
    return rows


def number(text: str) -> int:
    return int(text.replace(",", ""))


def test_the_lifecycle_page_lists_every_event_type_and_no_other() -> None:
    rows = table(DOCS / "concepts" / "lifecycle.md", "| type | published when |")
    named = [name for row in rows for name in re.findall(r"`([^`]+)`", row[0])]
    assert all(row[0].startswith("`") for row in rows)
    assert set(named) - EVENT_TYPES == set(), "rows naming an event that does not exist"
    assert EVENT_TYPES - set(named) == set(), "event types missing from the table"


def test_the_lifecycle_page_says_which_deletions_are_evictions() -> None:
    rows = table(DOCS / "concepts" / "lifecycle.md", "| type | published when |")
    (deleted,) = [row for row in rows if row[0] == "`memory.deleted`"]
    assert "max_memories_per_user" in deleted[1]
    assert 'reason: "evicted"' in deleted[2]


def test_the_quickstart_free_tier_table_is_default_tiers_free() -> None:
    free = DEFAULT_TIERS["free"]
    rows = {row[0]: row[1] for row in table(DOCS / "quickstart.md", "| limit | free tier |")}
    expected_quotas = {
        f"{quota.name} quota": free.quotas[quota]
        for quota in QuotaType
        if quota is not QuotaType.CONCURRENT_REQUESTS
    }
    (rate_row,) = [name for name in rows if name.startswith("rate limits")]
    (slot_row,) = [name for name in rows if name.startswith("concurrent requests")]
    assert set(rows) == {*expected_quotas, rate_row, slot_row}
    for name, limit in expected_quotas.items():
        assert limit is not None and number(rows[name].split()[0]) == limit, name
    windows = {"second": "per_second", "minute": "per_minute", "hour": "per_hour", "day": "per_day"}
    stated = {
        RateLimitType(windows[unit]): number(count)
        for count, unit in re.findall(r"([\d,]+) per (\w+)", rows[rate_row])
    }
    assert stated == free.rate_limits
    assert number(rows[slot_row]) == free.max_concurrent
    assert free.quotas[QuotaType.CONCURRENT_REQUESTS] == free.max_concurrent
