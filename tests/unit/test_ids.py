"""Generated identifiers sort in the order they were made, within a millisecond too."""

from __future__ import annotations

import uuid

from ctxengine.ids import new_id


def test_ids_made_in_a_tight_loop_are_unique_and_ordered() -> None:
    ids = [new_id() for _ in range(50_000)]  # thousands per millisecond
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    parsed = uuid.UUID(ids[0])
    assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
