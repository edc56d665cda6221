"""Many idle streams through one chain, held open until told to check and close them.

    python -m bench.idle --proxy PORT [--auth USER:PASS] [--via PORT] --target PORT --count N

Speaks SOCKS5 itself (asyncio, so 10,000 connections need no 10,000 threads), sending the
same bytes proxychains would: to ``--proxy`` with user/password when ``--auth`` is given, and
for the old chain a second, nested SOCKS5 handshake to ``--via`` (dante) through the first.
Every stream is proven end to end with a 1-byte echo when opened. Protocol on stdin/stdout,
one JSON line per step: after opening it prints {"opened", "failed", "seconds"}; the line
``check`` echoes one byte on every stream again and prints {"alive", "dead"}; ``close`` (or
EOF) closes everything and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import struct
import sys
import time
from typing import Optional

from bench.common import run_async

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _socks5(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    port: int,
    auth: Optional[tuple[str, str]],
) -> None:
    writer.write(b"\x05\x01\x02" if auth else b"\x05\x01\x00")
    method = await reader.readexactly(2)
    if auth:
        if method != b"\x05\x02":
            raise ConnectionError(f"method {method!r}")
        user, password = (x.encode() for x in auth)
        writer.write(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
        if (await reader.readexactly(2))[1] != 0:
            raise ConnectionError("auth refused")
    elif method != b"\x05\x00":
        raise ConnectionError(f"method {method!r}")
    writer.write(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", port))
    head = await reader.readexactly(4)
    if head[1] != 0:
        raise ConnectionError(f"CONNECT refused, reply {head[1]}")
    size = {1: 4, 4: 16}.get(head[3])
    if size is None:
        size = (await reader.readexactly(1))[0]
    await reader.readexactly(size + 2)


async def open_one(args: argparse.Namespace, auth: Optional[tuple[str, str]]) -> Conn:
    reader, writer = await asyncio.open_connection("127.0.0.1", args.proxy)
    try:
        if args.via:
            await _socks5(reader, writer, args.via, auth)
            await _socks5(reader, writer, args.target, None)
        else:
            await _socks5(reader, writer, args.target, auth)
        writer.write(b"o")
        if await reader.readexactly(1) != b"o":
            raise ConnectionError("bad echo")
    except BaseException:
        writer.transport.abort()
        raise
    return reader, writer


async def echo(conn: Conn, timeout: float) -> bool:
    reader, writer = conn
    try:
        writer.write(b"c")
        return await asyncio.wait_for(reader.readexactly(1), timeout) == b"c"
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
        return False


async def _check_all(conns: list[Conn]) -> list[bool]:
    gate = asyncio.Semaphore(256)

    async def checked(conn: Conn) -> bool:
        async with gate:
            return await echo(conn, 20)

    return await asyncio.gather(*(checked(c) for c in conns))


async def run(args: argparse.Namespace) -> None:
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    conns: list[Conn] = []
    failed = 0
    errors: dict[str, int] = {}
    gate = asyncio.Semaphore(args.concurrency)
    started = time.monotonic()
    deadline = started + args.open_timeout

    async def one() -> None:
        nonlocal failed
        async with gate:
            if time.monotonic() > deadline:
                failed += 1
                errors["open deadline passed"] = errors.get("open deadline passed", 0) + 1
                return
            try:
                conns.append(await asyncio.wait_for(open_one(args, auth), 30))
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
                failed += 1
                key = f"{type(exc).__name__}: {exc}"[:120]
                errors[key] = errors.get(key, 0) + 1

    await asyncio.gather(*(one() for _ in range(args.count)))
    out = {
        "opened": len(conns),
        "failed": failed,
        "errors": errors,
        "seconds": time.monotonic() - started,
    }
    print(json.dumps(out), flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if line == "check":
            results = await _check_all(conns)
            alive = sum(results)
            print(json.dumps({"alive": alive, "dead": len(results) - alive}), flush=True)
        else:
            break
    for _, writer in conns:
        writer.transport.abort()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--proxy", type=int, required=True)
    parser.add_argument("--auth", default="")
    parser.add_argument("--via", type=int, default=0)
    parser.add_argument("--target", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--open-timeout", type=float, default=300.0)
    args = parser.parse_args()
    run_async(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
