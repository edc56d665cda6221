"""Idle CPU of relay-worker and relay-exit together, holding N idle streams on loopback.

    python -m bench.idle_cpu [--streams 4000] [--idle 40]

Both daemons run in this one process (carriers straight to the exit, no sshd), heartbeat 25 s
(the default). Every stream is opened through the worker's SOCKS5 port to an echo server and
proven by a 1-byte echo, then left idle; the CPU time of the process over the idle window is
printed as % of one core. It isolates what the relay's own timers cost per idle stream; the
namespace lab (bench.mux_lab) measures the same with sshd and a firewall in the path.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import tempfile
import time
from pathlib import Path

from relay.config.values import HostPort, parse_rule
from relay.exit.daemon import RelayExit
from relay.exit.settings import ExitSettings
from relay.worker.daemon import RelayWorker
from relay.worker.settings import WorkerSettings

KEY_ID, SECRET = "bench", b"0123456789abcdef0123456789abcdef"
USER, PASSWORD = b"bench", b"bench-password"


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
    except ConnectionError:
        pass


def _private(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


async def measure(streams: int, idle: float) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        return await _measure(Path(tmp), streams, idle)


async def _measure(files: Path, streams: int, idle: float) -> float:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # two sockets per stream here
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    relay_exit = RelayExit(
        ExitSettings(
            listen=HostPort("127.0.0.1", 0),
            keys=_private(files / "exit.keys", KEY_ID.encode() + b" " + SECRET + b"\n"),
            allow=(parse_rule("127.0.0.1/32:*"),),
            max_streams=streams + 100,
            max_streams_per_key=streams + 100,
        )
    )
    await relay_exit.start()
    worker = RelayWorker(
        WorkerSettings(
            socks=HostPort("127.0.0.1", 0),
            socks_auth=_private(files / "socks.auth", USER + b":" + PASSWORD + b"\n"),
            exit=(HostPort(*relay_exit.address),),
            key_id=KEY_ID,
            secret_file=_private(files / "secret", SECRET),
        )
    )
    await worker.start()
    host, socks_port = worker.address
    greeting = b"\x05\x01\x02" + bytes((1, len(USER))) + USER + bytes((len(PASSWORD),)) + PASSWORD
    request = b"\x05\x01\x00\x01\x7f\x00\x00\x01" + port.to_bytes(2, "big")
    conns = []
    try:
        for _ in range(streams):
            reader, writer = await asyncio.open_connection(host, socks_port)
            writer.write(greeting + request)
            await reader.readexactly(2 + 2 + 10)
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            conns.append((reader, writer))
        await asyncio.sleep(2)
        wall, cpu = time.monotonic(), time.process_time()
        await asyncio.sleep(idle)
        share = (time.process_time() - cpu) / (time.monotonic() - wall)
        for reader, writer in conns:  # still alive after the idle window
            writer.write(b"y")
            assert await reader.readexactly(1) == b"y"
        return 100 * share
    finally:
        for _, writer in conns:
            writer.close()
        await worker.stop()
        await relay_exit.stop()
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=4000)
    parser.add_argument("--idle", type=float, default=40.0)
    args = parser.parse_args()
    percent = asyncio.run(measure(args.streams, args.idle))
    print(f"{args.streams} idle streams for {args.idle:.0f} s: {percent:.3f} % of one core")


if __name__ == "__main__":
    main()
