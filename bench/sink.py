"""The destination of every chain: a bulk source/sink and an echo server, on loopback.

    python -m bench.sink --bulk-port P --echo-port Q

Bulk (one thread per connection, blocking sockets): the client's first line is ``UP N`` (the
client then sends N bytes; after N bytes we answer ``OK <bytes> <sha256>``) or ``DOWN N``
(we send N bytes of the pattern and half-close). Echo (asyncio): every byte is sent back, a
half-close is answered with a close; used for setup latency, connection rate and idle streams.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import socketserver
import sys
import threading
from typing import Optional

from bench.common import recv_hash, run_async, send_pattern


class BulkHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = b""
        while b"\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                return
            head += chunk
        line, _, rest = head.partition(b"\n")
        verb, _, arg = line.decode().partition(" ")
        size = int(arg)
        if verb == "UP":
            # Answer after N bytes rather than at EOF: a proxy that loses half-closes (pproxy)
            # must still be measurable.
            got, digest = recv_hash(sock, rest, limit=size)
            sock.sendall(f"OK {got} {digest}\n".encode())
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(4096):
                pass
        elif verb == "DOWN":
            send_pattern(sock, size)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(4096):
                pass


class BulkServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


class Echo(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: Optional[asyncio.Transport] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False  # close our side too


async def serve_echo(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, sock=sock, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--bulk-port", type=int, required=True)
    parser.add_argument("--echo-port", type=int, required=True)
    args = parser.parse_args()
    bulk = BulkServer((args.host, args.bulk_port), BulkHandler)
    threading.Thread(target=bulk.serve_forever, daemon=True).start()
    echo = socket.socket()
    echo.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    echo.bind((args.host, args.echo_port))
    echo.listen(4096)
    print("ready", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        run_async(serve_echo(echo))
    return 0


if __name__ == "__main__":
    sys.exit(main())
