"""Key-value memory (SPEC §13): items that outlive sessions, scoped, versioned, with TTLs."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from .. import validation as v
from ..errors import ConflictError, ValidationError
from ..models import MemoryItem
from ..storage.connection import Connection
from ..storage.repositories.memory import NO_SCOPE, MemoryRepository, MemoryScope
from ..storage.repositories.semantic_memory import SemanticMemoryRepository
from .base import Context, Effects

log = logging.getLogger("ctxengine.memory")

#: Expired items one unit of work of the sweep deletes (as the session sweep's batches).
_SWEEP_BATCH = 5000
#: The most items one list_memories page holds.
MAX_PAGE = 1000


def scope(tenant: str, user_id: object, session_id: object, namespace: object) -> MemoryScope:
    """The validated scope: a session narrows a user's scope, so it needs the user."""
    user = v.optional_identifier(user_id, "user_id")
    session = v.optional_identifier(session_id, "session_id")
    if session is not None and user is None:
        raise ValidationError(
            "session_id narrows a user's memory: pass user_id too", field="session_id"
        )
    return MemoryScope(
        tenant,
        NO_SCOPE if user is None else user,
        NO_SCOPE if session is None else session,
        v.identifier(namespace, "namespace"),
    )


def memory_value(value: object, max_bytes: int) -> Any:
    """A JSON value (not null: recall answers None for "nothing stored") of at most
    ``max_bytes`` encoded, as it reads back."""
    if value is None:
        raise ValidationError(
            "value must not be None (recall returns None for a missing key): use forget",
            field="value",
        )
    encoded = v.json_text(value, "value")
    _string_keys(value)
    size = len(encoded.encode())
    if size > max_bytes:
        raise ValidationError(
            f"value is {size} bytes as JSON; at most {max_bytes} are allowed (max_metadata_bytes)",
            field="value",
        )
    return json.loads(encoded)


def _string_keys(value: object) -> None:
    """Refuse mappings with keys that are not strings, at any depth (JSON would turn
    them into strings: the value read back would differ from the one written)."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, Mapping):
            if not all(isinstance(key, str) for key in node):
                raise ValidationError("value: mapping keys must be strings", field="value")
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)


class MemoryService:
    """remember / recall / forget / list_memories, forget_user, and the expiry sweep."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.repo = MemoryRepository(ctx.store.backend)
        #: semantic memories: forget_user and the sweep remove them with the items
        self.semantic = SemanticMemoryRepository(ctx.store.backend)

    async def remember(
        self,
        where: MemoryScope,
        key: object,
        value: object,
        ttl: object,
        expected_version: object,
    ) -> MemoryItem:
        name = v.identifier(key, "key")
        stored = memory_value(value, self.ctx.settings.max_metadata_bytes)
        seconds = None if ttl is None else v.seconds(ttl, "ttl")
        expected = None
        if expected_version is not None:
            expected = v.count(expected_version, "expected_version")

        async def work(conn: Connection, fx: Effects) -> MemoryItem:
            item = await self.repo.put(conn, where, name, stored, fx.now, seconds, expected)
            if item is None:
                assert expected is not None
                actual = await self.repo.version(conn, where, name, fx.now)
                raise ConflictError(f"the version of memory {name!r}", expected, actual)
            return item

        # one statement writes, or nothing is written (the version read after a lost
        # compare-and-set only fills in the error)
        return await self.ctx.transact(work, one_statement=True, operation="remember")

    async def get(self, where: MemoryScope, key: object) -> MemoryItem | None:
        name = v.identifier(key, "key")

        async def work(conn: Connection, fx: Effects) -> MemoryItem | None:
            return await self.repo.get(conn, where, name, fx.now)

        return await self.ctx.transact(work, write=False, operation="recall")

    async def forget(self, where: MemoryScope, key: object) -> bool:
        name = v.identifier(key, "key")

        async def work(conn: Connection, fx: Effects) -> bool:
            return await self.repo.forget(conn, where, name, fx.now)

        return await self.ctx.transact(work, one_statement=True, operation="forget")

    async def page(
        self, where: MemoryScope, prefix: object, limit: object, cursor: object
    ) -> list[MemoryItem]:
        start = None if prefix is None else v.identifier(prefix, "prefix")
        size = v.limit(limit)
        if size > MAX_PAGE:
            raise ValidationError(
                f"limit must be at most {MAX_PAGE}, got {size}", field="limit", value=size
            )
        after = None if cursor is None else v.identifier(cursor, "cursor")

        async def work(conn: Connection, fx: Effects) -> list[MemoryItem]:
            return await self.repo.page(conn, where, fx.now, start, size, after)

        return await self.ctx.transact(work, write=False, operation="list_memories")

    async def forget_user(self, tenant: str, user_id: object) -> int:
        user = v.identifier(user_id, "user_id")

        async def work(conn: Connection, fx: Effects) -> int:
            items = await self.repo.forget_user(conn, tenant, user)
            return items + await self.semantic.forget_user(conn, tenant, user)

        return await self.ctx.transact(work, operation="forget_user")

    async def sweep(self) -> int:
        """Delete expired items and semantic memories, each in batches until one is not
        full; how many."""
        total = 0
        for repo in (self.repo, self.semantic):

            async def work(conn: Connection, fx: Effects, repo: Any = repo) -> int:
                return int(await repo.delete_expired(conn, fx.now, _SWEEP_BATCH))

            while True:
                removed = await self.ctx.transact(work, operation="cleanup_expired_memory")
                total += removed
                if removed < _SWEEP_BATCH:
                    break
        if total:
            log.info("deleted expired memories", extra={"deleted": total})
        return total
