"""Group commit: concurrent calls of one kind written by shared statements."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Generic, TypeVar

I = TypeVar("I")  # noqa: E741 - an item of a batch
R = TypeVar("R")

log = logging.getLogger(__name__)


class Solo:
    """The answer of a batch to an item it did not settle: its caller runs alone."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "SOLO"


#: See :class:`Solo`.
SOLO: Final = Solo()

#: The most items one batch takes (one statement's rows).
BATCH_LIMIT = 256


class Combiner(Generic[I, R]):
    """Runs the items of concurrent calls together: ``run(items)`` settles a batch with
    one result per item, in order (:data:`SOLO` for an item it could not settle, whose
    caller then runs on its own path: a refusal gets that caller's own error there).

    Up to ``slots`` batches run at once (two: one is written while the next is built
    and its answers read). A call that finds a slot free runs at once, in its own task,
    as a batch of one: a lone caller waits for nothing, and its cancellation interrupts
    its own statement as any call's does. Calls that arrive while every slot is busy
    wait, and run together as the next batch (at most :data:`BATCH_LIMIT`), in a task
    of the combiner, when a slot frees; one cancelled before its batch starts is left
    out of it, and one cancelled while its batch runs stops that batch (whose other
    callers then run alone), so a cancelled call is applied only if its statement had
    already been sent, as when it runs alone. A batch that fails answers :data:`SOLO`
    to every caller, so each meets its own error.
    """

    __slots__ = ("_active", "_batches", "_pending", "_run", "_slots")

    def __init__(
        self, run: Callable[[Sequence[I]], Awaitable[Sequence[R | Solo]]], *, slots: int = 2
    ) -> None:
        self._run = run
        self._slots = slots
        #: batches running now
        self._active = 0
        self._pending: list[tuple[I, asyncio.Future[R | Solo]]] = []
        #: the tasks running waiting calls' batches, with their callers' futures
        self._batches: dict[asyncio.Task[None], _Batch[I, R]] = {}

    async def __call__(self, item: I) -> R | Solo:
        if self._active < self._slots:
            self._active += 1
            try:
                return (await self._run((item,)))[0]
            finally:
                self._active -= 1
                self._start_waiting()
        future: asyncio.Future[R | Solo] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        try:
            return await future
        except asyncio.CancelledError:
            # its batch may be running: stopped, as the call would stop alone (the
            # others run alone); one still waiting is left out when a batch forms
            for task, batch in self._batches.items():
                if future in batch.futures:
                    batch.stopped = True
                    task.cancel()
            raise

    def _start_waiting(self) -> None:
        """Start batches of the waiting calls while slots are free."""
        while self._pending and self._active < self._slots:
            taken = self._pending[:BATCH_LIMIT]
            del self._pending[:BATCH_LIMIT]
            batch = _Batch([(item, future) for item, future in taken if not future.done()])
            if batch.calls:
                self._active += 1
                task = asyncio.get_running_loop().create_task(self._run_batch(batch))
                self._batches[task] = batch

    async def _run_batch(self, batch: _Batch[I, R]) -> None:
        results: Sequence[R | Solo] = [SOLO] * len(batch.calls)
        try:
            results = await self._run([item for item, _ in batch.calls])
        except asyncio.CancelledError:
            if not batch.stopped:
                raise  # the loop is ending: the callers are answered below all the same
        except Exception:  # every caller meets the error on its own path
            log.debug("a combined write failed; its calls run alone", exc_info=True)
        finally:
            for (_, future), result in zip(batch.calls, results, strict=True):
                if not future.done():
                    future.set_result(result)
            task = asyncio.current_task()
            if task is not None:
                self._batches.pop(task, None)
            self._active -= 1
            self._start_waiting()


class _Batch(Generic[I, R]):
    """The calls of one batch run by the combiner's task."""

    __slots__ = ("calls", "futures", "stopped")

    def __init__(self, calls: list[tuple[I, asyncio.Future[R | Solo]]]) -> None:
        self.calls = calls
        self.futures = {future for _, future in calls}
        #: a caller was cancelled, and the batch with it
        self.stopped = False
