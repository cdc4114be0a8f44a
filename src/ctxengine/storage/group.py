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

    A call that finds no batch running runs at once, in its own task, as a batch of one:
    a lone caller waits for nothing, and its cancellation interrupts its own statement
    as any call's does. Calls that arrive while a batch runs wait, and run together as
    the next batch (at most :data:`BATCH_LIMIT`), in a task of the combiner, when the
    running one ends; one cancelled before its batch starts is left out of it, and one
    cancelled while its batch runs stops that batch (whose other callers then run
    alone), so a cancelled call is applied only if its statement was already sent, as
    when it runs alone. A batch that fails answers :data:`SOLO` to every caller, so
    each meets its own error.
    """

    __slots__ = ("_busy", "_drain", "_pending", "_run", "_running")

    def __init__(self, run: Callable[[Sequence[I]], Awaitable[Sequence[R | Solo]]]) -> None:
        self._run = run
        self._pending: list[tuple[I, asyncio.Future[R | Solo]]] = []
        self._busy = False
        #: the task running the waiting calls' batches, while there is one
        self._drain: asyncio.Task[None] | None = None
        #: the batch that task runs now, and its callers' futures
        self._running: (
            tuple[asyncio.Future[Sequence[R | Solo]], set[asyncio.Future[R | Solo]]] | None
        ) = None

    async def __call__(self, item: I) -> R | Solo:
        if self._busy:
            future: asyncio.Future[R | Solo] = asyncio.get_running_loop().create_future()
            self._pending.append((item, future))
            try:
                return await future
            except asyncio.CancelledError:
                # its batch may be running: stopped, as the call would stop alone (the
                # others run alone); one still waiting is left out when a batch forms
                running = self._running
                if running is not None and future in running[1]:
                    running[0].cancel()
                raise
        self._busy = True
        try:
            return (await self._run((item,)))[0]
        finally:
            if self._pending:
                self._drain = asyncio.get_running_loop().create_task(self._run_waiting())
            else:
                self._busy = False

    async def _run_waiting(self) -> None:
        try:
            while self._pending:
                taken = self._pending[:BATCH_LIMIT]
                del self._pending[:BATCH_LIMIT]
                batch = [(item, future) for item, future in taken if not future.done()]
                if not batch:
                    continue
                results: Sequence[R | Solo] = [SOLO] * len(batch)
                run = asyncio.get_running_loop().create_task(self._settle(batch))
                self._running = (run, {future for _, future in batch})
                try:
                    results = await run
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if current is not None and current.cancelling():
                        raise  # this task is cancelled (the loop is ending), not the batch
                except Exception:  # every caller meets the error on its own path
                    log.debug("a combined write failed; its calls run alone", exc_info=True)
                finally:
                    self._running = None
                    _answer(batch, results)
        finally:
            self._busy = False
            self._drain = None
            for _, future in self._pending:
                if not future.done():
                    future.set_result(SOLO)
            self._pending.clear()

    async def _settle(
        self, batch: Sequence[tuple[I, asyncio.Future[R | Solo]]]
    ) -> Sequence[R | Solo]:
        return await self._run([item for item, _ in batch])


def _answer(
    batch: Sequence[tuple[object, asyncio.Future[R | Solo]]], results: Sequence[R | Solo]
) -> None:
    for (_, future), result in zip(batch, results, strict=True):
        if not future.done():
            future.set_result(result)
