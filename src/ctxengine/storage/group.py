"""Group commit: concurrent calls of one kind written by shared statements."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Generic, TypeVar

I = TypeVar("I")  # noqa: E741 - an item of a batch
R = TypeVar("R")


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
    one result per item, in order (:data:`SOLO` for an item it wrote nothing for, whose
    caller then runs on its own path: a refusal gets that caller's own error there).

    Up to ``slots`` batches run at once (two: one is written while the next is built
    and its answers read). A call that finds no batch running runs at once, in its own
    task, as a batch of one: a lone caller waits for nothing, and its cancellation
    interrupts its own statement as any call's does. Calls that arrive while a batch
    runs wait: those of one turn of the event loop run together as the next batch (at
    most :data:`BATCH_LIMIT`), in a task of the combiner, as soon as a slot is free
    (one batch for the calls of a turn, not a slot each: fuller statements, fewer of
    them). A call begins committing when its batch starts: one cancelled before is
    left out of the batch; one cancelled after hands control back at once, and its
    batch goes on for the others (it is stopped when every caller of it is cancelled).
    A batch that fails raises its error in every caller, as each would have met it
    alone: a lost connection, say, leaves each caller not knowing whether its write
    was applied, so none is run again.
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
        if not self._active:
            self._active += 1
            try:
                return (await self._run((item,)))[0]
            finally:
                self._active -= 1
                self._start_waiting()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R | Solo] = loop.create_future()
        self._pending.append((item, future))
        if len(self._pending) == 1:  # the first of this turn's calls
            loop.call_soon(self._start_waiting)
        try:
            return await future
        except asyncio.CancelledError:
            # still waiting: left out when a batch forms; in a running batch: stopped
            # only once all its callers are gone (the others are committing)
            for task, batch in self._batches.items():
                if future in batch.futures and all(f.cancelled() for f in batch.futures):
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
        try:
            results = await self._run([item for item, _ in batch.calls])
        except Exception as exc:
            for _, future in batch.calls:
                if not future.done():
                    future.set_exception(_copy(exc))
        else:
            for (_, future), result in zip(batch.calls, results, strict=True):
                if not future.done():
                    future.set_result(result)
        finally:  # cancelled: every caller was (the loop may be ending: nobody waits)
            task = asyncio.current_task()
            if task is not None:
                self._batches.pop(task, None)
            self._active -= 1
            self._start_waiting()


def _copy(exc: Exception) -> Exception:
    """An exception for one caller of a failed batch: a copy of ``exc`` (each caller's
    traceback its own), with ``exc`` as its cause."""
    try:
        copied = copy.copy(exc)
    except Exception:  # pragma: no cover - an exception that cannot be copied
        return exc
    copied.__cause__ = exc.__cause__ or exc
    copied.__traceback__ = None
    return copied


class _Batch(Generic[I, R]):
    """The calls of one batch run by the combiner's task."""

    __slots__ = ("calls", "futures")

    def __init__(self, calls: list[tuple[I, asyncio.Future[R | Solo]]]) -> None:
        self.calls = calls
        self.futures = [future for _, future in calls]
