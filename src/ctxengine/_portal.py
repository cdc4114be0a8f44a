"""The event loop thread behind the blocking facade (``ctxengine.sync``).

The loop runs in a daemon thread whose main task is an anyio blocking portal (as
``start_blocking_portal`` does); the engine opens and closes through the portal. Every
other call reaches the loop with ``loop.call_soon_threadsafe`` and waits on a plain
lock: under a third of the cost of ``BlockingPortal.call`` (a task in the portal's task
group, a cancel scope and a ``concurrent.futures.Future`` per call; 47 against 155 µs
for a call that does nothing, measured), what is left being the two thread wake-ups
a call from another thread needs.

An engine is reached only through :class:`Portal`, the handle every object of the
facade holds; when the last one is collected, or at interpreter exit, an engine still
open is closed (a few seconds at most) and its loop stopped. The loop thread is a
daemon: an unclosed facade never keeps the interpreter from exiting. In a child
process forked from one with open engines, those engines refuse every call at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import Future
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from types import CoroutineType, TracebackType
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, cast

import anyio
from anyio.from_thread import BlockingPortal, start_blocking_portal

from .errors import EngineClosedError

if TYPE_CHECKING:
    from .engine import ContextEngine

log = logging.getLogger("ctxengine.sync")

P = ParamSpec("P")
T = TypeVar("T")

#: Seconds an abandoned engine (collected, or open at exit) is given to close.
ABANDON_WAIT = 5.0
#: Seconds close() waits for the loop thread to end once the engine is closed.
STOP_WAIT = 30.0

_ON_LOOP = (
    "a blocking ContextEngine call from the engine's own event loop thread (an event "
    "handler, most likely) would wait for itself; hand the work to another thread"
)


class _Waiter:
    """One call from another thread: the lock it waits on, then its outcome."""

    __slots__ = ("abandoned", "error", "lock", "task", "value")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.value: Any = None
        self.error: BaseException | None = None
        self.task: asyncio.Future[Any] | None = None
        self.abandoned = False


class _Core:
    """The loop thread, its portal, and the calls in flight (no reference to the handle,
    so that collecting the handle can close the engine)."""

    def __init__(self, engine: ContextEngine) -> None:
        self.engine = engine
        self.lifecycle = threading.Lock()
        self.portal: BlockingPortal | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.closing = False
        self.stopped = False
        self.forked = False
        self.waiting: set[_Waiter] = set()
        self.tasks: set[asyncio.Future[Any]] = set()
        _cores.add(self)

    # -- calls ------------------------------------------------------------------------
    def closed_error(self) -> EngineClosedError:
        state = "forked" if self.forked else "closed" if self.stopped else self.engine._state
        return EngineClosedError(state, blocking=True)

    def on_loop_thread(self) -> bool:
        return self.thread is not None and threading.current_thread() is self.thread

    def call(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run ``fn(*args, **kwargs)`` on the loop (awaiting it when it returns an
        awaitable) and return its result or raise its error, in the calling thread."""
        loop = self.loop
        if loop is None:
            raise self.closed_error()
        if self.on_loop_thread():
            raise RuntimeError(_ON_LOOP)
        waiter = _Waiter()
        self.waiting.add(waiter)
        try:
            loop.call_soon_threadsafe(self._begin, waiter, fn, args, kwargs)
        except RuntimeError:  # the loop is closed
            self.waiting.discard(waiter)
            raise self.closed_error() from None
        try:
            waiter.lock.acquire()
        except BaseException:  # KeyboardInterrupt: stop the call, hand control back now
            waiter.abandoned = True
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._cancel, waiter)
            raise
        if waiter.error is not None:
            error, waiter.error = waiter.error, None
            raise error
        return waiter.value

    def _begin(
        self,
        waiter: _Waiter,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        if waiter.abandoned:
            self._settle(waiter, None, None)
            return
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            self._settle(waiter, None, exc)
            return
        if type(result) is not CoroutineType and not inspect.isawaitable(result):
            self._settle(waiter, result, None)
            return
        task = asyncio.get_running_loop().create_task(self._await(waiter, result))
        waiter.task = task
        self.tasks.add(task)

    async def _await(self, waiter: _Waiter, awaitable: Awaitable[Any]) -> None:
        """Await the call in its task and hand its outcome over at once (done callbacks
        would cost the loop one more turn before it sleeps)."""
        try:
            value = await awaitable
        except asyncio.CancelledError:
            self.tasks.discard(asyncio.current_task())
            error = self.closed_error() if self.closing else asyncio.CancelledError()
            self._settle(waiter, None, error)
            raise
        except BaseException as exc:
            self.tasks.discard(asyncio.current_task())
            self._settle(waiter, None, exc)
            return
        self.tasks.discard(asyncio.current_task())
        self._settle(waiter, value, None)

    def _cancel(self, waiter: _Waiter) -> None:
        if waiter.task is not None:
            waiter.task.cancel()

    def _settle(self, waiter: _Waiter, value: Any, error: BaseException | None) -> None:
        try:
            self.waiting.remove(waiter)
        except KeyError:  # settled already (the engine was stopped meanwhile)
            return
        waiter.value, waiter.error = value, error
        waiter.lock.release()

    def soon(self, fn: Callable[[], Awaitable[Any]]) -> None:
        """Run ``fn()`` on the loop without waiting (clean-up from any thread, the loop's
        own included, or from a finalizer); nothing when the loop is gone."""
        loop = self.loop
        if loop is None:
            return

        def start() -> None:
            task = asyncio.ensure_future(fn())
            task.add_done_callback(_log_failure)

        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(start)

    # -- lifecycle --------------------------------------------------------------------
    def open(self) -> None:
        with self.lifecycle:
            if self.loop is not None:
                self.call(self.engine.initialize, (), {})  # open already: nothing happens
                return
            if self.forked or self.stopped or self.engine._state == "closed":
                raise self.closed_error() if self.forked else EngineClosedError("closed")
            self.closing = False
            self.portal, self.loop, self.thread = _start_loop_thread()
            try:
                self.portal.call(self.engine.initialize)
            except BaseException:
                self._stop()
                self.stopped = False  # never opened: the engine says why (its state)
                raise

    def close(self) -> None:
        with self.lifecycle:
            if self.loop is None:
                if self.engine._state == "new":  # never opened: just mark it closed
                    with start_blocking_portal() as portal:
                        portal.call(self.engine.close)
                self.stopped = True
                return
            try:
                if self.portal is not None:
                    self.portal.call(self.engine.close)
            finally:
                self._stop()

    def _stop(self) -> None:
        """Cancel the calls still running, stop the portal, join its thread, and fail
        the calls that never reached the loop."""
        self.closing = True
        if self.loop is not None:
            with contextlib.suppress(RuntimeError):
                self.call(self._cancel_all, (), {})
        self.loop = None
        portal, thread, self.portal, self.thread = self.portal, self.thread, None, None
        if portal is not None and thread is not None:
            with contextlib.suppress(RuntimeError):  # stopped already
                portal.call(portal.stop, True)
            thread.join(STOP_WAIT)
            if thread.is_alive():
                log.warning("the loop thread of a closed ContextEngine is still winding down")
        self.stopped = True
        for waiter in list(self.waiting):
            self._settle(waiter, None, EngineClosedError("closed"))

    async def _cancel_all(self) -> None:
        running = [task for task in self.tasks if task is not asyncio.current_task()]
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running, timeout=1.0)

    def abandon(self) -> None:
        """Close an engine nobody can reach any more (its handle was collected, or the
        interpreter is exiting): a few seconds at most, never from the loop itself."""
        loop, portal = self.loop, self.portal
        if loop is None or portal is None:
            return
        done = threading.Event()

        async def shutdown() -> None:
            self.closing = True
            try:
                await asyncio.wait_for(self.engine.close(), ABANDON_WAIT)
            except BaseException:
                log.warning("an abandoned ContextEngine did not close cleanly", exc_info=True)
            finally:
                done.set()
                self.loop = None
                self.stopped = True
                await portal.stop(cancel_remaining=True)

        self.soon(shutdown)
        if not self.on_loop_thread():
            done.wait(ABANDON_WAIT + 1.0)
            if self.thread is not None:
                self.thread.join(1.0)


#: Every engine's core, so that a forked child can tell them apart from its own.
_cores: weakref.WeakSet[_Core] = weakref.WeakSet()


def _forked() -> None:
    """In a child process: no engine of the parent serves it (their loop threads did not
    survive the fork, their connections are the parent's); each says so when called."""
    for core in list(_cores):
        if core.loop is not None or core.portal is not None:
            core.forked = True
            core.loop = core.portal = core.thread = None
            core.waiting = set()
            core.tasks = set()


os.register_at_fork(after_in_child=_forked)


def _start_loop_thread() -> tuple[BlockingPortal, asyncio.AbstractEventLoop, threading.Thread]:
    """A daemon thread running an event loop whose main task is a blocking portal (what
    ``start_blocking_portal`` does, without a generator whose clean-up would wait for the
    thread: a forked child, which has no such thread, can drop it)."""
    ready: Future[tuple[BlockingPortal, asyncio.AbstractEventLoop]] = Future()

    async def serve() -> None:
        async with BlockingPortal() as portal:
            ready.set_result((portal, asyncio.get_running_loop()))
            await portal.sleep_until_stopped()

    def run() -> None:
        try:
            anyio.run(serve)
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            else:
                log.exception("the event loop of a blocking ContextEngine failed")

    thread = threading.Thread(target=run, name="ctxengine-loop", daemon=True)
    thread.start()
    portal, loop = ready.result()
    return portal, loop, thread


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("a clean-up of the blocking facade failed", exc_info=task.exception())


async def _step(iterator: AsyncIterator[T]) -> tuple[bool, T | None]:
    try:
        return False, await iterator.__anext__()
    except StopAsyncIteration:
        return True, None


class Portal:
    """The handle of one engine's loop thread, held by every object of the facade."""

    def __init__(self, engine: ContextEngine) -> None:
        self._core = _Core(engine)
        weakref.finalize(self, self._core.abandon)

    @property
    def engine(self) -> ContextEngine:
        """The async engine the loop serves."""
        return self._core.engine

    @property
    def running(self) -> bool:
        """True while the loop thread serves calls."""
        return self._core.loop is not None

    def check(self) -> None:
        """EngineClosedError unless the loop serves calls."""
        if self._core.loop is None:
            raise self._core.closed_error()

    def open(self) -> None:
        """Start the loop thread and initialize the engine on it (again: nothing)."""
        self._core.open()

    def close(self) -> None:
        """Close the engine, stop the loop and join its thread (twice: nothing)."""
        self._core.close()

    def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Await ``fn(*args, **kwargs)`` on the loop; its result, or its error, here."""
        return cast(T, self._core.call(fn, args, kwargs))

    def run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Call the plain function ``fn(*args, **kwargs)`` on the loop thread."""
        return cast(T, self._core.call(fn, args, kwargs))

    def soon(self, fn: Callable[[], Awaitable[Any]]) -> None:
        """Start ``fn()`` on the loop without waiting (clean-up)."""
        self._core.soon(fn)

    def on_loop_thread(self) -> bool:
        """True in the loop's own thread (event handlers run there)."""
        return self._core.on_loop_thread()

    def release(self, fn: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """Run the clean-up ``fn()`` on the loop: waited for from another thread, started
        and left from the loop's own; nothing once the loop is gone."""
        if not self.running:
            return
        if self.on_loop_thread():
            self.soon(fn)
            return
        try:
            self.call(fn)
        except EngineClosedError:
            pass
        except Exception:
            log.warning("a clean-up of the blocking facade failed", exc_info=True)

    def iterate(self, iterator: AsyncIterator[T]) -> Iterator[T]:
        """The items of an async iterator of the engine, each fetched on the loop."""
        try:
            while True:
                finished, item = self.call(_step, iterator)
                if finished:
                    return
                yield cast(T, item)
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                self.release(aclose)

    def context(
        self, factory: Callable[[], AbstractAsyncContextManager[T]]
    ) -> AbstractContextManager[T]:
        """A ``with`` block around the async context manager ``factory()`` of the engine,
        entered and exited on the loop."""
        self.check()
        return _BlockingContext(self, factory)


class _BlockingContext(Generic[T]):
    def __init__(self, portal: Portal, factory: Callable[[], AbstractAsyncContextManager[T]]):
        self._portal = portal
        self._factory = factory
        self._entered: AbstractAsyncContextManager[T] | None = None

    async def _enter(self) -> T:
        manager = self._factory()
        value = await manager.__aenter__()
        self._entered = manager
        return value

    def __enter__(self) -> T:
        if self._entered is not None:
            raise RuntimeError("this context manager is already in use")
        return self._portal.call(self._enter)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        manager, self._entered = self._entered, None
        if manager is None:
            return None
        return self._portal.call(manager.__aexit__, exc_type, exc, tb)
