"""Run in spawned processes: migrate one database at the same moment."""

from __future__ import annotations

import asyncio

from ctxengine import ContextEngine, EngineSettings


def migrate(url: str) -> None:
    asyncio.run(ContextEngine(url, settings=EngineSettings(auto_cleanup=False)).migrate())
