"""A TCP proxy in front of the machine's PostgreSQL that can stop forwarding (a frozen
server, as the engine sees it) or forward slowly, drop the connections it carries,
and treat the connections after the first few differently: refuse them (nothing
listens any more) or hold them unanswered (frozen for new connections only)."""

from __future__ import annotations

import asyncio
from typing import Literal

Later = Literal["forward", "refuse", "freeze"]


class Proxy:
    """A TCP proxy to the PostgreSQL server that can stop forwarding: paused, it
    accepts connections and holds every byte either way until resumed (a frozen
    server, as the engine sees it); ``slow()`` delays every byte; ``drop()`` closes
    the connections it carries; ``admit(n, then)`` forwards only the next ``n`` new
    connections and then refuses new ones (it stops listening) or holds them
    unanswered."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self._forwarding = asyncio.Event()
        self._forwarding.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self._latency = 0.0
        self._admit: int | None = None
        self._then: Later = "forward"
        self.port = 0
        #: Connections accepted so far.
        self.accepted = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def pause(self) -> None:
        self._forwarding.clear()

    def resume(self) -> None:
        self._forwarding.set()

    def slow(self, latency: float) -> None:
        """Hold every chunk of bytes, either way, ``latency`` seconds before passing it
        on (0: at once): a server that answers, slowly."""
        self._latency = latency

    def admit(self, count: int, then: Later) -> None:
        """Forward the next ``count`` new connections; after them, ``then``: "refuse"
        closes the listening socket (connecting is refused; the connections carried
        go on), "freeze" accepts them and never forwards a byte."""
        self._admit, self._then = count, then
        if count == 0:
            self._after_admitted()

    def drop(self) -> None:
        for writer in self._writers:
            writer.transport.abort()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.drop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _after_admitted(self) -> None:
        if self._then == "refuse" and self._server is not None:
            self._server.close()  # stops listening; the connections carried go on

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        held = False
        if self._admit is not None:
            if self._admit > 0:
                self._admit -= 1
                if self._admit == 0:
                    self._after_admitted()
            else:
                held = self._then == "freeze"
        task = asyncio.create_task(self._hold(writer) if held else self._carry(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _hold(self, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await asyncio.Event().wait()  # until close() cancels it
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await self._forwarding.wait()
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._upstream_port)
            self._writers.add(up_writer)
            try:
                await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
            finally:
                self._writers.discard(up_writer)
                up_writer.transport.abort()
        except OSError:
            pass  # either side went away
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while data := await source.read(65536):
            if self._latency:
                await asyncio.sleep(self._latency)
            await self._forwarding.wait()
            sink.write(data)
            await sink.drain()
        sink.transport.abort()  # one side closed: close the other


def through(pg_url: str, proxy: Proxy) -> str:
    """``pg_url`` by way of ``proxy``."""
    user, rest = pg_url.split("@", 1)
    return f"{user}@127.0.0.1:{proxy.port}/{rest.split('/', 1)[1]}"
