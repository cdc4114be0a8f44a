"""Repositories hand services models or named tuples, never a driver row: every public
repository method's result is typed without ``Any`` or a row type, so mypy checks the
fields services read."""

from __future__ import annotations

import inspect
import typing
from types import UnionType
from typing import Any

import pytest

from ctxengine.storage.prebuilt import Record
from ctxengine.storage.repositories import (
    Repository,
    conversation,
    leases,
    memory,
    quotas,
    rate_limits,
    semantic_memory,
    sessions,
)

REPOSITORIES = [
    sessions.SessionRepository,
    conversation.ConversationRepository,
    quotas.QuotaRepository,
    rate_limits.RateLimitRepository,
    leases.LeaseRepository,
    memory.MemoryRepository,
    semantic_memory.SemanticMemoryRepository,
]
#: Results that are stored JSON documents, not rows (the limiter state of a key).
DOCUMENTS = {("RateLimitRepository", "lock_state"), ("RateLimitRepository", "peek_state")}


def _untyped(hint: Any) -> list[Any]:
    """The parts of ``hint`` that leave fields unchecked: Any, or a row type."""
    if hint is Any or hint is Record or getattr(hint, "__name__", "") == "Row":
        return [hint]
    origin = typing.get_origin(hint)
    if origin is dict:  # a mapping's values may be JSON
        key, value = typing.get_args(hint)
        return _untyped(key) + ([] if value is Any else _untyped(value))
    if origin is not None or isinstance(hint, UnionType):
        return [part for arg in typing.get_args(hint) for part in _untyped(arg)]
    return []


def _is_named_tuple(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, tuple) and hasattr(hint, "_fields")


def _methods() -> list[tuple[str, str, Any]]:
    found = []
    for repo in REPOSITORIES:
        assert issubclass(repo, Repository)
        for name, method in inspect.getmembers(repo, inspect.iscoroutinefunction):
            if not name.startswith("_"):
                found.append((repo.__name__, name, typing.get_type_hints(method)["return"]))
    return found


@pytest.mark.parametrize(("repo", "method", "result"), _methods())
def test_results_are_typed(repo: str, method: str, result: Any) -> None:
    if (repo, method) in DOCUMENTS:
        return
    assert _untyped(result) == [], f"{repo}.{method} returns {result}"


def _parts(hint: Any) -> list[Any]:
    """``hint`` and every type inside it."""
    return [hint, *(part for arg in typing.get_args(hint) for part in _parts(arg))]


def test_named_tuples_are_declared_beside_their_repository() -> None:
    named = {
        part for _, _, result in _methods() for part in _parts(result) if _is_named_tuple(part)
    }
    assert {t.__name__ for t in named} >= {"SessionKey", "Worker", "Taken", "Recorded"}
    for t in named:
        assert t.__module__.startswith("ctxengine.storage.repositories."), t
