"""The background cleanup loop: one owned task, a stop event, backoff on failure."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("ctxengine.cleanup")

#: Longest pause between attempts after repeated failures, in seconds.
MAX_BACKOFF = 300.0


class CleanupLoop:
    """Runs ``sweep`` every ``interval`` seconds until stopped.

    A failing sweep is logged and retried after a doubling backoff (capped at
    ``MAX_BACKOFF``, never shorter than the interval); the loop goes on.
    """

    def __init__(self, sweep: Callable[[], Awaitable[int]], interval: float) -> None:
        self._sweep = sweep
        self._interval = interval
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: Consecutive failed sweeps (0 after a success).
        self.failures = 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ctxengine-cleanup")

    def _delay(self) -> float:
        if not self.failures:
            return self._interval
        backoff: float = self._interval * 2.0**self.failures
        return max(self._interval, min(backoff, MAX_BACKOFF))

    async def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self._delay())
            if self._stop.is_set():
                return
            try:
                expired = await self._sweep()
            except Exception:
                self.failures += 1
                log.exception(
                    "cleanup sweep failed; retrying",
                    extra={"failures": self.failures, "retry_in": self._delay()},
                )
            else:
                self.failures = 0
                if expired:
                    log.info("expired idle sessions", extra={"expired": expired})

    async def stop(self, grace: float = 1.0) -> None:
        """Ask the loop to stop; cancel it if it has not stopped within ``grace`` seconds."""
        self._stop.set()
        task, self._task = self._task, None
        if task is None:
            return
        done, _ = await asyncio.wait({task}, timeout=grace)
        if not done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, timeout=grace)
