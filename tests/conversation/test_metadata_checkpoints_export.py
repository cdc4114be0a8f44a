"""Metadata merged in SQL, checkpoints, export/import, templates, redaction."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from ctxengine import ContextEngine, EngineSettings, QuotaType, SessionStatus, SessionTemplate
from ctxengine.errors import (
    CheckpointNotFoundError,
    SessionExistsError,
    SessionNotFoundError,
    ValidationError,
)
from ctxengine.redaction import DEFAULT_SECRET_PATTERNS

QUIET = {"auto_cleanup": False}


async def count(engine: ContextEngine, table: str) -> int:
    async with engine._store.engine.connect() as conn:
        return int((await conn.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one())


async def test_metadata_calls(engine: ContextEngine) -> None:
    await engine.create_session("s", "u", metadata={"a": 1})
    assert await engine.set_metadata("s", "b", {"nested": [1, "x", None]}) == {
        "a": 1,
        "b": {"nested": [1, "x", None]},
    }
    assert await engine.get_metadata("s", "b") == {"nested": [1, "x", None]}
    assert await engine.get_metadata("s", "missing", "fallback") == "fallback"
    assert await engine.update_metadata("s", {"a": 2, "c": True}) == {
        "a": 2,
        "b": {"nested": [1, "x", None]},
        "c": True,
    }
    assert await engine.delete_metadata("s", "b") == {"a": 2, "c": True}
    assert await engine.delete_metadata("s", "never there") == {"a": 2, "c": True}
    assert await engine.get_all_metadata("s") == {"a": 2, "c": True}
    session = await engine.get_session("s")
    assert session is not None and session.metadata == {"a": 2, "c": True}


@pytest.mark.parametrize(
    ("key", "value"),
    [("k", {1, 2}), ("k", float("inf")), ("k", b"bytes"), ("", 1), ("k", "\x00"), ("k", "x" * 300)],
)
async def test_bad_metadata_writes_nothing(db_url: str, key: str, value: Any) -> None:
    async with ContextEngine(db_url, settings=EngineSettings(**QUIET, max_metadata_bytes=200)) as e:
        await e.create_session("s", "u", metadata={"keep": "me"})
        with pytest.raises(ValidationError):
            await e.set_metadata("s", key, value)
        assert await e.get_all_metadata("s") == {"keep": "me"}


async def test_metadata_may_not_grow_past_the_limit(db_url: str) -> None:
    async with ContextEngine(db_url, settings=EngineSettings(**QUIET, max_metadata_bytes=120)) as e:
        await e.create_session("s", "u")
        for i in range(3):
            await e.set_metadata("s", f"key{i}", "v" * 20)
        with pytest.raises(ValidationError, match="max_metadata_bytes"):
            await e.set_metadata("s", "key3", "v" * 20)
        assert sorted(await e.get_all_metadata("s")) == ["key0", "key1", "key2"]
        with pytest.raises(SessionNotFoundError):
            await e.set_metadata("nobody", "k", 1)


async def test_20_concurrent_writers_of_distinct_keys_all_survive(engine: ContextEngine) -> None:
    await engine.create_session("s", "u")
    await asyncio.gather(*(engine.set_metadata("s", f"writer{i}", i) for i in range(20)))
    assert await engine.get_all_metadata("s") == {f"writer{i}": i for i in range(20)}


async def test_checkpoint_and_restore_exactly(engine: ContextEngine) -> None:
    await engine.create_session("s", "u", system_prompt="rules", metadata={"v": 1})
    await engine.add_message("s", "user", "before", tokens=3)
    second = await engine.create_chat("s", "side", metadata={"topic": "x"})
    await engine.add_message("s", "user", "side note", chat_id=second.chat_id)
    before = await engine.export_session("s")
    saved = await engine.checkpoint("s", "before changes")
    assert saved.description == "before changes"

    await engine.add_message("s", "assistant", "after")
    await engine.set_metadata("s", "v", 2)
    await engine.delete_chat("s", second.chat_id)
    await engine.switch_chat("s", (await engine.create_chat("s", "new")).chat_id)
    assert [c.checkpoint_id for c in await engine.list_checkpoints("s")] == [saved.checkpoint_id]

    restored = await engine.restore_checkpoint("s", saved.checkpoint_id)
    assert restored.metadata == {"v": 1}
    assert restored.current_chat_id == "default"
    after = await engine.export_session("s")
    assert after["chats"] == before["chats"]
    assert after["messages"] == before["messages"]
    assert after["metadata"] == before["metadata"]
    assert (await engine.get_session_stats("s")).chat_count == 2
    # appends continue after the restored sequence numbers
    assert (await engine.add_message("s", "user", "again")).seq == 3
    with pytest.raises(CheckpointNotFoundError):
        await engine.restore_checkpoint("s", "nope")


async def test_export_import_round_trip(engine: ContextEngine, tmp_path: Path) -> None:
    await engine.create_session("s", "u", tier="pro", tags=["t"], name="n", system_prompt="rules")
    await engine.add_message("s", "user", "hello ✓", metadata={"k": [1, 2.5]}, tokens=7)
    await engine.track_usage("s", "llm", QuotaType.TOKENS, 120)
    await engine.set_quota("s", QuotaType.API_CALLS, 50)
    await engine.update_session("s", increment_requests=True, add_processing_time=0.25)
    exported = await engine.export_session("s")
    assert exported["format_version"] == 1
    path = tmp_path / "s.json"
    path.write_text(json.dumps(exported))

    imported = await engine.import_session(json.loads(path.read_text()), new_session_id="copy")
    assert imported.session_id == "copy"
    assert (imported.tier, imported.tags, imported.request_count) == ("pro", ["t"], 1)
    again = await engine.export_session("copy")
    assert again == {**exported, "session": {**exported["session"], "session_id": "copy"}}
    quota = await engine.get_quota("copy", QuotaType.TOKENS)
    assert (quota.used, quota.limit) == (120, 2_500_000)
    assert (await engine.get_quota("copy", QuotaType.API_CALLS)).limit == 50

    with pytest.raises(SessionExistsError):
        await engine.import_session(exported)


def _broken(exported: dict[str, Any]) -> list[Any]:
    def with_(change: Any) -> dict[str, Any]:
        doc = copy.deepcopy(exported)
        change(doc)
        return doc

    return [
        "not a dict",
        with_(lambda d: d.update(format_version=2)),
        with_(lambda d: d.pop("format_version")),
        with_(lambda d: d.pop("session")),
        with_(lambda d: d["messages"][0].update(role="wizard")),
        with_(lambda d: d["messages"][0].update(chat_id="elsewhere")),
        with_(lambda d: d["messages"].append(dict(d["messages"][0]))),
        with_(lambda d: d["messages"][0].update(created_at="yesterday")),
        with_(lambda d: d["session"].update(tier="platinum")),
        with_(lambda d: d["session"].update(request_count=-1)),
        with_(lambda d: d.update(current_chat_id="ghost")),
        with_(lambda d: d["quotas"].append({"resource_type": "gold", "used": 1})),
        with_(lambda d: d.update(unexpected=True)),
        with_(lambda d: d["quotas"].append(dict(d["quotas"][0]))),
    ]


async def test_import_refuses_bad_documents_and_writes_nothing(engine: ContextEngine) -> None:
    await engine.create_session("s", "u")
    await engine.add_message("s", "user", "hello")
    await engine.track_usage("s", "llm", QuotaType.TOKENS, 5)
    exported = await engine.export_session("s")
    await engine.delete_session("s")
    for doc in _broken(exported):
        with pytest.raises(ValidationError) as caught:
            await engine.import_session(doc)
        assert caught.value.field in {"data", "format_version", "tier"}
    for table in ("ctx_sessions", "ctx_chats", "ctx_messages", "ctx_quotas"):
        assert await count(engine, table) == 0


async def test_templates(engine: ContextEngine) -> None:
    template = SessionTemplate(
        name="coding-assistant",
        system_prompt="You write Python.",
        metadata={"language": "python"},
        tier="basic",
        tags=["code"],
    )
    session = await engine.create_session_from_template(
        template, "u", session_id="t1", metadata={"repo": "x"}
    )
    assert (session.session_id, session.tier, session.tags) == ("t1", "basic", ["code"])
    assert session.name == "coding-assistant"
    assert session.metadata == {"language": "python", "repo": "x"}
    (prompt,) = await engine.get_messages("t1")
    assert (prompt.role, prompt.content) == ("system", "You write Python.")
    other = await engine.create_session_from_template(template, "u", tier="pro", tags=[])
    assert (other.tier, other.tags) == ("pro", [])
    with pytest.raises(ValidationError, match="unknown overrides"):
        await engine.create_session_from_template(template, "u", colour="red")


SECRETS = [
    "my key is sk-proj-Ab12Cd34Ef56Gh78Ij90KlMnOp",
    "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig",
    "aws AKIAIOSFODNN7EXAMPLE here",
    "token ghp_0123456789abcdefghijABCDEFGHIJ012345",
    "login with password=hunter2 please",
]


async def test_redaction_applies_before_storing(db_url: str) -> None:
    settings = EngineSettings(**QUIET, redact_patterns=DEFAULT_SECRET_PATTERNS)
    async with ContextEngine(db_url, settings=settings) as engine:
        await engine.create_session("s", "u", system_prompt="admin password: swordfish")
        for secret in SECRETS:
            stored = await engine.add_message("s", "user", secret)
            assert "[REDACTED]" in stored.content
        plain = "the task-list skeleton is ready; password reset link sent"
        assert (await engine.add_message("s", "user", plain)).content == plain
        async with engine._store.engine.connect() as conn:
            contents = (await conn.execute(text("SELECT content FROM ctx_messages"))).scalars()
            everything = "\n".join(contents)
        for leaked in ("swordfish", "hunter2", "AKIAIOSFODNN7EXAMPLE", "Ab12Cd34Ef56", "ghp_0123"):
            assert leaked not in everything


async def test_invalid_redact_patterns_fail_early() -> None:
    with pytest.raises(ValueError, match="redact pattern"):
        EngineSettings(redact_patterns=("(unclosed",))


async def test_imported_sessions_count_toward_session_limits(db_url: str) -> None:
    settings = EngineSettings(**QUIET, max_sessions_per_user=1)
    async with ContextEngine(db_url, settings=settings) as engine:
        await engine.create_session("s", "u")
        exported = await engine.export_session("s")
        from ctxengine.errors import SessionLimitError

        with pytest.raises(SessionLimitError):
            await engine.import_session(exported, new_session_id="s2")
        await engine.end_session("s")
        ended = await engine.export_session("s")
        copy_ = await engine.import_session(ended, new_session_id="s3")
        assert copy_.status is SessionStatus.COMPLETED
