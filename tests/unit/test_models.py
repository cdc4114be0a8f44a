"""Models built from trusted rows behave exactly like validated ones."""

from __future__ import annotations

from datetime import UTC, datetime

import pydantic
import pytest

from ctxengine import Message


def test_trusted_construction_matches_validation() -> None:
    values = {
        "message_id": "m1",
        "chat_id": "default",
        "session_id": "s",
        "seq": 3,
        "role": "user",
        "content": "hi",
        "metadata": {"k": [1]},
        "tokens": None,
        "created_at": datetime(2030, 1, 1, tzinfo=UTC),
        "compacted": False,
    }
    trusted = Message._trusted(dict(values))
    validated = Message(**values)
    assert trusted == validated
    assert trusted.model_dump() == validated.model_dump()
    assert trusted.to_dict() == validated.to_dict()
    assert trusted.model_fields_set == validated.model_fields_set
    assert repr(trusted) == repr(validated)
    assert trusted.model_copy(update={"seq": 4}).seq == 4
    # the fields set is shared by trusted instances: changing a copy's leaves theirs
    other = Message._trusted(dict(values))
    copied = trusted.model_copy(update={"not_a_field": 1})
    assert "not_a_field" in copied.model_fields_set
    assert trusted.model_fields_set == other.model_fields_set == set(values)
    with pytest.raises(pydantic.ValidationError):
        trusted.seq = 5  # type: ignore[misc]
