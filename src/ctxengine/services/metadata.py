"""Session metadata and shared state documents (SPEC §4), merged in SQL."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import validation as v
from ..errors import SessionNotFoundError
from ..storage.connection import Connection
from ..storage.repositories.conversation import ConversationRepository
from .base import Context, Effects

if TYPE_CHECKING:
    from .sessions import SessionService


class MetadataService:
    """A session's metadata, and JSON documents a tenant's sessions share."""

    def __init__(self, ctx: Context, sessions: SessionService) -> None:
        self.ctx = ctx
        self.sessions = sessions
        self.repo = ConversationRepository(ctx.store.backend)

    async def change_metadata(
        self, tenant: str, session_id: str, patch: object, remove: str | None = None
    ) -> dict[str, Any]:
        """Merge ``patch`` into the session's metadata (or remove the key ``remove``) in
        SQL; the whole metadata after the change."""
        v.identifier(session_id)
        max_bytes = self.ctx.settings.max_metadata_bytes
        changes = {} if remove is not None else v.json_object(patch, "metadata", max_bytes)

        async def work(conn: Connection, fx: Effects) -> dict[str, Any]:
            if remove is not None:
                result = await self.repo.remove_metadata(conn, tenant, session_id, remove)
            else:
                result = await self.repo.merge_metadata(conn, tenant, session_id, changes)
            if result is None:
                raise SessionNotFoundError(session_id, tenant)
            v.merged_size(result, "metadata", max_bytes)
            return result

        return await self.ctx.transact(work, operation="update_metadata")

    async def metadata(self, tenant: str, session_id: str) -> dict[str, Any]:
        v.identifier(session_id)

        async def work(conn: Connection, fx: Effects) -> dict[str, Any]:
            session = await self.sessions.existing(conn, tenant, session_id, fx.now)
            return dict(session.metadata)

        return await self.ctx.transact(work, write=False, operation="get_metadata")

    # -- shared state ---------------------------------------------------------------------
    async def shared_state(self, tenant: str, key: str) -> dict[str, Any]:
        v.identifier(key, "key")

        async def work(conn: Connection, fx: Effects) -> dict[str, Any]:
            return await self.repo.shared_state(conn, tenant, key)

        return await self.ctx.transact(work, write=False, operation="get_shared_state")

    async def update_shared_state(self, tenant: str, key: str, patch: object) -> dict[str, Any]:
        v.identifier(key, "key")
        max_bytes = self.ctx.settings.max_metadata_bytes
        changes = v.json_object(patch, "state", max_bytes)

        async def work(conn: Connection, fx: Effects) -> dict[str, Any]:
            result = await self.repo.merge_shared_state(conn, tenant, key, changes, fx.now)
            v.merged_size(result, "state", max_bytes)
            return result

        return await self.ctx.transact(work, operation="update_shared_state")
