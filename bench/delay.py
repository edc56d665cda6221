"""A user-space WAN emulator: TCP forwarders that hold every chunk for a fixed time each way.

    python -m bench.delay --route LISTEN_PORT:TARGET_HOST:TARGET_PORT:DELAY_MS [--route ...]

This kernel has no ``sch_netem``, so a leg of the chain (login node -> exit, exit ->
destination) is routed through one of these. Each direction is a FIFO of (due time, bytes);
bytes are written when they are due, so order is kept and one-way delay is DELAY_MS for every
chunk. Timers on this loop have millisecond granularity, so delivery sleeps until just before
the due time and spins the rest (only while something is due within a millisecond), keeping
the error in the tens of microseconds. A half-close and a close travel after the bytes before
them. Accept and connect are not delayed: TCP handshakes cost no emulated round trip, data
does (the same for every chain).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import socket
import sys
import time
from typing import Optional

SPIN = 0.0012  # wake this early and spin to the due time
HIGH_WATER = 8 << 20  # pause the reading side when this much is queued one way


class Direction:
    """Bytes from ``src`` queued for ``dst``, each held ``delay`` seconds."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self.loop = loop
        self.delay = delay
        self.queue: collections.deque[tuple[float, Optional[bytes]]] = collections.deque()
        self.queued = 0
        self.dst: Optional[asyncio.Transport] = None
        self.src: Optional[asyncio.Transport] = None
        self.timer: Optional[asyncio.TimerHandle] = None
        self.paused = False
        self.closed = False

    def push(self, data: Optional[bytes]) -> None:
        """Queue bytes (None = end of stream)."""
        self.queue.append((time.monotonic() + self.delay, data))
        if data:
            self.queued += len(data)
            if self.queued > HIGH_WATER and self.src is not None and not self.paused:
                self.paused = True
                self.src.pause_reading()
        self._arm()

    def _arm(self) -> None:
        if self.timer is None and self.queue and self.dst is not None:
            wait = self.queue[0][0] - time.monotonic() - SPIN
            self.timer = self.loop.call_later(max(0.0, wait), self._deliver)

    def _deliver(self) -> None:
        self.timer = None
        dst = self.dst
        if dst is None:
            return
        while self.queue:
            due, data = self.queue[0]
            now = time.monotonic()
            if due > now:
                if due - now > SPIN:
                    break
                while time.monotonic() < due:
                    pass
            self.queue.popleft()
            if data is None:
                if dst.can_write_eof():
                    dst.write_eof()
                continue
            self.queued -= len(data)
            if not dst.is_closing():
                dst.write(data)
        if self.paused and self.queued < HIGH_WATER // 2 and self.src is not None:
            self.paused = False
            self.src.resume_reading()
        if not self.queue and self.closed:
            dst.close()
        self._arm()

    def close_after_drain(self) -> None:
        self.closed = True
        if not self.queue and self.dst is not None:
            self.dst.close()


class Side(asyncio.Protocol):
    """One socket of a forwarded connection; its bytes go to ``out``."""

    def __init__(self, out: Direction, back: Direction) -> None:
        self.out = out  # what we read goes here
        self.back = back  # what we write comes from here
        self.transport: Optional[asyncio.Transport] = None
        self.dialling: Optional[asyncio.Task[None]] = None  # keeps the dial task referenced

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.out.src = self.transport
        self.back.dst = self.transport
        self.back._arm()

    def data_received(self, data: bytes) -> None:
        self.out.push(data)

    def eof_received(self) -> bool:
        self.out.push(None)
        return True

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.out.close_after_drain()
        self.back.dst = None


class Route:
    def __init__(self, target: tuple[str, int], delay: float) -> None:
        self.target = target
        self.delay = delay

    def accepted(self) -> Side:
        loop = asyncio.get_running_loop()
        up = Direction(loop, self.delay)  # client -> target
        down = Direction(loop, self.delay)  # target -> client
        client = Side(up, down)

        async def dial() -> None:
            try:
                await loop.create_connection(lambda: Side(down, up), *self.target)
            except OSError:
                if client.transport is not None:
                    client.transport.abort()

        client.dialling = loop.create_task(dial())
        return client


async def serve(routes: list[tuple[socket.socket, Route]]) -> None:
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(route.accepted, sock=sock) for sock, route in routes]
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--route", action="append", required=True)
    args = parser.parse_args()
    routes = []
    for spec in args.route:
        port, host, tport, ms = spec.split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, int(port)))
        sock.listen(1024)
        routes.append((sock, Route((host, int(tport)), float(ms) / 1000)))
    print("ready", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(routes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
