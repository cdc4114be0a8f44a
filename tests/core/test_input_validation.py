"""Input that must be refused, the same on both backends, before anything is written."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from ctxengine import ContextEngine, QuotaType
from ctxengine.errors import ValidationError
from ctxengine.validation import MAX_JSON_DEPTH, MAX_QUANTITY, MAX_TAGS

BAD_IDS = ["a\x00b", "\x00", "bad\ud800", "\udfff", " ", "\t\n ", "\u3000"]


def nested(levels: int) -> dict[str, Any]:
    """A mapping ``levels`` deep: {"k": {"k": ... {"k": 1}}}."""
    value: Any = 1
    for _ in range(levels):
        value = {"k": value}
    assert isinstance(value, dict)
    return value


async def refused(call: Callable[[], Awaitable[Any]]) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        await call()
    return info.value


@pytest.mark.parametrize("bad", BAD_IDS)
async def test_ids_with_nul_lone_surrogates_or_only_whitespace_are_refused(
    engine: ContextEngine, bad: str
) -> None:
    await engine.create_session("s", "u")
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: engine.create_session(bad, "u"),
        lambda: engine.create_session("t", bad),
        lambda: engine.get_or_create_session(bad, "u"),
        lambda: engine.create_chat("s", chat_id=bad),
        lambda: engine.track_usage("s", bad, QuotaType.API_CALLS),
        lambda: engine.track_usage(bad, "op", QuotaType.API_CALLS),
        lambda: engine.enforce_rate_limit("s", bad),
        lambda: engine.check_rate_limit("s", bad),
        lambda: engine.set_rate_limit("s", bad, 5, 60),
        lambda: engine.set_rate_limit(None, "op", 5, 60, user_id=bad),
        lambda: engine.manage_concurrency("s", bad),
        lambda: engine.manage_concurrency("s", bad, increment=False),
        lambda: engine.get_usage_history(operation=bad),
        lambda: engine.get_user_analytics(bad),
    ]
    for call in calls:
        await refused(call)

    async def slot() -> None:
        async with engine.concurrency_slot("s", bad):
            pass

    async def tracked() -> None:
        async with engine.track_request("s", bad):
            pass

    await refused(slot)
    await refused(tracked)
    with pytest.raises(ValidationError):
        engine.tenant(bad)
    # nothing was written
    assert [s.session_id for s in await engine.list_sessions()] == ["s"]
    assert len(await engine.list_chats("s")) == 1
    assert await engine.get_usage_history() == []
    assert (await engine.get_session("s")).request_count == 0  # type: ignore[union-attr]


async def test_ids_that_are_valid_text_are_kept_as_given(engine: ContextEngine) -> None:
    for sid in [" padded ", "ünïcødé", "emoji-\U0001f600", "a b"]:
        await engine.create_session(sid, sid)
        assert (await engine.get_session(sid)).user_id == sid  # type: ignore[union-attr]
        await engine.track_usage(sid, sid, QuotaType.API_CALLS)
    assert await engine.tenant("ümlaut tenant").count_sessions() == 0


async def test_json_nested_deeper_than_the_limit_is_refused(engine: ContextEngine) -> None:
    await engine.create_session("s", "u")
    for depth in (MAX_JSON_DEPTH + 1, 989, 990, 5_000, 100_000):
        deep = nested(depth)
        await refused(lambda deep=deep: engine.create_session("t", "u", metadata=deep))  # type: ignore[misc]
        await refused(lambda deep=deep: engine.create_session("t", "u", preferences=deep))  # type: ignore[misc]
        await refused(lambda deep=deep: engine.update_metadata("s", deep))  # type: ignore[misc]
        await refused(lambda deep=deep: engine.set_metadata("s", "k", deep["k"]))  # type: ignore[misc]
        await refused(lambda deep=deep: engine.add_message("s", "user", "hi", metadata=deep))  # type: ignore[misc]
        await refused(lambda deep=deep: engine.track_usage("s", "op", "tokens", 1, deep))  # type: ignore[misc]
        await refused(lambda deep=deep: engine.update_session("s", metadata=deep))  # type: ignore[misc]
    # lists count as levels too
    deep_list: Any = 1
    for _ in range(MAX_JSON_DEPTH + 1):
        deep_list = [deep_list]
    await refused(lambda: engine.set_metadata("s", "k", deep_list))
    assert await engine.get_all_metadata("s") == {}
    assert await engine.count_messages("s") == 0
    assert await engine.count_sessions() == 1


async def test_the_deepest_accepted_json_exports_and_imports(engine: ContextEngine) -> None:
    deepest = nested(MAX_JSON_DEPTH)
    session = await engine.create_session("s", "u", metadata=deepest, preferences=deepest)
    assert session.metadata == deepest
    await engine.set_metadata("s", "k", deepest["k"])  # {"k": ...} is MAX_JSON_DEPTH deep
    await engine.add_message("s", "user", "hi", metadata=deepest)
    chat = await engine.create_chat("s", metadata=deepest)
    exported = await engine.export_session("s")
    data = json.loads(json.dumps(exported))  # JSON-safe, and through a real JSON text
    imported = await engine.import_session(data, new_session_id="copy")
    assert imported.metadata == deepest and imported.preferences == deepest
    (message,) = await engine.get_messages("copy")
    assert message.metadata == deepest
    copied = await engine.get_chat("copy", chat.chat_id)
    assert copied is not None and copied.metadata == deepest
    again = await engine.export_session("copy")
    assert json.loads(json.dumps(again))["messages"] == data["messages"]


async def test_tags_are_bounded_and_checked_in_linear_time(engine: ContextEngine) -> None:
    most = [f"t{i}" for i in range(MAX_TAGS)]
    session = await engine.create_session("s", "u", tags=[*most, *most])  # duplicates dropped
    assert list(session.tags) == most
    await refused(lambda: engine.create_session("t", "u", tags=[*most, "one more"]))
    await refused(lambda: engine.create_session("t", "u", tags=["x" * 256]))
    await refused(lambda: engine.create_session("t", "u", tags=[" "]))
    started = time.perf_counter()
    await refused(lambda: engine.create_session("t", "u", tags=[f"t{i}" for i in range(100_000)]))
    await refused(lambda: engine.list_sessions(tags=[f"t{i}" for i in range(100_000)]))
    assert time.perf_counter() - started < 1.0
    assert await engine.count_sessions() == 1


async def test_quota_amounts_and_limits_that_could_overflow_are_refused(
    engine: ContextEngine,
) -> None:
    await engine.create_session("s", "u", tier="enterprise")  # unlimited
    for amount in (1e308, MAX_QUANTITY * 1.5, float("inf"), 10**400):
        await refused(lambda amount=amount: engine.track_usage("s", "op", "tokens", amount))  # type: ignore[misc]
    for limit in (1e309, 1e308, MAX_QUANTITY * 10, float("nan")):
        await refused(lambda limit=limit: engine.set_quota("s", "tokens", limit))  # type: ignore[misc]
    assert await engine.get_usage_history() == []
    # the largest amounts and limits are fine, and stay exact and finite together
    await engine.track_usage("s", "op", "tokens", MAX_QUANTITY)
    await engine.track_usage("s", "op", "tokens", MAX_QUANTITY)
    status = await engine.get_quota("s", "tokens")
    assert status.used == 2 * MAX_QUANTITY and status.limit is None
    status = await engine.set_quota("s", "api_calls", MAX_QUANTITY)
    assert status.limit == MAX_QUANTITY and status.remaining == MAX_QUANTITY
    # rate limits and look-backs: the same bounds on both backends
    await refused(lambda: engine.set_rate_limit("s", "op", 10**30, 60))
    await refused(lambda: engine.set_rate_limit("s", "op", 5, 1e300))
    await refused(lambda: engine.enforce_rate_limit("s", "op", cost=10**30))
    await refused(lambda: engine.predict_quota_exhaustion("s", lookback=1e300))


async def test_durations_and_imported_quotas_that_could_overflow_are_refused(
    engine: ContextEngine,
) -> None:
    await engine.create_session("s", "u")
    for seconds in (1e308, 10**400, float("inf")):
        await refused(lambda s=seconds: engine.update_session("s", add_processing_time=s))  # type: ignore[misc]
        await refused(lambda s=seconds: engine.create_session("t", "u", idle_timeout=s))  # type: ignore[misc]
    stored = await engine.get_session("s")
    assert stored is not None and stored.total_processing_time == 0.0
    assert await engine.get_session("t") is None
    data = await engine.export_session("s")
    data["quotas"] = [{"resource_type": "tokens", "used": 1e308, "limit": None}]
    await refused(lambda: engine.import_session(data, new_session_id="copy"))
    assert await engine.get_session("copy") is None
