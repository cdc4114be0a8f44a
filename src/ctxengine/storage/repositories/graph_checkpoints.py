"""LangGraph checkpoints: a thread's checkpoints, channel blobs and pending writes."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from sqlalchemy import (
    Integer,
    LargeBinary,
    Text,
    bindparam,
    column,
    delete,
    func,
    literal,
    select,
    true,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.sql import FromClause
from sqlalchemy.types import TypeEngine

from ...lifecycle import epoch
from ..connection import Connection
from ..prebuilt import run
from ..schema import graph_blobs, graph_checkpoints, graph_writes
from ..schema import sessions as session_table
from ..types import JSONDocument, UTCDateTime
from . import Repository, of_session
from .sessions import TOUCH_WORKING

if TYPE_CHECKING:
    from ..backend import Backend

cp = graph_checkpoints.c
bl = graph_blobs.c
wr = graph_writes.c

#: Keys per ``IN`` list (well under every backend's limit of bound parameters).
_CHUNK = 400

T = TypeVar("T")


def _chunks(items: Sequence[T]) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


class Thread(NamedTuple):
    """One namespace of one thread: tenant, session (the thread id), checkpoint_ns."""

    tenant_id: str
    session_id: str
    checkpoint_ns: str


class Blob(NamedTuple):
    """A channel's value at one version, serialized (``type`` "empty": no value)."""

    channel: str
    version: str
    type: str
    blob: bytes | None


class Write(NamedTuple):
    """A pending write as stored."""

    task_id: str
    idx: int
    channel: str
    type: str
    blob: bytes
    task_path: str


class Stored(NamedTuple):
    """A checkpoint row: where it is, its parent, its serialized form and metadata."""

    session_id: str
    checkpoint_ns: str
    checkpoint_id: str
    parent_checkpoint_id: str | None
    type: str
    checkpoint: bytes
    metadata: dict[str, Any]


class Listed(NamedTuple):
    """What listing reads of each checkpoint before filtering on its metadata."""

    session_id: str
    checkpoint_ns: str
    checkpoint_id: str
    metadata: dict[str, Any]


_STORED = (
    cp.session_id,
    cp.checkpoint_ns,
    cp.checkpoint_id,
    cp.parent_checkpoint_id,
    cp.type,
    cp.checkpoint,
    cp.metadata,
)
_WRITE = (wr.task_id, wr.idx, wr.channel, wr.type, wr.blob, wr.task_path)
_IN_NS = (
    cp.tenant_id == bindparam("tenant"),
    cp.session_id == bindparam("session"),
    cp.checkpoint_ns == bindparam("ns"),
)
_LATEST = select(*_STORED).where(*_IN_NS).order_by(cp.checkpoint_id.desc()).limit(1)
_ONE = select(*_STORED).where(*_IN_NS, cp.checkpoint_id == bindparam("id"))
#: Lock the session row (the thread): writers of one thread take turns.
_LOCK = (
    select(session_table.c.session_id)
    .where(
        session_table.c.tenant_id == bindparam("tenant"),
        session_table.c.session_id == bindparam("session"),
    )
    .with_for_update()
)


def _rows(**arrays: TypeEngine[Any]) -> FromClause:
    """The rows of array parameters ``<name>s``, one column ``<name>`` each (unnest)."""
    params = (bindparam(f"{name}s", type_=ARRAY(type_)) for name, type_ in arrays.items())
    values = func.unnest(*params).table_valued(
        *(column(name, type_) for name, type_ in arrays.items()), name="given"
    )
    return values.render_derived()


def _labelled(table: Any, given: FromClause, constants: list[str]) -> list[Any]:
    """The columns of an INSERT's SELECT into ``table``: ``constants`` as parameters
    of their own name, the other columns from ``given``."""
    return [
        (
            bindparam(c.key, type_=c.type).label(c.key)
            if c.key in constants
            else given.c[c.key].label(c.key)
        )
        for c in table.c
    ]


def _blob_params(thread: Thread, blobs: Iterable[Blob]) -> list[dict[str, Any]]:
    return [{**thread._asdict(), **b._asdict()} for b in blobs]


def _checkpoint_params(
    checkpoint_id: str,
    parent_id: str | None,
    serialized: tuple[str, bytes],
    metadata: dict[str, Any],
    now: datetime,
) -> dict[str, Any]:
    """The parameters of a checkpoint's row but its thread's."""
    return {
        "checkpoint_id": checkpoint_id,
        "parent_checkpoint_id": parent_id,
        "type": serialized[0],
        "checkpoint": serialized[1],
        "metadata": metadata,
        "created_at": now,
    }


def _touch_params(thread: Thread, now: datetime) -> dict[str, Any]:
    return {
        "tenant": thread.tenant_id,
        "sid": thread.session_id,
        "now": now,
        "now_epoch": epoch(now),
        **thread._asdict(),
    }


class GraphCheckpointRepository(Repository):
    """The statements of LangGraph checkpoints; every write names its thread."""

    def __init__(self, backend: Backend) -> None:
        super().__init__(backend)
        blob_key = [c.key for c in graph_blobs.primary_key.columns]
        #: a version's value is written once: later writes of it change nothing
        self._put_blob = backend.insert_or_ignore(graph_blobs, blob_key).values(
            {c.key: bindparam(c.key, type_=c.type) for c in graph_blobs.c}
        )
        values = {c.key: bindparam(c.key, type_=c.type) for c in graph_checkpoints.c}
        values["metadata"] = bindparam("metadata", type_=JSONDocument)
        values["created_at"] = bindparam("created_at", type_=UTCDateTime())
        self._put_checkpoint = backend.upsert(
            graph_checkpoints,
            [c.key for c in graph_checkpoints.primary_key.columns],
            values,
            lambda excluded: {
                "parent_checkpoint_id": excluded.parent_checkpoint_id,
                "type": excluded.type,
                "checkpoint": excluded.checkpoint,
                "metadata": excluded.metadata,
            },
        )
        write_key = [c.key for c in graph_writes.primary_key.columns]
        write_values = {c.key: bindparam(c.key, type_=c.type) for c in graph_writes.c}
        #: special writes (errors, interrupts...) replace the task's previous one
        self._replace_writes = backend.upsert(
            graph_writes,
            write_key,
            write_values,
            lambda excluded: {
                "channel": excluded.channel,
                "type": excluded.type,
                "blob": excluded.blob,
                "task_path": excluded.task_path,
            },
        )
        #: other writes are kept as first written (a task's retry writes the same)
        self._add_writes = backend.insert_or_ignore(graph_writes, write_key).values(write_values)
        if self.writes_at_once:
            self._build_at_once(backend)

    def _build_at_once(self, backend: Backend) -> None:
        """One statement that touches the thread's session if it can work and writes
        only then (data-modifying CTEs): blobs and checkpoint, or pending writes.
        Parameters: tenant, sid, now, now_epoch, the constant columns by name, and
        the varying ones as arrays named ``<column>s``."""
        touched = TOUCH_WORKING.returning(session_table.c.session_id).cte("touched")
        thread = ["tenant_id", "session_id", "checkpoint_ns"]
        blobs = _rows(channel=Text(), version=Text(), type=Text(), blob=LargeBinary())
        new_blobs = select(*_labelled(graph_blobs, blobs, thread)).select_from(
            touched.join(blobs, true())
        )
        blob_key = [c.key for c in graph_blobs.primary_key.columns]
        stored_blobs = (
            backend.insert_or_ignore(graph_blobs, blob_key)
            .from_select([c.key for c in graph_blobs.c], new_blobs)
            .cte("stored_blobs")
        )
        new_checkpoint = select(
            *(bindparam(c.key, type_=c.type).label(c.key) for c in graph_checkpoints.c)
        ).select_from(touched)
        stored_checkpoint = backend.upsert(
            graph_checkpoints,
            [c.key for c in graph_checkpoints.primary_key.columns],
            new_checkpoint,
            lambda excluded: {
                "parent_checkpoint_id": excluded.parent_checkpoint_id,
                "type": excluded.type,
                "checkpoint": excluded.checkpoint,
                "metadata": excluded.metadata,
            },
        ).cte("stored_checkpoint")
        self._put_at_once = (
            select(touched.c.session_id).add_cte(stored_blobs).add_cte(stored_checkpoint)
        )
        writes = _rows(idx=Integer(), channel=Text(), type=Text(), blob=LargeBinary())
        constant = [*thread, "checkpoint_id", "task_id", "task_path"]
        new_writes = select(*_labelled(graph_writes, writes, constant)).select_from(
            touched.join(writes, true())
        )
        key = [c.key for c in graph_writes.primary_key.columns]
        names = [c.key for c in graph_writes.c]
        replaced = backend.upsert(
            graph_writes,
            key,
            new_writes,
            lambda excluded: {
                "channel": excluded.channel,
                "type": excluded.type,
                "blob": excluded.blob,
                "task_path": excluded.task_path,
            },
        ).cte("stored_writes")
        added = (
            backend.insert_or_ignore(graph_writes, key)
            .from_select(names, new_writes)
            .cte("stored_writes")
        )
        self._writes_at_once = {
            replace: select(touched.c.session_id).add_cte(cte)
            for replace, cte in ((True, replaced), (False, added))
        }

    # -- writes ---------------------------------------------------------------------------
    async def lock(self, conn: Connection, tenant: str, session_id: str) -> bool:
        """Hold the thread's session row until the transaction ends; whether it exists."""
        rows = await run(conn, _LOCK, {"tenant": tenant, "session": session_id})
        return rows.first() is not None

    async def put(
        self,
        conn: Connection,
        thread: Thread,
        checkpoint_id: str,
        parent_id: str | None,
        serialized: tuple[str, bytes],
        metadata: dict[str, Any],
        blobs: Sequence[Blob],
        now: datetime,
    ) -> None:
        """Store the blobs of new versions (each once), then the checkpoint (replacing
        one with its id)."""
        if blobs:
            await run(conn, self._put_blob, _blob_params(thread, blobs))
        params = {
            **thread._asdict(),
            **_checkpoint_params(checkpoint_id, parent_id, serialized, metadata, now),
        }
        await run(conn, self._put_checkpoint, params)

    async def put_writes(
        self,
        conn: Connection,
        thread: Thread,
        checkpoint_id: str,
        writes: Sequence[Write],
        *,
        replace: bool,
    ) -> None:
        """Store pending writes of a checkpoint: replacing stored ones with the same
        key (``replace``), or only where none is stored."""
        if not writes:
            return
        params = [
            {**thread._asdict(), "checkpoint_id": checkpoint_id, **w._asdict()} for w in writes
        ]
        await run(conn, self._replace_writes if replace else self._add_writes, params)

    async def put_at_once(
        self,
        conn: Connection,
        thread: Thread,
        checkpoint_id: str,
        parent_id: str | None,
        serialized: tuple[str, bytes],
        metadata: dict[str, Any],
        blobs: Sequence[Blob],
        now: datetime,
    ) -> bool:
        """:meth:`put` after touching the session, in one statement (only where
        :attr:`writes_at_once`); False, writing nothing, when the session does not
        exist or cannot work."""
        params = {
            **_touch_params(thread, now),
            **_checkpoint_params(checkpoint_id, parent_id, serialized, metadata, now),
            "channels": [b.channel for b in blobs],
            "versions": [b.version for b in blobs],
            "types": [b.type for b in blobs],
            "blobs": [b.blob for b in blobs],
        }
        return (await run(conn, self._put_at_once, params)).first() is not None

    async def put_writes_at_once(
        self,
        conn: Connection,
        thread: Thread,
        checkpoint_id: str,
        writes: Sequence[Write],
        now: datetime,
        *,
        replace: bool,
    ) -> bool:
        """:meth:`put_writes` of one task after touching the session, in one statement
        (as :meth:`put_at_once`)."""
        first = writes[0]
        params = {
            **_touch_params(thread, now),
            "checkpoint_id": checkpoint_id,
            "task_id": first.task_id,
            "task_path": first.task_path,
            "idxs": [w.idx for w in writes],
            "channels": [w.channel for w in writes],
            "types": [w.type for w in writes],
            "blobs": [w.blob for w in writes],
        }
        return (await run(conn, self._writes_at_once[replace], params)).first() is not None

    # -- reads ----------------------------------------------------------------------------
    async def get(
        self, conn: Connection, thread: Thread, checkpoint_id: str | None
    ) -> Stored | None:
        """The checkpoint with this id, or the namespace's newest (None: none)."""
        params = {
            "tenant": thread.tenant_id,
            "session": thread.session_id,
            "ns": thread.checkpoint_ns,
        }
        if checkpoint_id is None:
            row = (await run(conn, _LATEST, params)).first()
        else:
            row = (await run(conn, _ONE, {**params, "id": checkpoint_id})).first()
        return None if row is None else Stored(*row)

    async def checkpoints(
        self, conn: Connection, thread: Thread, ids: Sequence[str]
    ) -> list[Stored]:
        """The checkpoints of these ids (in no particular order)."""
        found: list[Stored] = []
        for part in _chunks(ids):
            stmt = select(*_STORED).where(
                of_session(graph_checkpoints, thread.tenant_id, thread.session_id),
                cp.checkpoint_ns == thread.checkpoint_ns,
                cp.checkpoint_id.in_(part),
            )
            found.extend(Stored(*row) for row in await conn.execute(stmt))
        return found

    async def blobs(
        self, conn: Connection, thread: Thread, versions: Sequence[tuple[str, str]]
    ) -> list[Blob]:
        """The blobs of these (channel, version) pairs that exist."""
        found: list[Blob] = []
        for part in _chunks(versions):
            stmt = select(bl.channel, bl.version, bl.type, bl.blob).where(
                of_session(graph_blobs, thread.tenant_id, thread.session_id),
                bl.checkpoint_ns == thread.checkpoint_ns,
                tuple_(bl.channel, bl.version).in_(list(part)),
            )
            found.extend(Blob(*row) for row in await conn.execute(stmt))
        return found

    async def writes(
        self, conn: Connection, thread: Thread, ids: Sequence[str]
    ) -> list[tuple[str, Write]]:
        """The pending writes of these checkpoints, each with its checkpoint's id."""
        found: list[tuple[str, Write]] = []
        for part in _chunks(ids):
            stmt = select(wr.checkpoint_id, *_WRITE).where(
                of_session(graph_writes, thread.tenant_id, thread.session_id),
                wr.checkpoint_ns == thread.checkpoint_ns,
                wr.checkpoint_id.in_(part),
            )
            found.extend((row[0], Write(*row[1:])) for row in await conn.execute(stmt))
        return found

    async def listed(
        self,
        conn: Connection,
        tenant: str,
        session_id: str | None,
        checkpoint_ns: str | None,
        checkpoint_id: str | None,
        before: str | None,
        limit: int | None,
    ) -> list[Listed]:
        """Checkpoints of the tenant (of one thread, one namespace, one id), newest
        first, with ids before ``before``; at most ``limit``."""
        stmt = select(cp.session_id, cp.checkpoint_ns, cp.checkpoint_id, cp.metadata).where(
            cp.tenant_id == tenant
        )
        if session_id is not None:
            stmt = stmt.where(cp.session_id == session_id)
        if checkpoint_ns is not None:
            stmt = stmt.where(cp.checkpoint_ns == checkpoint_ns)
        if checkpoint_id is not None:
            stmt = stmt.where(cp.checkpoint_id == checkpoint_id)
        if before is not None:
            stmt = stmt.where(cp.checkpoint_id < before)
        stmt = stmt.order_by(cp.checkpoint_id.desc(), cp.session_id, cp.checkpoint_ns)
        if limit is not None:
            stmt = stmt.limit(limit)
        return [Listed(*row) for row in await conn.execute(stmt)]

    async def thread(self, conn: Connection, tenant: str, session_id: str) -> list[Stored]:
        """Every checkpoint of a thread, oldest first per namespace."""
        stmt = (
            select(*_STORED)
            .where(of_session(graph_checkpoints, tenant, session_id))
            .order_by(cp.checkpoint_ns, cp.checkpoint_id)
        )
        return [Stored(*row) for row in await conn.execute(stmt)]

    async def blob_versions(self, conn: Connection, thread: Thread) -> list[tuple[str, str]]:
        """The (channel, version) of every blob of a thread's namespace."""
        stmt = select(bl.channel, bl.version).where(
            of_session(graph_blobs, thread.tenant_id, thread.session_id),
            bl.checkpoint_ns == thread.checkpoint_ns,
        )
        return [(row[0], row[1]) for row in await conn.execute(stmt)]

    async def blob_namespaces(self, conn: Connection, tenant: str, session_id: str) -> list[str]:
        """The namespaces of a thread that hold blobs."""
        stmt = (
            select(bl.checkpoint_ns)
            .where(of_session(graph_blobs, tenant, session_id))
            .group_by(bl.checkpoint_ns)
        )
        return [row[0] for row in await conn.execute(stmt)]

    async def with_run_ids(
        self, conn: Connection, tenant: str, run_ids: Sequence[str]
    ) -> list[tuple[str, str, str]]:
        """(session, namespace, id) of the tenant's checkpoints whose metadata's
        ``run_id`` is one of ``run_ids``."""
        found: list[tuple[str, str, str]] = []
        for part in _chunks(run_ids):
            stmt = select(cp.session_id, cp.checkpoint_ns, cp.checkpoint_id).where(
                cp.tenant_id == tenant, cp.metadata["run_id"].as_string().in_(part)
            )
            found.extend((row[0], row[1], row[2]) for row in await conn.execute(stmt))
        return found

    # -- deletes --------------------------------------------------------------------------
    async def delete_thread(self, conn: Connection, tenant: str, session_id: str) -> None:
        """Delete every checkpoint, blob and write of a thread."""
        for table in (graph_writes, graph_checkpoints, graph_blobs):
            await conn.execute(delete(table).where(of_session(table, tenant, session_id)))

    async def delete_checkpoints(
        self, conn: Connection, thread: Thread, ids: Sequence[str]
    ) -> None:
        """Delete these checkpoints of a namespace and their pending writes; the
        checkpoints left whose parent was one of them have no parent any more."""
        for part in _chunks(ids):
            for table in (graph_writes, graph_checkpoints):
                await conn.execute(
                    delete(table).where(
                        of_session(table, thread.tenant_id, thread.session_id),
                        table.c.checkpoint_ns == thread.checkpoint_ns,
                        table.c.checkpoint_id.in_(part),
                    )
                )
            await conn.execute(
                update(graph_checkpoints)
                .where(
                    of_session(graph_checkpoints, thread.tenant_id, thread.session_id),
                    cp.checkpoint_ns == thread.checkpoint_ns,
                    cp.parent_checkpoint_id.in_(part),
                )
                .values(parent_checkpoint_id=None)
            )

    async def delete_blobs(
        self, conn: Connection, thread: Thread, versions: Sequence[tuple[str, str]]
    ) -> None:
        """Delete the blobs of these (channel, version) pairs of a namespace."""
        for part in _chunks(versions):
            await conn.execute(
                delete(graph_blobs).where(
                    of_session(graph_blobs, thread.tenant_id, thread.session_id),
                    bl.checkpoint_ns == thread.checkpoint_ns,
                    tuple_(bl.channel, bl.version).in_(list(part)),
                )
            )

    # -- copies ---------------------------------------------------------------------------
    async def copy_thread(self, conn: Connection, tenant: str, source: str, target: str) -> None:
        """Copy every checkpoint, blob and write of thread ``source`` to ``target``
        (rows the target has with the same keys are kept)."""
        for table in (graph_blobs, graph_checkpoints, graph_writes):
            names = [c.key for c in table.c]
            columns = [
                literal(target, type_=table.c.session_id.type).label("session_id")
                if name == "session_id"
                else table.c[name]
                for name in names
            ]
            rows = select(*columns).where(of_session(table, tenant, source), true())
            key = [c.key for c in table.primary_key.columns]
            await conn.execute(self.backend.insert_or_ignore(table, key).from_select(names, rows))
