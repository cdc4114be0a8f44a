"""LangGraph checkpoints (SPEC §11): a thread is a session; one unit of work per call.

The service stores what the saver serialized and never reads it: where it must know
which channel versions a checkpoint names (to load or keep their blobs), the caller
passes a function that tells it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ..errors import SessionNotFoundError
from ..lifecycle import can_work
from ..storage.connection import Connection
from ..storage.repositories.graph_checkpoints import (
    Blob,
    GraphCheckpointRepository,
    Listed,
    Stored,
    Thread,
    Write,
)
from .base import Context, Effects
from .sessions import SessionService

__all__ = [
    "Blob",
    "GraphCheckpointService",
    "Listed",
    "Loaded",
    "Stored",
    "Thread",
    "Write",
]

T = TypeVar("T")

#: Touches of a session that exists and can work before its refusal is diagnosed.
_TOUCHES = 3

#: A checkpoint read back, decoded by the caller, and the channel versions it names.
Decode = Callable[[Stored], tuple[T, Sequence[tuple[str, str]]]]
#: The channel versions a stored checkpoint names.
VersionsOf = Callable[[Stored], Sequence[tuple[str, str]]]


@dataclass(frozen=True, slots=True)
class Loaded(Generic[T]):
    """A checkpoint as the caller decoded it, with its blobs and pending writes."""

    stored: Stored
    decoded: T
    blobs: list[Blob]
    writes: list[Write]


class GraphCheckpointService:
    """Checkpoints, blobs and writes of LangGraph threads, for any tenant."""

    def __init__(self, ctx: Context, sessions: SessionService) -> None:
        self.ctx = ctx
        self.sessions = sessions
        self.repo = GraphCheckpointRepository(ctx.store.backend)

    # -- writes ---------------------------------------------------------------------------
    async def _touch(self, conn: Connection, fx: Effects, thread: Thread) -> bool:
        """Record activity on the thread's session if it can work; else leave the
        error in ``fx`` (False), or raise SessionNotFoundError when it does not exist.

        The first writes of a new thread race to create its session: a touch that
        found no session may see it created a moment later, so it looks again."""
        tenant, session_id = thread.tenant_id, thread.session_id
        for _ in range(_TOUCHES):
            if await self.sessions.repo.touch_active(conn, tenant, session_id, fx.now):
                return True
            session = await self.sessions.repo.get(conn, tenant, session_id, fx.now)
            if session is None:
                raise SessionNotFoundError(session_id, tenant)
            if not can_work(session, fx.now):
                break
        return await self.sessions.touch_active(conn, fx, tenant, session_id) is not None

    async def put(
        self,
        thread: Thread,
        checkpoint_id: str,
        parent_id: str | None,
        serialized: tuple[str, bytes],
        metadata: dict[str, Any],
        blobs: Sequence[Blob],
    ) -> None:
        """Store a checkpoint and the blobs of its new versions, recording activity on
        the thread's session, which must be able to work (SessionNotFoundError,
        SessionExpiredError, SessionNotActiveError; nothing is written then)."""

        if self.repo.writes_at_once:

            async def at_once(conn: Connection, fx: Effects) -> bool:
                return await self.repo.put_at_once(
                    conn, thread, checkpoint_id, parent_id, serialized, metadata, blobs, fx.now
                )

            if await self.ctx.transact(at_once, one_statement=True, operation="langgraph_put"):
                return
            # no session, or one that cannot work: the general path says which

        async def work(conn: Connection, fx: Effects) -> None:
            if not await self._touch(conn, fx, thread):
                return
            await self.repo.put(
                conn, thread, checkpoint_id, parent_id, serialized, metadata, blobs, fx.now
            )

        await self.ctx.transact(work, operation="langgraph_put")

    async def put_writes(
        self, thread: Thread, checkpoint_id: str, writes: Sequence[Write], *, replace: bool
    ) -> None:
        """Store pending writes of a checkpoint (the session rules as :meth:`put`)."""

        one_task = len({(w.task_id, w.task_path) for w in writes}) == 1
        if self.repo.writes_at_once and one_task:

            async def at_once(conn: Connection, fx: Effects) -> bool:
                return await self.repo.put_writes_at_once(
                    conn, thread, checkpoint_id, writes, fx.now, replace=replace
                )

            if await self.ctx.transact(
                at_once, one_statement=True, operation="langgraph_put_writes"
            ):
                return

        async def work(conn: Connection, fx: Effects) -> None:
            if not await self._touch(conn, fx, thread):
                return
            await self.repo.put_writes(conn, thread, checkpoint_id, writes, replace=replace)

        await self.ctx.transact(work, operation="langgraph_put_writes")

    # -- reads ----------------------------------------------------------------------------
    async def _load(
        self, conn: Connection, thread: Thread, rows: Sequence[Stored], decode: Decode[T]
    ) -> list[Loaded[T]]:
        decoded = [decode(row) for row in rows]
        wanted = sorted({pair for _, pairs in decoded for pair in pairs})
        blobs = {(b.channel, b.version): b for b in await self.repo.blobs(conn, thread, wanted)}
        writes: dict[str, list[Write]] = defaultdict(list)
        for checkpoint_id, write in await self.repo.writes(
            conn, thread, [row.checkpoint_id for row in rows]
        ):
            writes[checkpoint_id].append(write)
        return [
            Loaded(
                row,
                value,
                [blobs[pair] for pair in pairs if pair in blobs],
                writes.get(row.checkpoint_id, []),
            )
            for row, (value, pairs) in zip(rows, decoded, strict=True)
        ]

    async def get(
        self, thread: Thread, checkpoint_id: str | None, decode: Decode[T]
    ) -> Loaded[T] | None:
        """The checkpoint with this id, or the namespace's newest; None when absent."""

        async def work(conn: Connection, fx: Effects) -> Loaded[T] | None:
            row = await self.repo.get(conn, thread, checkpoint_id)
            if row is None:
                return None
            return (await self._load(conn, thread, [row], decode))[0]

        return await self.ctx.transact(work, write=False, operation="langgraph_get")

    async def listed(
        self,
        tenant: str,
        session_id: str | None,
        checkpoint_ns: str | None,
        checkpoint_id: str | None,
        before: str | None,
        limit: int | None,
    ) -> list[Listed]:
        """Ids and metadata of checkpoints, newest first (see the repository)."""

        async def work(conn: Connection, fx: Effects) -> list[Listed]:
            return await self.repo.listed(
                conn, tenant, session_id, checkpoint_ns, checkpoint_id, before, limit
            )

        return await self.ctx.transact(work, write=False, operation="langgraph_list")

    async def load(
        self, thread: Thread, ids: Sequence[str], decode: Decode[T]
    ) -> dict[str, Loaded[T]]:
        """These checkpoints of a namespace (those that still exist), by id."""

        async def work(conn: Connection, fx: Effects) -> dict[str, Loaded[T]]:
            rows = await self.repo.checkpoints(conn, thread, ids)
            loaded = await self._load(conn, thread, rows, decode)
            return {item.stored.checkpoint_id: item for item in loaded}

        return await self.ctx.transact(work, write=False, operation="langgraph_list")

    # -- deletes and copies ---------------------------------------------------------------
    async def delete_thread(self, tenant: str, session_id: str) -> None:
        """Delete a thread's checkpoints, blobs and writes (its session stays)."""

        async def work(conn: Connection, fx: Effects) -> None:
            await self.repo.delete_thread(conn, tenant, session_id)

        await self.ctx.transact(work, operation="langgraph_delete_thread")

    async def _collect(
        self, conn: Connection, tenant: str, session_id: str, versions_of: VersionsOf
    ) -> None:
        """Delete the blobs of a thread that no checkpoint of it names any more."""
        named: dict[str, set[tuple[str, str]]] = defaultdict(set)
        for row in await self.repo.thread(conn, tenant, session_id):
            named[row.checkpoint_ns].update(versions_of(row))
        for ns in await self.repo.blob_namespaces(conn, tenant, session_id):
            thread = Thread(tenant, session_id, ns)
            stored = await self.repo.blob_versions(conn, thread)
            garbage = [pair for pair in stored if pair not in named[ns]]
            await self.repo.delete_blobs(conn, thread, garbage)

    async def delete_runs(
        self, tenant: str, run_ids: Sequence[str], versions_of: VersionsOf
    ) -> None:
        """Delete the checkpoints (and their writes) made by these runs, then the blobs
        no checkpoint left names."""

        async def work(conn: Connection, fx: Effects) -> None:
            found = await self.repo.with_run_ids(conn, tenant, run_ids)
            by_thread: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
            for session_id, ns, checkpoint_id in found:
                by_thread[session_id][ns].append(checkpoint_id)
            for session_id in sorted(by_thread):
                await self.repo.lock(conn, tenant, session_id)
                for ns, ids in by_thread[session_id].items():
                    await self.repo.delete_checkpoints(conn, Thread(tenant, session_id, ns), ids)
                await self._collect(conn, tenant, session_id, versions_of)

        await self.ctx.transact(work, operation="langgraph_delete_for_runs")

    async def copy_thread(self, tenant: str, source: str, target: str) -> None:
        """Copy a thread's checkpoints, blobs and writes to another (existing) thread."""

        async def work(conn: Connection, fx: Effects) -> None:
            await self.repo.lock(conn, tenant, target)
            await self.repo.copy_thread(conn, tenant, source, target)

        await self.ctx.transact(work, operation="langgraph_copy_thread")

    async def prune(
        self,
        tenant: str,
        session_id: str,
        keep: int,
        versions_of: VersionsOf,
        check: Callable[[Sequence[Stored]], None],
    ) -> None:
        """Keep the newest ``keep`` checkpoints of each namespace of a thread (0: none),
        their writes and the blobs they name; delete the rest. ``check`` may refuse
        (raise) after seeing the thread's checkpoints; nothing is deleted then. The
        thread's session row is locked first: its writers wait for the prune."""

        async def work(conn: Connection, fx: Effects) -> None:
            if not await self.repo.lock(conn, tenant, session_id):
                return
            if keep == 0:
                await self.repo.delete_thread(conn, tenant, session_id)
                return
            rows = await self.repo.thread(conn, tenant, session_id)
            check(rows)
            ids: dict[str, list[str]] = defaultdict(list)
            for row in rows:  # oldest first per namespace
                ids[row.checkpoint_ns].append(row.checkpoint_id)
            for ns, found in ids.items():
                await self.repo.delete_checkpoints(
                    conn, Thread(tenant, session_id, ns), found[:-keep]
                )
            await self._collect(conn, tenant, session_id, versions_of)

        await self.ctx.transact(work, operation="langgraph_prune")
