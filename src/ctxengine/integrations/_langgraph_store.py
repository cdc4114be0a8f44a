"""A LangGraph long-term store on ctxengine's memory (SPEC §13).

    from ctxengine.integrations.langgraph import ContextEngineStore

    store = ContextEngineStore(engine)
    graph = builder.compile(store=store)

See :class:`ContextEngineStore` for the mapping.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from langgraph.store.base import (
    BaseStore,
    GetOp,
    IndexConfig,
    InvalidNamespaceError,
    Item,
    ListNamespacesOp,
    MatchCondition,
    Op,
    PutOp,
    Result,
    SearchItem,
    SearchOp,
    TTLConfig,
    ensure_embeddings,
    get_text_at_path,
    tokenize_path,
)

from .. import validation as v
from ..embeddings import Embedder, FunctionEmbedder, checked_vectors
from ..errors import ValidationError
from ..services.graph_store import Write
from ..services.memory import memory_value
from ..services.semantic_memory import unit_vector
from ..sync import TenantView as SyncTenantView
from ._adapter import Closable

if TYPE_CHECKING:
    from ..services.graph_store import GraphStoreService
    from ..storage.repositories.graph_store import StoredItem
    from ..tenant import TenantView

__all__ = ["ContextEngineStore"]

#: The comparison operators of a search filter.
_OPERATORS = frozenset({"$eq", "$ne", "$gt", "$gte", "$lt", "$lte"})


class _Embedding(NamedTuple):
    """How the store embeds: documents through a ctxengine Embedder, queries too (or
    through the LangGraph Embeddings' ``aembed_query``)."""

    documents: Embedder
    query: Any  # async (str) -> list[float]
    dims: int
    fields: list[tuple[str, Any]]  # (path, tokenized path or "$")


def _embedding(index: IndexConfig) -> _Embedding:
    if "dims" not in index or "embed" not in index:
        raise ValueError('index needs "dims" (an int) and "embed" (an embedder)')
    dims = index["dims"]
    if isinstance(dims, bool) or not isinstance(dims, int) or dims < 1:
        raise ValueError(f'index "dims" must be a positive int, got {dims!r}')
    embed: Any = index["embed"]
    if isinstance(embed, Embedder) and inspect.iscoroutinefunction(embed.embed):
        if embed.dimensions != dims:
            raise ValueError(
                f'index "dims" is {dims} but the embedder makes vectors of {embed.dimensions}'
            )
        documents: Embedder = embed

        async def query(text: str) -> list[float]:
            return (await documents.embed([text]))[0]

    else:  # a LangChain Embeddings, a function (sync or async), "provider:model"
        embeddings = ensure_embeddings(embed)
        documents = FunctionEmbedder(embeddings.aembed_documents, dims)
        query = embeddings.aembed_query
    paths = index.get("fields") or ["$"]
    fields = [(p, p if p == "$" else tokenize_path(p)) for p in paths]
    return _Embedding(documents, query, dims, fields)


def _namespace(namespace: object, *, for_write: bool) -> str:
    """The labels of a LangGraph namespace joined by "." (InvalidNamespaceError for
    labels LangGraph refuses; ValidationError beyond 255 characters)."""
    if not isinstance(namespace, tuple):
        raise InvalidNamespaceError(f"a namespace is a tuple of strings, got {namespace!r}")
    if for_write and not namespace:
        raise InvalidNamespaceError("Namespace cannot be empty.")
    for label in namespace:
        if not isinstance(label, str) or not label or "." in label or "\x00" in label:
            raise InvalidNamespaceError(
                f"Invalid namespace label {label!r} in {namespace}: labels are non-empty "
                "strings without periods ('.') or NUL characters"
            )
    if for_write and namespace[0] == "langgraph":
        raise InvalidNamespaceError(f'Root label for namespace cannot be "langgraph": {namespace}')
    return v.identifier(".".join(namespace), "namespace") if namespace else ""


def _key(key: object) -> str:
    return v.identifier(key, "key")


def _count(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValidationError(f"{field} must be an int >= 0, got {value!r}", field=field)
    return value


def _filter(value: object) -> dict[str, Any] | None:
    """A checked search filter: field → value, or → {operator: value} of :data:`_OPERATORS`."""
    if value is None or value == {}:
        return None
    if not isinstance(value, Mapping):
        raise ValidationError("filter must be a dict", field="filter")
    for field, wanted in value.items():
        if not isinstance(field, str):
            raise ValidationError("filter keys must be strings", field="filter")
        if isinstance(wanted, Mapping) and any(str(k).startswith("$") for k in wanted):
            unknown = set(wanted) - _OPERATORS
            if unknown:
                raise ValidationError(
                    f"filter on {field!r}: unknown operator {sorted(map(str, unknown))[0]!r} "
                    f"(one of {', '.join(sorted(_OPERATORS))})",
                    field="filter",
                )
    return dict(value)


def _same(stored: Any, wanted: Any) -> bool:
    """JSON equality: ``true`` is not ``1``; mappings and lists member by member."""
    if isinstance(wanted, Mapping):
        return isinstance(stored, Mapping) and all(
            k in stored and _same(stored[k], w) for k, w in wanted.items()
        )
    if isinstance(wanted, list | tuple):
        return (
            isinstance(stored, list)
            and len(stored) == len(wanted)
            and all(_same(s, w) for s, w in zip(stored, wanted, strict=True))
        )
    if isinstance(stored, bool) or isinstance(wanted, bool):
        return type(stored) is type(wanted) and stored == wanted
    if isinstance(stored, Mapping | list):
        return False
    return bool(stored == wanted)


def _ordered(stored: Any, operator: str, wanted: Any) -> bool:
    """``stored <operator> wanted`` for two numbers or two strings; False otherwise."""
    numbers = all(isinstance(x, int | float) and not isinstance(x, bool) for x in (stored, wanted))
    if not numbers and not (isinstance(stored, str) and isinstance(wanted, str)):
        return False
    if operator == "$gt":
        return bool(stored > wanted)
    if operator == "$gte":
        return bool(stored >= wanted)
    if operator == "$lt":
        return bool(stored < wanted)
    return bool(stored <= wanted)


def _condition(stored: Any, present: bool, wanted: Any) -> bool:
    if isinstance(wanted, Mapping) and any(str(k).startswith("$") for k in wanted):
        for operator, operand in wanted.items():
            if operator == "$eq":
                ok = present and _same(stored, operand)
            elif operator == "$ne":
                ok = not (present and _same(stored, operand))
            else:
                ok = present and _ordered(stored, operator, operand)
            if not ok:
                return False
        return True
    return present and _same(stored, wanted)


def _matcher(conditions: dict[str, Any] | None) -> Any:
    """A predicate on an item's value: every condition holds (None: no filter)."""
    if conditions is None:
        return None

    def keep(value: Any) -> bool:
        if not isinstance(value, Mapping):
            return False
        return all(
            _condition(value.get(field), field in value, wanted)
            for field, wanted in conditions.items()
        )

    return keep


def _matches(namespace: tuple[str, ...], condition: MatchCondition) -> bool:
    path = condition.path
    if len(namespace) < len(path):
        return False
    if condition.match_type == "prefix":
        part = namespace[: len(path)]
    elif condition.match_type == "suffix":
        part = namespace[len(namespace) - len(path) :]
    else:
        raise ValidationError(
            f"match_type must be 'prefix' or 'suffix', got {condition.match_type!r}",
            field="match_type",
        )
    return all(want == "*" or want == got for got, want in zip(part, path, strict=True))


def _labels(namespace: str) -> tuple[str, ...]:
    return tuple(namespace.split("."))


def _value_of(stored: Any) -> dict[str, Any]:
    """An item's value: a dict (a value written by ``remember`` that is not an object
    reads as ``{"value": ...}``)."""
    return dict(stored) if isinstance(stored, Mapping) else {"value": stored}


def _item(found: StoredItem) -> Item:
    return Item(
        value=_value_of(found.value),
        key=found.key,
        namespace=_labels(found.namespace),
        created_at=found.created_at,
        updated_at=found.updated_at,
    )


def _search_item(found: StoredItem, score: float | None = None) -> SearchItem:
    return SearchItem(
        namespace=_labels(found.namespace),
        key=found.key,
        value=_value_of(found.value),
        created_at=found.created_at,
        updated_at=found.updated_at,
        score=score,
    )


class ContextEngineStore(Closable, BaseStore):
    """LangGraph's ``BaseStore`` on ctxengine's memory (SPEC §13): long-term memory for
    ``builder.compile(store=...)``, on SQLite or PostgreSQL, shared by every process
    on the database.

    ``engine`` is a :class:`~ctxengine.ContextEngine` or a tenant view of one (each
    tenant sees only its own items). ``index`` (``{"dims", "embed", "fields"}``, as
    LangGraph's stores take it) turns on semantic search: ``embed`` is a ctxengine
    :class:`~ctxengine.embeddings.Embedder`, a LangChain ``Embeddings``, an embedding
    function (sync or async) or a ``"provider:model"`` string. ``ttl`` is LangGraph's
    ``TTLConfig`` (``default_ttl`` in minutes, ``refresh_on_read``); the engine's
    cleanup task deletes expired items (``sweep_interval_minutes`` is not used).

    Mapping:

    - an item is a tenant-wide key-value memory (``user_id=None``): its namespace the
      labels joined by "." (at most 255 characters), its key the key, its value the
      dict; ``created_at``/``updated_at`` from the memory; an expired item is absent;
    - ``ttl`` (minutes) sets the memory's ``expires_at`` and keeps the TTL on its row
      (``ttl_seconds``); reads with ``refresh_ttl`` start it over, by that TTL;
    - with ``index``, each text of an item's indexed fields is a semantic memory (in
      the namespace ``langgraph-store/<dims>``, tied to the item: replaced when it is
      written, deleted with it); ``search(query=...)`` ranks items by the best
      cosine similarity of their texts (``SearchItem.score``), using the database's
      vector index where there is one; items with no indexed text are not returned;
    - without ``query``, ``search`` lists the items in or under the prefix, most
      recently updated first; ``filter`` takes values (JSON equality) and the
      operators ``$eq``, ``$ne``, ``$gt``, ``$gte``, ``$lt``, ``$lte``;
    - a batch's reads see the store as it was before the batch; its writes (the last
      one of each item) are one transaction: all applied or none.

    Errors: LangGraph's ``InvalidNamespaceError`` for a namespace it refuses, and
    ctxengine's ``ValidationError`` for a bad key, value, TTL or filter; nothing is
    written then. The store is asynchronous (``aget``, ``aput``, ``asearch``,
    ``adelete``, ``alist_namespaces``); the sync methods work from other threads
    than the engine's (LangGraph runs sync nodes in worker threads) and raise
    ``NotImplementedError`` on its event loop's thread, where they would block it. On
    the blocking facade (``ctxengine.sync.ContextEngine``) use the sync methods
    (``graph.invoke``).
    ``close()`` ends the use of the store, not of the engine.
    """

    supports_ttl: bool = True

    def __init__(
        self,
        engine: TenantView | SyncTenantView,
        *,
        index: IndexConfig | None = None,
        ttl: TTLConfig | None = None,
    ) -> None:
        #: the engine (or tenant view) the store uses; with the blocking facade, the
        #: view it wraps (the sync methods then run on the facade's loop)
        self.engine: TenantView = engine._view if isinstance(engine, SyncTenantView) else engine
        self.index_config = dict(index) if index else None
        self.ttl_config = ttl
        self._embedding = None if index is None else _embedding(index)
        #: the semantic memory namespace of the vectors (one dimension per namespace)
        self._space = None if self._embedding is None else f"langgraph-store/{self._embedding.dims}"

    def _service(self) -> GraphStoreService:
        self._check_open()
        return self.engine._runtime().graph_store

    # -- sync: from other threads only --------------------------------------------------

    def batch(self, ops: Iterable[Op]) -> list[Result]:
        """``abatch`` run on the engine's event loop, from another thread (LangGraph's
        sync nodes); NotImplementedError on the loop's own thread."""
        live = self.engine._engine._live
        if live is None or (
            threading.get_ident() == live.thread
            or _running_loop() is live.loop
            or live.loop.is_closed()
        ):
            raise NotImplementedError(
                "ContextEngineStore is asynchronous: use await store.aget / aput / "
                "asearch / adelete / alist_namespaces (or abatch); the sync methods work "
                "only from threads other than the engine's event loop, while it is open"
            )
        future = asyncio.run_coroutine_threadsafe(self.abatch(list(ops)), live.loop)
        return future.result()

    # -- async ---------------------------------------------------------------------------

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        """Run ``ops``; their results in order. Every op is checked (and every text to
        index embedded) before anything is read or written."""
        service = self._service()
        tenant = self.engine.tenant_id
        ops = list(ops)
        checked = [self._checked(op) for op in ops]
        # texts are embedded before any unit of work begins
        writes = await self._writes([c for c in checked if isinstance(c, _Put)])
        queries = await self._queries([c for c in checked if isinstance(c, _Search)])
        results: list[Result] = [None] * len(ops)
        gets = [(i, c) for i, c in enumerate(checked) if isinstance(c, _Get)]
        if gets:
            found = await service.get(tenant, [(c.namespace, c.key) for _, c in gets])
            refresh = []
            for (i, get), item in zip(gets, found, strict=True):
                results[i] = None if item is None else _item(item)
                if item is not None and get.refresh and item.expires_at is not None:
                    refresh.append((item.namespace, item.key))
            await service.refresh(tenant, refresh)
        for i, op in enumerate(checked):
            if isinstance(op, _Search):
                results[i] = await self._search(service, tenant, op, queries.get(op.query))
            elif isinstance(op, _List):
                results[i] = await self._list(service, tenant, op)
        await service.write(tenant, writes, self._space)
        return results

    def _checked(self, op: Op) -> _Get | _Put | _Search | _List:
        if isinstance(op, GetOp):
            return _Get(_namespace(op.namespace, for_write=False), _key(op.key), op.refresh_ttl)
        if isinstance(op, PutOp):
            namespace = _namespace(op.namespace, for_write=op.value is not None)
            key = _key(op.key)
            if op.value is None:
                return _Put(namespace, key, None, None, None)
            if not isinstance(op.value, Mapping):
                raise ValidationError(
                    f"value must be a dict, got {type(op.value).__name__}", field="value"
                )
            value = memory_value(op.value, self.engine._runtime().ctx.settings.max_metadata_bytes)
            ttl = None if op.ttl is None else v.seconds(_minutes(op.ttl) * 60, "ttl")
            return _Put(namespace, key, value, ttl, op.index)
        if isinstance(op, SearchOp):
            prefix = _namespace(op.namespace_prefix, for_write=False) or None
            query = op.query if op.query and self._embedding is not None else None
            return _Search(
                prefix,
                _matcher(_filter(op.filter)),
                _count(op.limit, "limit"),
                _count(op.offset, "offset"),
                query,
                op.refresh_ttl,
            )
        if isinstance(op, ListNamespacesOp):
            conditions = tuple(op.match_conditions or ())
            for condition in conditions:
                _namespace(tuple(condition.path), for_write=False)
            depth = op.max_depth
            if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int)):
                raise ValidationError("max_depth must be an int or None", field="max_depth")
            if depth is not None and depth < 1:
                raise ValidationError("max_depth must be at least 1", field="max_depth")
            return _List(conditions, depth, _count(op.limit, "limit"), _count(op.offset, "offset"))
        raise ValidationError(f"unknown store operation: {type(op).__name__}", field="op")

    async def _writes(self, puts: list[_Put]) -> list[Write]:
        """The batch's puts, the last of each item, with the vectors of their texts."""
        last = {(p.namespace, p.key): p for p in puts}
        texts: dict[tuple[str, str], list[tuple[str, str]]] = {}
        if self._embedding is not None:
            for pair, put in last.items():
                if put.value is not None and put.index is not False:
                    texts[pair] = self._texts(put.value, put.index)
        wanted = list(dict.fromkeys(text for found in texts.values() for _, text in found))
        vectors: dict[str, np.ndarray[Any, Any]] = {}
        if wanted:
            assert self._embedding is not None
            made = await self._embedding.documents.embed(wanted)
            vectors = {text: unit_vector(vector) for text, vector in zip(wanted, made, strict=True)}
        return [
            Write(
                put.namespace,
                put.key,
                put.value,
                put.ttl,
                [(f, t, vectors[t]) for f, t in texts[pair]] if pair in texts else None,
            )
            for pair, put in last.items()
        ]

    def _texts(self, value: dict[str, Any], index: list[str] | None) -> list[tuple[str, str]]:
        """(field, text) of each indexed text of ``value``."""
        assert self._embedding is not None
        if index is None:
            fields = self._embedding.fields
        else:
            fields = [(p, p if p == "$" else tokenize_path(p)) for p in index]
        found = []
        for path, tokens in fields:
            texts = [t for t in get_text_at_path(value, tokens) if t.strip()]
            if len(texts) == 1:
                found.append((path, texts[0]))
            else:
                found += [(f"{path}.{i}", text) for i, text in enumerate(texts)]
        return found

    async def _queries(self, searches: list[_Search]) -> dict[str | None, np.ndarray[Any, Any]]:
        """The unit vector of each distinct query of ``searches``."""
        wanted = list(dict.fromkeys(s.query for s in searches if s.query is not None))
        if not wanted:
            return {}
        assert self._embedding is not None
        embedding = self._embedding
        made = await asyncio.gather(*(embedding.query(q) for q in wanted))
        checked = checked_vectors(list(made), len(wanted), embedding.dims, source="embedder")
        return {q: unit_vector(vector) for q, vector in zip(wanted, checked, strict=True)}

    async def _search(
        self,
        service: GraphStoreService,
        tenant: str,
        op: _Search,
        query: np.ndarray[Any, Any] | None,
    ) -> list[SearchItem]:
        if op.limit == 0:
            return []
        if query is not None:
            assert self._space is not None
            scored = await service.similar(
                tenant, self._space, op.prefix, query, op.limit, op.offset, op.keep
            )
            found = [_search_item(item, score) for item, score in scored]
            items = [item for item, _ in scored]
        else:
            items = await service.listing(tenant, op.prefix, op.limit, op.offset, op.keep)
            found = [_search_item(item) for item in items]
        if op.refresh:
            await service.refresh(
                tenant, [(i.namespace, i.key) for i in items if i.expires_at is not None]
            )
        return found

    async def _list(
        self, service: GraphStoreService, tenant: str, op: _List
    ) -> list[tuple[str, ...]]:
        prefix: tuple[str, ...] = ()
        for condition in op.conditions:
            if condition.match_type == "prefix":
                fixed = []
                for label in condition.path:
                    if label == "*":
                        break
                    fixed.append(label)
                if len(fixed) > len(prefix):
                    prefix = tuple(fixed)
        names = await service.namespaces(tenant, ".".join(prefix) or None)
        found = {
            labels[: op.max_depth] if op.max_depth is not None else labels
            for labels in map(_labels, names)
            if all(_matches(labels, c) for c in op.conditions)
        }
        return sorted(found)[op.offset : op.offset + op.limit]


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _minutes(ttl: object) -> float:
    if isinstance(ttl, timedelta):
        return ttl.total_seconds() / 60
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl):
        raise ValidationError(f"ttl must be a number of minutes, got {ttl!r}", field="ttl")
    return float(ttl)


class _Get(NamedTuple):
    namespace: str
    key: str
    refresh: bool


class _Put(NamedTuple):
    namespace: str
    key: str
    value: dict[str, Any] | None
    ttl: float | None
    index: Any  # None (the store's fields), False (none) or a list of paths


class _Search(NamedTuple):
    prefix: str | None
    keep: Any
    limit: int
    offset: int
    query: str | None
    refresh: bool


class _List(NamedTuple):
    conditions: Sequence[MatchCondition]
    max_depth: int | None
    limit: int
    offset: int
