"""The behavioural tests of sessions, usage and conversation, through the blocking facade.

The test files of :data:`THROUGH_THE_FACADE` run with ``api`` "async"
(``ctxengine.ContextEngine``, as written) on both backends, and with "sync" on SQLite
(:func:`facade_on_postgres`), where the engine of the test (the ``engine`` fixture, and
every ``ContextEngine(...)`` the test module builds, clock and settings included) is a
:class:`FacadeEngine`: an awaitable stand-in that runs each call of
``ctxengine.sync.ContextEngine`` in a worker thread, so the async test bodies drive
the blocking facade end to end (its portal, threads, iterators, ``with`` blocks).

A directory's conftest.py takes these fixtures in (tests/core, tests/limits,
tests/conversation). A test that reaches into the engine's insides (``_runtime()``,
``_live``) runs async only: list it in :data:`ASYNC_ONLY`, with the reason.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import ctxengine
from ctxengine import EngineSettings, sync
from ctxengine.storage import Store

ROOT = Path(__file__).resolve().parents[1]

#: Test files whose tests also run through the blocking facade (``api`` "sync").
THROUGH_THE_FACADE = frozenset(
    {
        "tests/core/test_sessions.py",
        "tests/core/test_lifecycle.py",
        "tests/core/test_idle_timeout.py",
        "tests/limits/test_quotas.py",
        "tests/conversation/test_chats_and_messages.py",
        "tests/conversation/test_metadata_checkpoints_export.py",
        "tests/conversation/test_turns_and_json_content.py",
        "tests/conversation/test_pop_and_shared_state.py",
        "tests/conversation/test_context_and_compaction.py",
    }
)

#: Tests of those files that look inside the async engine, so run async only.
ASYNC_ONLY: dict[str, str] = {
    "test_a_chat_that_trimmed_takes_appends_as_before_once_it_has_room": (
        "reads the conversation service's state (engine._runtime())"
    ),
    "test_an_append_past_the_cap_commits_and_compaction_follows": (
        "counts the engine's background compactions (engine._runtime())"
    ),
    "test_a_history_past_max_context_tokens_is_compacted": "waits for them likewise",
    "test_a_failing_automatic_compaction_is_logged_and_announced": "waits for them likewise",
    "test_close_cancels_a_compaction_that_does_not_finish": (
        "its summarizer sets an asyncio.Event of the test's loop (not thread-safe)"
    ),
    "test_processes_compacting_and_appending_at_once": (
        "OS processes of the async engine; through the facade it would only take longer"
    ),
}

_ASYNC = ctxengine.ContextEngine
#: The threads that call the facade for the tests (idle ones end with the run).
_POOL = ThreadPoolExecutor(64, thread_name_prefix="facade-test")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``api`` over "async" and "sync" for the tests of a database in the
    files of :data:`THROUGH_THE_FACADE`."""
    path = Path(str(metafunc.definition.path)).resolve().relative_to(ROOT).as_posix()
    if (
        path in THROUGH_THE_FACADE
        and "db_url" in metafunc.fixturenames
        and metafunc.definition.originalname not in ASYNC_ONLY
    ):
        metafunc.parametrize("api", ["async", "sync"], indirect=True)


def facade_on_postgres(item: pytest.Item) -> bool:
    """Whether ``item`` runs a behavioural test through the facade on PostgreSQL: such
    items are deselected (tests/conftest.py). The facade's own behaviour (its portal,
    threads, PostgreSQL's driver on its loop) is tested on both backends by
    tests/core/test_sync_facade.py; the behavioural tests run through it on SQLite,
    where they cost least."""
    callspec = getattr(item, "callspec", None)
    params = callspec.params if callspec is not None else {}
    return params.get("api") == "sync" and params.get("db_url") == "postgres"


@pytest.fixture(autouse=True)
def api(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """ "async", or "sync": then the test module's ``ContextEngine`` is a FacadeEngine."""
    which: str = getattr(request, "param", "async")
    if which == "sync" and getattr(request.module, "ContextEngine", None) is _ASYNC:
        monkeypatch.setattr(request.module, "ContextEngine", FacadeEngine)
    return which


@pytest.fixture
async def engine(db_url: str, api: str) -> AsyncIterator[Any]:
    """An open engine on a fresh database: ``ctxengine.ContextEngine``, or with ``api``
    "sync" a FacadeEngine; no connection is left checked out at the end."""
    cls = FacadeEngine if api == "sync" else _ASYNC
    async with cls(db_url, settings=EngineSettings(auto_cleanup=False)) as eng:
        yield eng
        assert eng._store.connections_in_use() == 0


class BlockingProxy:
    """An async stand-in for a view of ``ctxengine.sync``: each coroutine method of the
    async API runs the facade's blocking twin in a worker thread."""

    def __init__(self, target: sync.TenantView, pool: ThreadPoolExecutor) -> None:
        self._target = target
        self._pool = pool

    async def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, partial(fn, *args, **kwargs)
        )

    def tenant(self, tenant_id: str) -> BlockingProxy:
        return BlockingProxy(self._target.tenant(tenant_id), self._pool)

    def track_request(self, *args: Any, **kwargs: Any) -> _AsyncContext:
        return _AsyncContext(self, self._target.track_request(*args, **kwargs))

    def concurrency_slot(self, *args: Any, **kwargs: Any) -> _AsyncContext:
        return _AsyncContext(self, self._target.concurrency_slot(*args, **kwargs))

    def events(self, *args: Any, **kwargs: Any) -> _AsyncIterator:
        return _AsyncIterator(self, self._target.events(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(f"{name}: the blocking facade has no such member to test")
        blocking = getattr(self._target, name)
        twin = getattr(_ASYNC, name, None)
        if inspect.isasyncgenfunction(twin):
            return lambda *a, **k: _AsyncIterator(self, blocking(*a, **k))
        if inspect.iscoroutinefunction(twin):

            async def call(*args: Any, **kwargs: Any) -> Any:
                return await self._run(blocking, *args, **kwargs)

            return call
        return blocking  # properties and plain members (subscribe, add_usage_callback)


class FacadeEngine(BlockingProxy):
    """``ctxengine.ContextEngine(url, settings=, clock=)`` for the tests, built on
    ``ctxengine.sync.ContextEngine`` (see the module's doc)."""

    def __init__(self, url: Any = None, *, settings: Any = None, clock: Any = None) -> None:
        self._facade = sync.ContextEngine(url, settings=settings, clock=clock)
        super().__init__(self._facade, _POOL)
        self._url = url
        self._side: _SideStore | None = None

    async def initialize(self) -> None:
        await self._run(self._facade.initialize)

    async def close(self) -> None:
        try:
            await self._run(self._facade.close)
        finally:
            if self._side is not None:
                await self._side.dispose()

    async def migrate(self, revision: str = "head") -> None:
        await self._run(self._facade.migrate, revision)

    async def __aenter__(self) -> FacadeEngine:
        await self.initialize()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def _store(self) -> _SideStore:
        """What tests read of the engine's storage: its backend, its connections in use,
        and an AsyncEngine of their own on the same database (raw SQL checks)."""
        if self._side is None:
            self._side = _SideStore(self._facade, self._url)
        return self._side


class _SideStore:
    def __init__(self, facade: sync.ContextEngine, url: str) -> None:
        self._facade = facade
        self._url = url
        self._own: AsyncEngine | None = None

    def _real(self) -> Store:
        return self._facade._portal.run(lambda: self._facade._engine._store)

    @property
    def backend(self) -> Any:
        return self._real().backend

    def connections_in_use(self) -> int:
        store = self._real()
        return self._facade._portal.run(store.connections_in_use)

    @property
    def engine(self) -> AsyncEngine:
        if self._own is None:
            scheme, rest = self._url.split("://", 1)
            driver = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg"}
            self._own = create_async_engine(f"{driver.get(scheme, scheme)}://{rest}")
        return self._own

    async def dispose(self) -> None:
        if self._own is not None:
            await self._own.dispose()


class _AsyncContext:
    def __init__(self, proxy: BlockingProxy, blocking: Any) -> None:
        self._proxy = proxy
        self._blocking = blocking

    async def __aenter__(self) -> Any:
        return await self._proxy._run(self._blocking.__enter__)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        result: bool | None = await self._proxy._run(self._blocking.__exit__, exc_type, exc, tb)
        return result


class _AsyncIterator:
    def __init__(self, proxy: BlockingProxy, blocking: Iterator[Any]) -> None:
        self._proxy = proxy
        self._blocking = blocking

    def __aiter__(self) -> _AsyncIterator:
        return self

    async def __anext__(self) -> Any:
        finished, item = await self._proxy._run(_step, self._blocking)
        if finished:
            raise StopAsyncIteration
        return item

    async def aclose(self) -> None:
        close = getattr(self._blocking, "close", None)
        if close is not None:
            await self._proxy._run(close)

    async def __aenter__(self) -> _AsyncIterator:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._blocking, name)


def _step(iterator: Iterator[Any]) -> tuple[bool, Any]:
    try:
        return False, next(iterator)
    except StopIteration:
        return True, None
