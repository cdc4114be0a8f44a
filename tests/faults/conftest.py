"""Fixtures of the fault suite: a pausing TCP proxy in front of the test database."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from .proxy import Proxy


@pytest.fixture
async def proxy(pg_url: str) -> AsyncIterator[Proxy]:
    """A :class:`Proxy` to the server of ``pg_url`` (connect with ``through``)."""
    proxy = Proxy(int(pg_url.split("@", 1)[1].split("/", 1)[0].rsplit(":", 1)[1]))
    await proxy.start()
    yield proxy
    await proxy.close()
