"""Destinations for the soak traffic (``bench.soak_traffic``): echo, bulk and a flaky echo.

    python -m bench.soak_sink --host H --echo-port P1 --bulk-port P2 --flaky-port P3 \
        [--status-file F]

Echo: every byte is sent back as received; the client's half-close is answered with a close
after the last echoed byte.

Bulk: the client's first line is a JSON header ``{"dir": "down"|"up", "size": N, "seed": S}``.
``down``: the sink sends the N bytes of the stream of seed S (``pattern``), then half-closes.
``up``: the sink reads exactly N bytes, compares them with the stream of seed S as they arrive,
and answers ``OK\\n`` or ``BAD <details>\\n``; bytes after the N (up to the client's EOF) are
answered with a second line ``BAD <n> extra bytes after <N>\\n``; then it closes.

Flaky: echoes like the echo port, but SIGUSR1 resets (SO_LINGER 0, then close: an RST) every
open connection, and SIGUSR2 makes every connection, open or new, go silent (nothing read,
nothing written) until the next SIGUSR2.

The stream of seed S: 64 KiB blocks, block i the slice of a fixed 1 MiB pseudo-random pool
at an offset drawn from (S, i) by splitmix64. A dropped, repeated, shifted or foreign piece
lands at a different pool offset, so it compares unequal; producing and checking a block is a
slice and a memcmp (several GB/s).

Ports may be 0 (the kernel picks one); the first line on stdout is ``{"ready": true, ...}``
with the ports bound. ``--status-file`` gets a JSON snapshot every second.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterator
from typing import Any, Optional, cast

BLOCK = 64 * 1024
POOL_SIZE = 1 << 20
_POOL = random.Random(0x50A4_5EED).randbytes(POOL_SIZE + BLOCK)
_MASK64 = (1 << 64) - 1

BULK_READ = 1 << 20
WRITE_HIGH = 4 << 20
HEADER_LIMIT = 4096
PORT_NAMES = ("echo", "bulk", "flaky")
RST_LINGER = struct.pack("ii", 1, 0)


def _block_offset(seed: int, index: int) -> int:
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) % POOL_SIZE


def pattern(seed: int, start: int, length: int) -> bytes:
    """Bytes ``[start, start + length)`` of the stream of ``seed``."""
    parts = []
    while length > 0:
        index, skip = divmod(start, BLOCK)
        take = min(BLOCK - skip, length)
        at = _block_offset(seed, index) + skip
        parts.append(_POOL[at : at + take])
        start += take
        length -= take
    if len(parts) == 1:
        return parts[0]
    return b"".join(parts)


def pattern_chunks(seed: int, size: int) -> Iterator[bytes]:
    """The stream of ``seed``, ``size`` bytes long, one block at a time."""
    for start in range(0, size, BLOCK):
        yield pattern(seed, start, min(BLOCK, size - start))


def first_difference(got: bytes, want: bytes) -> int:
    """Index of the first byte where ``got`` and ``want`` differ (or the shorter length)."""
    n = min(len(got), len(want))
    lo = 0
    # Halve the range while the prefixes compare equal: O(log n) slices, no Python byte loop.
    hi = n
    while lo < hi:
        mid = (lo + hi) // 2
        if got[lo : mid + 1] == want[lo : mid + 1]:
            lo = mid + 1
        else:
            hi = mid
    return lo


class Checker:
    """Compares received bytes, in order, with the stream of ``seed`` of ``size`` bytes."""

    __slots__ = ("pos", "seed", "size")

    def __init__(self, seed: int, size: int) -> None:
        self.seed = seed
        self.size = size
        self.pos = 0

    def feed(self, data: bytes) -> Optional[str]:
        """None when ``data`` is the next part of the stream, else what is wrong."""
        extra = self.pos + len(data) - self.size
        if extra > 0:
            own = data[: len(data) - extra]
            if own != pattern(self.seed, self.pos, len(own)):
                return self._differs(own)
            return f"{extra} bytes beyond the {self.size} of the stream"
        if data != pattern(self.seed, self.pos, len(data)):
            return self._differs(data)
        self.pos += len(data)
        return None

    def _differs(self, data: bytes) -> str:
        want = pattern(self.seed, self.pos, len(data))
        i = first_difference(data, want)
        return (
            f"byte {self.pos + i} of {self.size} differs: got {data[i : i + 8].hex()} "
            f"want {want[i : i + 8].hex()}"
        )


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def reset(transport: asyncio.Transport) -> None:
    """Close with an RST instead of a FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST_LINGER)
    transport.abort()


class Sink:
    def __init__(self) -> None:
        self.open = dict.fromkeys(PORT_NAMES, 0)
        self.accepted = dict.fromkeys(PORT_NAMES, 0)
        self.bytes_in = dict.fromkeys(PORT_NAMES, 0)
        self.bytes_out = dict.fromkeys(PORT_NAMES, 0)
        self.flaky: set[EchoProtocol] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.vanished = False
        self.flaky_resets = 0
        self.reset_signals = 0
        self.vanish_toggles = 0
        self.bulk_down_done = 0
        self.bulk_up_ok = 0
        self.bulk_bad = 0
        self.bulk_eof_early = 0
        self.bulk_errors = 0
        self.bad_headers = 0
        self.bad_details: list[str] = []
        self.started = time.time()

    def bad(self, what: str) -> None:
        self.bulk_bad += 1
        self.bad_details = [*self.bad_details[-19:], what]

    def reset_flaky(self) -> None:
        self.reset_signals += 1
        for proto in list(self.flaky):
            if proto.transport is not None and not proto.transport.is_closing():
                self.flaky_resets += 1
                reset(proto.transport)

    def toggle_vanish(self) -> None:
        self.vanish_toggles += 1
        self.vanished = not self.vanished
        for proto in list(self.flaky):
            proto.set_silent(self.vanished)

    def status(self) -> dict[str, Any]:
        return {
            "time": time.time(),
            "uptime": round(time.time() - self.started, 1),
            "pid": os.getpid(),
            "open": self.open,
            "accepted": self.accepted,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "flaky_resets": self.flaky_resets,
            "flaky_reset_signals": self.reset_signals,
            "flaky_vanish_toggles": self.vanish_toggles,
            "flaky_vanished": self.vanished,
            "bulk_down_done": self.bulk_down_done,
            "bulk_up_ok": self.bulk_up_ok,
            "bulk_bad": self.bulk_bad,
            "bulk_eof_early": self.bulk_eof_early,
            "bulk_errors": self.bulk_errors,
            "bad_headers": self.bad_headers,
            "bad_details": self.bad_details,
        }


class EchoProtocol(asyncio.Protocol):
    """Echo; on the flaky port it can also be reset or silenced by the sink."""

    def __init__(self, sink: Sink, name: str) -> None:
        self.sink = sink
        self.name = name
        self.transport: Optional[asyncio.Transport] = None
        self.write_paused = False
        self.silent = False
        self.held: list[bytes] = []
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH)
        self.sink.open[self.name] += 1
        self.sink.accepted[self.name] += 1
        if self.name == "flaky":
            self.sink.flaky.add(self)
            if self.sink.vanished:
                self.set_silent(True)

    def data_received(self, data: bytes) -> None:
        self.sink.bytes_in[self.name] += len(data)
        if self.silent:
            self.held.append(data)
            return
        assert self.transport is not None
        self.transport.write(data)
        self.sink.bytes_out[self.name] += len(data)

    def eof_received(self) -> bool:
        if self.silent:
            self.eof = True
            return True
        return False  # close once the echo is flushed

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.transport is not None and not self.silent:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.transport is not None and not self.silent:
            self.transport.resume_reading()

    def set_silent(self, silent: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or silent == self.silent:
            return
        self.silent = silent
        if silent:
            if not self.write_paused:
                transport.pause_reading()
            return
        held, self.held = self.held, []
        for data in held:
            transport.write(data)
            self.sink.bytes_out[self.name] += len(data)
        if self.eof:
            transport.close()
        elif not self.write_paused:
            transport.resume_reading()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.sink.open[self.name] -= 1
        self.sink.flaky.discard(self)
        self.transport = None


async def bulk(sink: Sink, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    # Held here: a task only the transport refers to can be collected while it waits.
    task = asyncio.current_task()
    if task is not None:
        sink.tasks.add(task)
        task.add_done_callback(sink.tasks.discard)
    sink.open["bulk"] += 1
    sink.accepted["bulk"] += 1
    transport = writer.transport
    transport.set_write_buffer_limits(high=WRITE_HIGH)
    try:
        await _bulk(sink, reader, writer)
    except (ConnectionError, OSError, asyncio.IncompleteReadError):
        sink.bulk_errors += 1
    finally:
        sink.open["bulk"] -= 1
        writer.close()


async def _bulk(sink: Sink, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        line = await reader.readuntil(b"\n")
        header = json.loads(line)
        direction, size, seed = header["dir"], int(header["size"]), int(header["seed"])
        if direction not in ("down", "up") or size < 0:
            raise ValueError(direction)
    except asyncio.IncompleteReadError:
        sink.bulk_eof_early += 1
        return
    except (ValueError, KeyError, TypeError, asyncio.LimitOverrunError):
        sink.bad_headers += 1
        writer.write(b"BAD header\n")
        return
    sink.bytes_in["bulk"] += len(line)
    if direction == "down":
        for chunk in pattern_chunks(seed, size):
            writer.write(chunk)
            sink.bytes_out["bulk"] += len(chunk)
            await writer.drain()
        writer.write_eof()
        sink.bulk_down_done += 1
        while data := await reader.read(BULK_READ):  # to the client's EOF
            sink.bytes_in["bulk"] += len(data)
        return
    checker = Checker(seed, size)
    error: Optional[str] = None
    got = 0
    while got < size:
        data = await reader.read(min(BULK_READ, size - got))
        if not data:
            sink.bulk_eof_early += 1
            return
        got += len(data)
        sink.bytes_in["bulk"] += len(data)
        if error is None:
            error = checker.feed(data)
    if error is None:
        sink.bulk_up_ok += 1
        writer.write(b"OK\n")
    else:
        sink.bad(f"up seed {seed}: {error}")
        writer.write(f"BAD {error}\n".encode())
    await writer.drain()
    extra = 0
    while data := await reader.read(BULK_READ):
        extra += len(data)
    if extra:
        sink.bytes_in["bulk"] += extra
        sink.bad(f"up seed {seed}: {extra} extra bytes after {size}")
        writer.write(f"BAD {extra} extra bytes after {size}\n".encode())
        await writer.drain()


def write_status(path: str, status: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(status, f)
        f.write("\n")
    os.replace(tmp, path)


async def serve(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    sink = Sink()
    echo = await loop.create_server(
        lambda: EchoProtocol(sink, "echo"), args.host, args.echo_port, backlog=args.backlog
    )
    flaky = await loop.create_server(
        lambda: EchoProtocol(sink, "flaky"), args.host, args.flaky_port, backlog=args.backlog
    )
    bulk_server = await asyncio.start_server(
        lambda r, w: bulk(sink, r, w),
        args.host,
        args.bulk_port,
        limit=BULK_READ,
        backlog=args.backlog,
    )
    done: asyncio.Future[None] = loop.create_future()

    def finish() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_signal_handler(signal.SIGUSR1, sink.reset_flaky)
    loop.add_signal_handler(signal.SIGUSR2, sink.toggle_vanish)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, finish)

    def port(server: asyncio.AbstractServer) -> int:
        return int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]

    ready = {
        "ready": True,
        "pid": os.getpid(),
        "host": args.host,
        "echo_port": port(echo),
        "bulk_port": port(bulk_server),
        "flaky_port": port(flaky),
        "nofile": raise_nofile(),
    }
    print(json.dumps(ready), flush=True)
    try:
        while not done.done():
            if args.status_file:
                write_status(args.status_file, {**ready, **sink.status()})
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(done), 1.0)
    finally:
        for server in (echo, flaky, bulk_server):
            server.close()
        final = {**ready, "ready": False, **sink.status()}
        if args.status_file:
            write_status(args.status_file, final)
        print(json.dumps(final), flush=True)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--echo-port", type=int, required=True)
    p.add_argument("--bulk-port", type=int, required=True)
    p.add_argument("--flaky-port", type=int, required=True)
    p.add_argument("--status-file", help="JSON snapshot, rewritten every second")
    p.add_argument("--backlog", type=int, default=4096)
    p.add_argument("--loop", choices=("auto", "asyncio"), default="auto")
    args = p.parse_args(argv)
    raise_nofile()
    return run(serve(args), args.loop)


def run(main: Any, loop: str) -> int:
    """Run on uvloop when installed (as the relay daemons do) unless ``loop`` is asyncio."""
    if loop == "auto":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return int(uvloop.run(main))
    return int(asyncio.run(main))


if __name__ == "__main__":
    sys.exit(main())
