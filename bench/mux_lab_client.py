"""The application side of bench.mux_lab, run inside the lab's worker namespace.

Every mode reaches the destination through the relay worker's SOCKS5 listener
(``--socks-port``, user/password ``--auth``) and prints JSON lines on stdout.

    idle  --count N [--concurrency C]
        Open N streams to the echo port, one 1-byte echo each; print {"opened", "failed",
        "errors", "seconds"}. Then per stdin line: ``check`` echoes one byte on every stream
        and prints {"alive", "dead", "seconds"}; ``close`` (or EOF) closes all and exits.
    rate  --seconds T --parallel P
        P loops of connect + 1-byte echo + close for T seconds; prints {"ok", "errors",
        "seconds", "per_second", "latency": {...}}.
    probe
        One stream to the echo port; prints {"event": "ready"}; then per stdin line
        ``run COUNT INTERVAL MAX_SECONDS`` does up to COUNT 1-byte round trips spaced by
        INTERVAL and prints {"samples": [...], "errors"}; ``close`` exits.
    drain --seconds T
        One stream to the bulk port asking for an endless download; reads as fast as it can
        for T seconds, then closes; prints {"bytes", "seconds", "mb_per_s"}.
    down|up --size N
        200 MiB-style bulk transfer through the bulk port, SHA-256 checked end to end (the
        sink's protocol of bench.sink); prints {"bytes", "seconds", "ok"}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import statistics
import struct
import sys
import time
from typing import Any

from bench.common import expected_digest, recv_hash, run_async, send_pattern

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _socks_request(auth: tuple[str, str], host: str, port: int) -> tuple[bytes, bytes]:
    user, password = (x.encode() for x in auth)
    login = b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password
    connect = b"\x05\x01\x00\x01" + socket.inet_aton(host) + struct.pack("!H", port)
    return login, connect


def _reply_tail(head: bytes) -> int:
    if head[1] != 0:
        raise ConnectionError(f"CONNECT refused, reply {head[1]}")
    return {1: 4, 4: 16}.get(head[3], -1)


async def socks_open(args: argparse.Namespace, port: int) -> Conn:
    reader, writer = await asyncio.open_connection("127.0.0.1", args.socks_port)
    try:
        login, connect = _socks_request(args.auth, args.host, port)
        # One step at a time, as SOCKS5 client libraries do.
        writer.write(b"\x05\x01\x02")
        if await reader.readexactly(2) != b"\x05\x02":
            raise ConnectionError("no user/password method")
        writer.write(login)
        if (await reader.readexactly(2))[1] != 0:
            raise ConnectionError("auth refused")
        writer.write(connect)
        head = await reader.readexactly(4)
        size = _reply_tail(head)
        if size < 0:
            size = (await reader.readexactly(1))[0]
        await reader.readexactly(size + 2)
    except BaseException:
        writer.transport.abort()
        raise
    return reader, writer


def socks_connect(args: argparse.Namespace, port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", args.socks_port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    login, connect = _socks_request(args.auth, args.host, port)

    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("proxy closed during the SOCKS5 handshake")
            buf += chunk
        return buf

    sock.sendall(b"\x05\x01\x02")
    if exactly(2) != b"\x05\x02":
        raise ConnectionError("no user/password method")
    sock.sendall(login)
    if exactly(2)[1] != 0:
        raise ConnectionError("SOCKS5 auth refused")
    sock.sendall(connect)
    head = exactly(4)
    size = _reply_tail(head)
    if size < 0:
        size = exactly(1)[0]
    exactly(size + 2)
    return sock


def _count(errors: dict[str, int], exc: BaseException) -> None:
    key = f"{type(exc).__name__}: {exc}"[:120]
    errors[key] = errors.get(key, 0) + 1


async def _echo(conn: Conn, byte: bytes, timeout: float) -> None:
    reader, writer = conn
    writer.write(byte)
    got = await asyncio.wait_for(reader.readexactly(1), timeout)
    if got != byte:
        raise ConnectionError(f"echo {got!r} != {byte!r}")


# ------------------------------------------------------------------------------- idle


async def check_all(conns: list[Conn]) -> dict[str, Any]:
    """One more 1-byte echo on every stream (256 at a time)."""
    began = time.monotonic()
    errors: dict[str, int] = {}
    gate = asyncio.Semaphore(256)

    async def checked(conn: Conn) -> bool:
        async with gate:
            try:
                await _echo(conn, b"c", 30)
                return True
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
                _count(errors, exc)
                return False

    results = await asyncio.gather(*(checked(c) for c in conns))
    alive = sum(results)
    return {
        "alive": alive,
        "dead": len(results) - alive,
        "errors": errors,
        "seconds": round(time.monotonic() - began, 3),
    }


async def idle(args: argparse.Namespace) -> None:
    conns: list[Conn] = []
    errors: dict[str, int] = {}
    gate = asyncio.Semaphore(args.concurrency)
    started = time.monotonic()
    # Seconds since the start at which each further tenth of the streams was open.
    step = max(1, args.count // 10)
    progress: list[float] = []

    async def one() -> None:
        async with gate:
            try:
                conn = await asyncio.wait_for(socks_open(args, args.port), 60)
                try:
                    await _echo(conn, b"o", 60)
                except BaseException:
                    conn[1].transport.abort()
                    raise
                conns.append(conn)
                if len(conns) % step == 0:
                    progress.append(round(time.monotonic() - started, 3))
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
                _count(errors, exc)

    await asyncio.gather(*(one() for _ in range(args.count)))
    _emit(
        {
            "opened": len(conns),
            "failed": args.count - len(conns),
            "errors": errors,
            "seconds": round(time.monotonic() - started, 3),
            "progress_step": step,
            "progress": progress,
        }
    )
    loop = asyncio.get_running_loop()
    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if line != "check":
            break
        _emit(await check_all(conns))
    for _, writer in conns:
        writer.close()
    await asyncio.sleep(0.5)


# ------------------------------------------------------------------------------- rate


def _percentiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {}
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "n": len(ordered),
        "p50": statistics.median(ordered),
        "p90": pick(0.90),
        "p99": pick(0.99),
        "max": ordered[-1],
    }


async def rate(args: argparse.Namespace) -> None:
    errors: dict[str, int] = {}
    latencies: list[float] = []
    began = time.monotonic()
    end = began + args.seconds

    async def loop() -> None:
        while time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                conn = await asyncio.wait_for(socks_open(args, args.port), 30)
                try:
                    await _echo(conn, b"r", 30)
                finally:
                    conn[1].close()
                latencies.append(time.perf_counter() - t0)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
                _count(errors, exc)
                await asyncio.sleep(0.01)

    await asyncio.gather(*(loop() for _ in range(args.parallel)))
    seconds = time.monotonic() - began
    _emit(
        {
            "ok": len(latencies),
            "failed": sum(errors.values()),
            "errors": errors,
            "seconds": round(seconds, 3),
            "per_second": len(latencies) / seconds,
            "latency": _percentiles(latencies),
        }
    )


# ------------------------------------------------------------------------------- probe


def probe(args: argparse.Namespace) -> None:
    sock = socks_connect(args, args.port)
    sock.settimeout(30)
    _emit({"event": "ready"})
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] != "run":
            break
        count, interval, max_seconds = int(words[1]), float(words[2]), float(words[3])
        samples: list[float] = []
        error = None
        deadline = time.monotonic() + max_seconds
        try:
            while len(samples) < count and time.monotonic() < deadline:
                t0 = time.perf_counter()
                sock.sendall(b"p")
                if sock.recv(1) != b"p":
                    raise ConnectionError("bad echo")
                samples.append(time.perf_counter() - t0)
                time.sleep(interval)
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
        _emit({"samples": samples, "error": error})
    sock.close()


# ------------------------------------------------------------------------------- drain / bulk


def drain(args: argparse.Namespace) -> None:
    sock = socks_connect(args, args.port)
    sock.settimeout(30)
    sock.sendall(f"DOWN {1 << 40}\n".encode())
    buf = bytearray(1 << 20)
    got = 0
    error = None
    started = time.perf_counter()
    end = started + args.seconds
    try:
        while time.perf_counter() < end:
            n = sock.recv_into(buf)
            if n == 0:
                error = "EOF before the end"
                break
            got += n
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - started
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    _emit({"bytes": got, "seconds": seconds, "mb_per_s": got / seconds / 1e6, "error": error})


def bulk(args: argparse.Namespace) -> None:
    expect = expected_digest(args.size)
    result: dict[str, Any] = {"bytes": 0, "seconds": 0.0, "ok": False, "error": None}
    try:
        sock = socks_connect(args, args.port)
        sock.settimeout(120)
        with sock:
            started = time.perf_counter()
            if args.mode == "down":
                sock.sendall(f"DOWN {args.size}\n".encode())
                got, digest = recv_hash(sock)
            else:
                sock.sendall(f"UP {args.size}\n".encode())
                send_pattern(sock, args.size)
                answer = b""
                while not answer.endswith(b"\n"):
                    chunk = sock.recv(256)
                    if not chunk:
                        break
                    answer += chunk
                parts = answer.decode().split()
                got = int(parts[1]) if len(parts) == 3 else -1
                digest = parts[2] if len(parts) == 3 else ""
            result["seconds"] = time.perf_counter() - started
        result["bytes"] = got
        result["ok"] = got == args.size and digest == expect
    except OSError as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    _emit(result)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("idle", "rate", "probe", "drain", "down", "up"))
    parser.add_argument("--socks-port", type=int, required=True)
    parser.add_argument("--auth", required=True, help="USER:PASSWORD")
    parser.add_argument("--host", required=True, help="destination IPv4 address")
    parser.add_argument("--port", type=int, required=True, help="destination port")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--size", type=int, default=200 << 20)
    args = parser.parse_args()
    args.auth = tuple(args.auth.split(":", 1))
    _raise_nofile()
    if args.mode == "idle":
        run_async(idle(args))
    elif args.mode == "rate":
        run_async(rate(args))
    elif args.mode == "probe":
        probe(args)
    elif args.mode == "drain":
        drain(args)
    else:
        bulk(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
