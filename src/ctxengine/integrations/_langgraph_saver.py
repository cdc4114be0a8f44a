"""The LangGraph checkpointer: :class:`ContextEngineSaver` (see ``integrations.langgraph``)."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn
from uuid import UUID

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    DeltaChannelHistory,
    PendingWrite,
    get_checkpoint_id,
    get_serializable_checkpoint_metadata,
    writes_sort_key,
)
from langgraph.checkpoint.serde.base import SerializerProtocol

from .. import validation as v
from ..errors import SessionNotFoundError, ValidationError
from ..services.graph_checkpoints import Blob, Loaded, Stored, Thread, Write
from ._adapter import Closable

if TYPE_CHECKING:
    from ..services.graph_checkpoints import GraphCheckpointService
    from ..tenant import TenantView

__all__ = ["ContextEngineSaver"]

#: Checkpoints loaded per unit of work while listing.
_LIST_BATCH = 50
#: Metadata a DeltaChannel leaves on the checkpoints of a thread that uses one.
_DELTA_KEYS = ("counters_since_delta_snapshot", "delta_writes_versioned")
_STRATEGIES = ("keep_latest", "delete")


def _text_id(value: object, field: str) -> str:
    """A thread id as stored: strings as given, ints and UUIDs as their text."""
    if isinstance(value, int | UUID) and not isinstance(value, bool):
        value = str(value)
    return v.identifier(value, field)


def _ns(configurable: dict[str, Any]) -> str:
    ns = configurable.get("checkpoint_ns", "")
    if not isinstance(ns, str):
        raise ValidationError("checkpoint_ns must be a string", field="checkpoint_ns")
    return ns


def _configurable(config: RunnableConfig | None) -> dict[str, Any]:
    configurable = (config or {}).get("configurable")
    return configurable if isinstance(configurable, dict) else {}


class ContextEngineSaver(Closable, BaseCheckpointSaver[str]):
    """A LangGraph checkpointer on ctxengine: each thread is an engine session.

    ``engine`` is a :class:`~ctxengine.ContextEngine` or a tenant view of one (threads
    of other tenants are never seen). On the first write to a thread the session
    ``thread_id`` is created (or, when it already exists, used as it is) for user
    ``config["configurable"]["user_id"]`` when given, else the thread id, with the
    saver's ``tier`` and ``idle_timeout`` (None, the default: never idle) and the tag
    ``langgraph``. Every write records activity on that session in the same
    transaction, and needs it able to work: writing to an ended thread raises
    :class:`~ctxengine.errors.SessionNotActiveError`, to an expired one
    :class:`~ctxengine.errors.SessionExpiredError`. Reads work in any status.
    Deleting or purging the session deletes its checkpoints.

    Checkpoints are serialized by ``serde`` (LangGraph's ``JsonPlusSerializer`` by
    default); each channel value is stored once per version. Thread ids are at most
    255 characters (:class:`~ctxengine.errors.ValidationError`, a ``ValueError``).

    Only the async methods work (``ainvoke``, ``astream``...); the sync ones raise
    ``NotImplementedError`` naming their async twin. Writes to one thread take turns
    on its session row; different threads never wait for each other in the saver.
    """

    def __init__(
        self,
        engine: TenantView,
        *,
        tier: str = "enterprise",
        idle_timeout: float | None = None,
        serde: SerializerProtocol | None = None,
    ) -> None:
        super().__init__(serde=serde)
        self.engine = engine
        self.tier = tier
        self.idle_timeout = idle_timeout

    # -- plumbing -------------------------------------------------------------------------
    def _service(self) -> GraphCheckpointService:
        self._check_open()
        return self.engine._runtime().graph

    def _thread(self, config: RunnableConfig) -> tuple[Thread, Any]:
        """Where ``config`` points, and its thread id as given."""
        configurable = _configurable(config)
        given = configurable.get("thread_id")
        if given is None:
            raise ValidationError(
                'config["configurable"]["thread_id"] is required', field="thread_id"
            )
        session_id = _text_id(given, "thread_id")
        return Thread(self.engine.tenant_id, session_id, _ns(configurable)), given

    async def _write(self, config: RunnableConfig, thread: Thread, call: Any) -> None:
        """Run ``call()`` (a write), creating the thread's session first when missing."""
        try:
            await call()
        except SessionNotFoundError:
            user = _configurable(config).get("user_id")
            await self.engine.get_or_create_session(
                thread.session_id,
                thread.session_id if user is None else v.identifier(user, "user_id"),
                tier=self.tier,
                tags=["langgraph"],
                idle_timeout=self.idle_timeout,
                max_messages=None,
            )
            await call()

    def _decode(self, stored: Stored) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        checkpoint: dict[str, Any] = self.serde.loads_typed((stored.type, stored.checkpoint))
        versions = checkpoint.get("channel_versions") or {}
        return checkpoint, [(channel, str(version)) for channel, version in versions.items()]

    def _versions(self, stored: Stored) -> list[tuple[str, str]]:
        return self._decode(stored)[1]

    def _tuple(self, given: Any, item: Loaded[dict[str, Any]]) -> CheckpointTuple:
        stored = item.stored
        values = {
            b.channel: self.serde.loads_typed((b.type, b.blob or b""))
            for b in item.blobs
            if b.type != "empty"
        }
        writes = sorted(item.writes, key=lambda w: writes_sort_key(w.task_path, w.task_id, w.idx))
        pending: list[PendingWrite] = [
            (w.task_id, w.channel, self.serde.loads_typed((w.type, w.blob))) for w in writes
        ]

        def config(checkpoint_id: str) -> RunnableConfig:
            return {
                "configurable": {
                    "thread_id": given,
                    "checkpoint_ns": stored.checkpoint_ns,
                    "checkpoint_id": checkpoint_id,
                }
            }

        checkpoint: Any = {**item.decoded, "channel_values": values}
        return CheckpointTuple(
            config(stored.checkpoint_id),
            checkpoint,
            stored.metadata,  # type: ignore[arg-type]
            None if stored.parent_checkpoint_id is None else config(stored.parent_checkpoint_id),
            pending,
        )

    # -- the async interface --------------------------------------------------------------
    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """The checkpoint ``config`` names (its ``checkpoint_id``, else the newest of its
        thread and namespace) with its pending writes; None when there is none."""
        service = self._service()
        thread, given = self._thread(config)
        item = await service.get(thread, get_checkpoint_id(config), self._decode)
        return None if item is None else self._tuple(given, item)

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        """Checkpoints newest first: of the thread (and namespace, and id) ``config``
        names, or of every thread of the tenant without one; whose metadata has every
        key of ``filter`` with its value; with ids before ``before``'s; at most
        ``limit``."""
        service = self._service()
        configurable = _configurable(config)
        given = configurable.get("thread_id")
        session_id = None if given is None else _text_id(given, "thread_id")
        ns = configurable.get("checkpoint_ns")
        before_id = None if before is None else get_checkpoint_id(before)
        rows = await service.listed(
            self.engine.tenant_id,
            session_id,
            ns,
            get_checkpoint_id(config) if config else None,
            before_id,
            None if filter else limit,
        )
        if filter:
            rows = [r for r in rows if all(r.metadata.get(k) == f for k, f in filter.items())]
            if limit is not None:
                rows = rows[: max(limit, 0)]
        for start in range(0, len(rows), _LIST_BATCH):
            batch = rows[start : start + _LIST_BATCH]
            found: dict[tuple[str, str, str], Loaded[dict[str, Any]]] = {}
            groups: dict[Thread, list[str]] = {}
            for row in batch:
                thread = Thread(self.engine.tenant_id, row.session_id, row.checkpoint_ns)
                groups.setdefault(thread, []).append(row.checkpoint_id)
            for thread, ids in groups.items():
                for checkpoint_id, item in (await service.load(thread, ids, self._decode)).items():
                    found[(thread.session_id, thread.checkpoint_ns, checkpoint_id)] = item
            for row in batch:
                loaded = found.get((row.session_id, row.checkpoint_ns, row.checkpoint_id))
                if loaded is not None:  # deleted since it was listed: skipped
                    yield self._tuple(row.session_id if given is None else given, loaded)

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """Store ``checkpoint`` (its channel values of ``new_versions`` as blobs, once
        per version) as a child of ``config``'s checkpoint; the config naming it."""
        service = self._service()
        thread, given = self._thread(config)
        parent = get_checkpoint_id(config)
        stripped: dict[str, Any] = dict(checkpoint)
        values = stripped.pop("channel_values")
        blobs = [
            Blob(
                channel,
                str(version),
                *(
                    self.serde.dumps_typed(values[channel])
                    if channel in values
                    else ("empty", None)
                ),
            )
            for channel, version in new_versions.items()
        ]
        serialized = self.serde.dumps_typed(stripped)
        meta = dict(get_serializable_checkpoint_metadata(config, metadata))
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as exc:
            raise ValidationError(
                f"checkpoint metadata must be JSON data: {exc}", field="metadata"
            ) from exc
        checkpoint_id = v.identifier(checkpoint["id"], "checkpoint id")

        async def put() -> None:
            await service.put(thread, checkpoint_id, parent, serialized, meta, blobs)

        await self._write(config, thread, put)
        return {
            "configurable": {
                "thread_id": given,
                "checkpoint_ns": thread.checkpoint_ns,
                "checkpoint_id": checkpoint_id,
            }
        }

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """Store a task's pending writes of ``config``'s checkpoint: special writes
        (errors, interrupts...) replace the task's previous one, the others are kept
        as first written."""
        service = self._service()
        thread, _ = self._thread(config)
        checkpoint_id = get_checkpoint_id(config)
        if checkpoint_id is None:
            raise ValidationError(
                'config["configurable"]["checkpoint_id"] is required', field="checkpoint_id"
            )
        rows = [
            Write(
                task_id,
                WRITES_IDX_MAP.get(channel, idx),
                channel,
                *self.serde.dumps_typed(value),
                task_path,
            )
            for idx, (channel, value) in enumerate(writes)
        ]
        replace = all(channel in WRITES_IDX_MAP for channel, _ in writes)

        async def put() -> None:
            await service.put_writes(thread, checkpoint_id, rows, replace=replace)

        await self._write(config, thread, put)

    async def adelete_thread(self, thread_id: str) -> None:
        """Delete every checkpoint and write of the thread (its session stays; delete
        the session to remove the thread entirely)."""
        service = self._service()
        await service.delete_thread(self.engine.tenant_id, _text_id(thread_id, "thread_id"))

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Delete the checkpoints whose metadata names one of ``run_ids``, with their
        writes (and the channel values no checkpoint left needs)."""
        service = self._service()
        if run_ids:
            await service.delete_runs(self.engine.tenant_id, list(run_ids), self._versions)

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Copy every checkpoint and write of a thread to another (created as a session
        of the source's user when missing); nothing happens when the source does not
        exist."""
        service = self._service()
        source = _text_id(source_thread_id, "source_thread_id")
        target = _text_id(target_thread_id, "target_thread_id")
        found = await self.engine.get_session(source)
        if found is None:
            return
        await self.engine.get_or_create_session(
            target,
            found.user_id,
            tier=self.tier,
            tags=["langgraph"],
            idle_timeout=self.idle_timeout,
            max_messages=None,
        )
        await service.copy_thread(self.engine.tenant_id, source, target)

    async def aprune(
        self, thread_ids: Sequence[str], *, strategy: str = "keep_latest", keep: int = 1
    ) -> None:
        """Prune threads: ``"keep_latest"`` keeps the newest ``keep`` checkpoints (1 by
        default) of each namespace, with their writes; ``"delete"`` removes them all.

        Threads whose graph uses a ``DeltaChannel`` cannot be pruned with
        ``"keep_latest"`` (NotImplementedError, nothing deleted), as LangGraph's own
        savers refuse: their values are rebuilt from the older checkpoints."""
        service = self._service()
        if strategy not in _STRATEGIES:
            raise ValidationError(
                f"strategy must be one of {_STRATEGIES}, got {strategy!r}", field="strategy"
            )
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValidationError("keep must be a positive integer", field="keep", value=keep)
        ids = [_text_id(thread_id, "thread_id") for thread_id in thread_ids]
        for session_id in ids:
            await service.prune(
                self.engine.tenant_id,
                session_id,
                keep if strategy == "keep_latest" else 0,
                self._versions,
                self._refuse_delta,
            )

    @staticmethod
    def _refuse_delta(rows: Sequence[Stored]) -> None:
        for row in rows:
            if any(key in row.metadata for key in _DELTA_KEYS):
                raise NotImplementedError(
                    f"keep_latest can't prune thread {row.session_id!r}: its graph uses a "
                    "DeltaChannel, whose values are rebuilt from older checkpoints"
                )

    def get_next_version(self, current: str | None, channel: None) -> str:
        """The version after ``current``: a zero-padded counter, then a random fraction
        (writers of one thread in different processes never make the same version)."""
        if current is None:
            number = 0
        elif isinstance(current, int):
            number = current
        else:
            number = int(current.split(".")[0])
        return f"{number + 1:032}.{random.random():016}"

    # -- the sync interface: not offered ---------------------------------------------------
    @staticmethod
    def _async_only(name: str) -> NoReturn:
        raise NotImplementedError(
            f"ContextEngineSaver is asynchronous: use `await saver.a{name}(...)` "
            f"(run the graph with ainvoke/astream) instead of {name}()"
        )

    def get(self, config: RunnableConfig) -> Checkpoint | None:
        """Not offered: use :meth:`aget`."""
        self._async_only("get")

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """Not offered: use :meth:`aget_tuple`."""
        self._async_only("get_tuple")

    def list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        """Not offered: use :meth:`alist`."""
        self._async_only("list")

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """Not offered: use :meth:`aput`."""
        self._async_only("put")

    def put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """Not offered: use :meth:`aput_writes`."""
        self._async_only("put_writes")

    def delete_thread(self, thread_id: str) -> None:
        """Not offered: use :meth:`adelete_thread`."""
        self._async_only("delete_thread")

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Not offered: use :meth:`adelete_for_runs`."""
        self._async_only("delete_for_runs")

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Not offered: use :meth:`acopy_thread`."""
        self._async_only("copy_thread")

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """Not offered: use :meth:`aprune`."""
        self._async_only("prune")

    def get_delta_channel_history(
        self, *, config: RunnableConfig, channels: Sequence[str]
    ) -> dict[str, DeltaChannelHistory]:
        """Not offered: use :meth:`aget_delta_channel_history`."""
        self._async_only("get_delta_channel_history")
