"""A TCP relay on loopback in front of a server, for tests that break the network between two
real peers: ``cut()`` resets every connection through it at once, as a failed link would."""

from __future__ import annotations

import asyncio
import contextlib


class TcpRelay:
    """Listens on ``127.0.0.1:0`` (``address`` once entered) and relays each connection to
    ``target`` ("host:port"). ``cut()`` resets both ends of every connection open through it;
    connections made after a cut go through as before."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.address = ""
        self.num_cuts = 0
        self._server: asyncio.Server | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()

    async def __aenter__(self) -> TcpRelay:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        await self._server.wait_closed()

    def cut(self) -> None:
        for ends in self._links:
            for writer in ends:
                writer.transport.abort()  # a reset, not a goodbye
        self._links.clear()
        self.num_cuts += 1

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = self.target.rsplit(":", 1)
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            writer.transport.abort()
            return
        ends = (writer, up_writer)
        self._links.add(ends)
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._links.discard(ends)
            for w in ends:
                w.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()
