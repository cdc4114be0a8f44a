"""export_session → import_session is lossless for any session (hypothesis)."""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctxengine import ContextEngine, EngineSettings, QuotaType

SETTINGS = EngineSettings(auto_cleanup=False, auto_migrate=False)

text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20
)
words = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    min_size=1,
    max_size=20,
)
#: Ids and tags: not only whitespace.
ids = words.filter(str.strip)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)
json_objects = st.dictionaries(text, json_values, max_size=4)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "tool"]), "content": words},
        optional={"metadata": json_objects, "tokens": st.integers(0, 10**6)},
    ),
    max_size=6,
)
chats = st.lists(
    st.fixed_dictionaries(
        {
            "name": st.none() | text,
            "metadata": json_objects,
            "max_messages": st.none() | st.integers(10, 100),
            "system_prompt": st.none() | words,
            "messages": messages,
        }
    ),
    max_size=3,
)
sessions = st.fixed_dictionaries(
    {
        "user_id": ids,
        "tier": st.sampled_from(["free", "basic", "pro", "enterprise"]),
        "name": st.none() | text,
        "tags": st.lists(ids, max_size=3),
        "metadata": json_objects,
        "preferences": json_objects,
        "default_messages": messages,
        "chats": chats,
        "usage": st.lists(
            st.tuples(st.sampled_from([QuotaType.TOKENS, QuotaType.API_CALLS]), st.integers(1, 9)),
            max_size=3,
        ),
        "requests": st.integers(0, 3),
        "end": st.sampled_from([None, "completed", "failed", "expired"]),
    }
)


async def build_export_import(url: str, spec: dict[str, Any], n: int) -> tuple[Any, Any]:
    async with ContextEngine(url, settings=SETTINGS) as engine:
        sid = f"original-{n}"
        await engine.create_session(
            sid,
            spec["user_id"],
            tier=spec["tier"],
            name=spec["name"],
            tags=spec["tags"],
            metadata=spec["metadata"],
            preferences=spec["preferences"],
        )
        await engine.add_messages(sid, spec["default_messages"])
        for chat in spec["chats"]:
            created = await engine.create_chat(
                sid,
                chat["name"],
                system_prompt=chat["system_prompt"],
                metadata=chat["metadata"],
                max_messages=chat["max_messages"],
            )
            await engine.add_messages(sid, chat["messages"], chat_id=created.chat_id)
            await engine.switch_chat(sid, created.chat_id)
        for kind, amount in spec["usage"]:
            await engine.track_usage(sid, "op", kind, amount)
        for _ in range(spec["requests"]):
            await engine.update_session(sid, increment_requests=True, add_processing_time=0.125)
        if spec["end"] is not None:
            await engine.end_session(sid, spec["end"])
        exported = await engine.export_session(sid)
        view = engine.tenant("elsewhere")
        await view.import_session(exported, new_session_id=f"copy-{n}")
        return exported, await view.export_session(f"copy-{n}")


def test_export_import_round_trip_is_lossless(db_url: str) -> None:
    counter = iter(range(10**6))

    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(spec=sessions)
    def check(spec: dict[str, Any]) -> None:
        n = next(counter)
        original, copy = asyncio.run(build_export_import(db_url, spec, n))
        assert copy["session"].pop("session_id") == f"copy-{n}"
        assert original["session"].pop("session_id") == f"original-{n}"
        assert copy == original

    check()
