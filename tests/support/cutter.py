"""A TCP forwarder between worker and exit whose connections a test can break on command:
reset them (both ends see a TCP reset) or black-hole them (bytes vanish, nothing is closed),
as a site firewall or a dying login node would; or tamper with them as an on-path attacker
on port 80 would (flip a bit, inject bytes, replay bytes already sent)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from typing import Optional


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    def __init__(self, a: asyncio.StreamWriter, b: asyncio.StreamWriter) -> None:
        self.writers = (a, b)
        self.blackholed = False
        self.tasks: list[asyncio.Task[None]] = []
        self.forwarded = [0, 0]  # bytes towards the exit, towards the worker
        self.last = [b"", b""]


TAMPERS = ("flip", "inject", "replay")


class Cutter:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.links: list[_Link] = []
        self.accepted = 0
        self.refusing = False
        self._server: Optional[asyncio.Server] = None
        self._tamper: list[tuple[str, int, int]] = []  # (how, direction, after bytes)
        self.tampered: list[str] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        return ("127.0.0.1", int(self._server.sockets[0].getsockname()[1]))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            _reset(writer)
            return
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(writer)
            return
        link = _Link(writer, up_writer)
        self.links.append(link)
        link.tasks = [
            asyncio.ensure_future(self._pipe(reader, up_writer, link, 0)),
            asyncio.ensure_future(self._pipe(up_reader, writer, link, 1)),
        ]
        await asyncio.gather(*link.tasks, return_exceptions=True)
        with contextlib.suppress(ValueError):
            self.links.remove(link)

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        link: _Link,
        direction: int,
    ) -> None:
        try:
            while data := await reader.read(1 << 18):
                if link.blackholed:
                    continue
                data = self._maybe_tamper(data, link, direction)
                link.forwarded[direction] += len(data)
                writer.write(data)
                await writer.drain()
            if not link.blackholed and writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            for w in link.writers:
                _reset(w)

    def tamper(self, how: str, direction: int, after: int = 0) -> None:
        """Alter the next chunk going ``direction`` (0 to the exit, 1 to the worker) on a
        connection that has forwarded at least ``after`` bytes that way."""
        assert how in TAMPERS
        self._tamper.append((how, direction, after))

    def _maybe_tamper(self, data: bytes, link: _Link, direction: int) -> bytes:
        for i, (how, towards, after) in enumerate(self._tamper):
            if towards != direction or link.forwarded[direction] < after or len(data) < 2:
                continue
            del self._tamper[i]
            self.tampered.append(how)
            middle = len(data) // 2
            if how == "flip":
                data = data[:middle] + bytes((data[middle] ^ 0x01,)) + data[middle + 1 :]
            elif how == "inject":
                data = data[:middle] + os.urandom(64) + data[middle:]
            else:  # replay: bytes this connection already carried, once more
                data = data + (link.last[direction] or data)
            break
        link.last[direction] = data[-4096:]
        return data

    def reset_all(self) -> int:
        """Reset every live connection (both sides see ECONNRESET)."""
        links, self.links = self.links, []
        for link in links:
            for writer in link.writers:
                _reset(writer)
        return len(links)

    def blackhole_all(self) -> int:
        """From now on silently drop every byte of the live connections; close nothing."""
        live = [link for link in self.links if not link.blackholed]
        for link in live:
            link.blackholed = True
        return len(live)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self.links):
            for writer in link.writers:
                writer.transport.abort()
            for task in link.tasks:
                task.cancel()
        self.links.clear()
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2)
