"""What the framework adapters share: ``async with`` / ``close()`` that end the use
of the adapter, never of the engine it was given."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Closable:
    """``close()`` (idempotent) and ``async with``; after it, ``_check_open()`` raises
    ``RuntimeError`` naming :meth:`_describe`."""

    _closed = False

    async def __aenter__(self) -> Self:
        self._check_open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop using this object (idempotent); the engine stays open."""
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(
                f"{self._describe()} is closed; create a new one "
                "(its engine and what it stored are untouched)"
            )

    def _describe(self) -> str:
        return f"this {type(self).__name__}"
