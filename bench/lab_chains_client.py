"""The application side of bench.lab_chains, run inside the lab's worker namespace.

Reaches the destination through zero or more SOCKS5 proxies chained by the client itself, the
way proxychains4 does it: a TCP connection to the first proxy, then for each proxy a SOCKS5
handshake and a CONNECT to the next proxy (or, for the last one, to the destination).

    python -m bench.lab_chains_client MODE --host H --port P [--hop HOST:PORT[:USER:PASS]]...

``--hop`` is repeatable (first = the one the client dials); no ``--hop`` = direct. A hop with
USER:PASS offers only user/password auth (RFC 1929), one without offers only "no auth".
The handshake goes one message at a time, as SOCKS client libraries do. Plain blocking
sockets with kernel-autotuned buffers, 1 MiB ``recv_into`` chunks and a hashing thread
(bench.common) keep the client off the critical path. One JSON line on stdout per run:

    down --size N   ask the sink (bench.sink) for N bytes, SHA-256 them, compare with the
                    expected digest of the pattern: {"bytes", "seconds", "ok", "digest",
                    "expected", "client_cpu", "error"}
    up --size N     send N bytes of the pattern; the sink answers with its count and SHA-256,
                    compared with the expected digest: same fields
    latency --count N [--interval S]
                    N times, one after the other: TCP connect to the first hop, every SOCKS5
                    step, one byte to the echo port and its echo back, close. Samples are the
                    seconds from before connect() to the echoed byte: {"samples", "errors"}
    rate --seconds T --parallel P
                    P threads, each in a loop for T seconds: open a stream as for latency,
                    echo one byte, close; the next at once. New streams per second over all
                    loops: {"ok", "errors", "seconds", "per_second", "p50_ms", "p90_ms",
                    "client_cpu"}

Exit status: 0 when every transfer was complete and its digest matched, 3 on a digest or
length mismatch, 1 on a connection error (the JSON line says which).
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import statistics
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

from bench.common import expected_digest, recv_hash, send_pattern

EXIT_MISMATCH = 3


@dataclass
class Hop:
    host: str
    port: int
    user: Optional[str] = None
    password: Optional[str] = None


def parse_hop(text: str) -> Hop:
    parts = text.split(":", 3)
    if len(parts) not in (2, 4):
        raise argparse.ArgumentTypeError(f"hop {text!r}: want HOST:PORT or HOST:PORT:USER:PASS")
    if len(parts) == 4:
        return Hop(parts[0], int(parts[1]), parts[2], parts[3])
    return Hop(parts[0], int(parts[1]))


def _exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("proxy closed the connection during the SOCKS5 handshake")
        buf += chunk
    return buf


def _socks5(sock: socket.socket, hop: Hop, host: str, port: int) -> None:
    """SOCKS5 handshake with ``hop`` (the far end of sock) and CONNECT host:port (IPv4)."""
    if hop.user is not None and hop.password is not None:
        sock.sendall(b"\x05\x01\x02")
        if _exactly(sock, 2) != b"\x05\x02":
            raise ConnectionError(f"{hop.host}:{hop.port}: no user/password method")
        user, password = hop.user.encode(), hop.password.encode()
        sock.sendall(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
        if _exactly(sock, 2)[1] != 0:
            raise ConnectionError(f"{hop.host}:{hop.port}: SOCKS5 auth refused")
    else:
        sock.sendall(b"\x05\x01\x00")
        if _exactly(sock, 2) != b"\x05\x00":
            raise ConnectionError(f"{hop.host}:{hop.port}: no 'no auth' method")
    sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(host) + struct.pack("!H", port))
    head = _exactly(sock, 4)
    if head[1] != 0:
        raise ConnectionError(f"{hop.host}:{hop.port}: CONNECT {host}:{port} refused ({head[1]})")
    if head[3] == 1:
        tail = 4
    elif head[3] == 4:
        tail = 16
    else:
        tail = _exactly(sock, 1)[0]
    _exactly(sock, tail + 2)


def open_chain(hops: list[Hop], host: str, port: int, timeout: float = 30) -> socket.socket:
    """A connected socket to host:port through the hops (direct when there are none)."""
    first = (hops[0].host, hops[0].port) if hops else (host, port)
    sock = socket.create_connection(first, timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i, hop in enumerate(hops):
            nxt = hops[i + 1] if i + 1 < len(hops) else None
            _socks5(sock, hop, nxt.host if nxt else host, nxt.port if nxt else port)
    except BaseException:
        sock.close()
        raise
    return sock


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def bulk(args: argparse.Namespace) -> int:
    expect = expected_digest(args.size)
    result: dict[str, Any] = {
        "mode": args.mode,
        "bytes": 0,
        "seconds": 0.0,
        "ok": False,
        "digest": "",
        "expected": expect,
        "client_cpu": 0.0,
        "error": None,
    }
    try:
        sock = open_chain(args.hop, args.host, args.port)
        with sock:
            sock.settimeout(args.timeout)
            cpu0 = _cpu()
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
                parts = answer.decode(errors="replace").split()
                if len(parts) != 3 or parts[0] != "OK":
                    raise ConnectionError(f"sink answered {answer[:200]!r}")
                got, digest = int(parts[1]), parts[2]
            result["seconds"] = time.perf_counter() - started
            result["client_cpu"] = _cpu() - cpu0
        result["bytes"] = got
        result["digest"] = digest
        result["ok"] = got == args.size and digest == expect
        if not result["ok"]:
            result["error"] = f"MISMATCH: {got} bytes, sha256 {digest}, expected {expect}"
    except (OSError, ValueError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(result), flush=True)
    if result["ok"]:
        return 0
    return EXIT_MISMATCH if result["digest"] else 1


def _one_echo(args: argparse.Namespace, byte: bytes) -> float:
    """Seconds to open a stream through the chain and get ``byte`` echoed on it."""
    t0 = time.perf_counter()
    with open_chain(args.hop, args.host, args.port, timeout=args.timeout) as sock:
        sock.sendall(byte)
        if _exactly(sock, 1) != byte:
            raise ConnectionError("wrong echo")
        return time.perf_counter() - t0


def _error_key(exc: OSError) -> str:
    return f"{type(exc).__name__}: {exc}"[:160]


def latency(args: argparse.Namespace) -> int:
    samples: list[float] = []
    errors: dict[str, int] = {}
    for i in range(args.count):
        if i:
            time.sleep(args.interval)
        try:
            samples.append(_one_echo(args, b"L"))
        except OSError as exc:
            key = _error_key(exc)
            errors[key] = errors.get(key, 0) + 1
    print(json.dumps({"mode": "latency", "samples": samples, "errors": errors}), flush=True)
    return 0 if samples and not errors else 1


def rate(args: argparse.Namespace) -> int:
    """Threads rather than processes: one interpreter's CPU is one figure to put next to the
    chain's, and blocking socket calls release the GIL while they wait on the chain."""
    samples: list[float] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()
    start = threading.Event()
    end = [0.0]

    def loop() -> None:
        start.wait()
        while time.perf_counter() < end[0]:
            try:
                took = _one_echo(args, b"R")
                with lock:
                    samples.append(took)
            except OSError as exc:
                key = _error_key(exc)
                with lock:
                    errors[key] = errors.get(key, 0) + 1
                time.sleep(0.01)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(args.parallel)]
    for t in threads:
        t.start()
    cpu0 = _cpu()
    began = time.perf_counter()
    end[0] = began + args.seconds
    start.set()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - began
    ordered = sorted(samples)
    result = {
        "mode": "rate",
        "ok": len(samples),
        "errors": errors,
        "seconds": seconds,
        "parallel": args.parallel,
        "per_second": len(samples) / seconds if seconds > 0 else 0.0,
        "p50_ms": statistics.median(ordered) * 1000 if ordered else None,
        "p90_ms": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))] * 1000
        if ordered
        else None,
        "client_cpu": _cpu() - cpu0,
    }
    print(json.dumps(result), flush=True)
    return 0 if samples else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("mode", choices=("down", "up", "latency", "rate"))
    parser.add_argument(
        "--hop",
        type=parse_hop,
        action="append",
        default=[],
        help="SOCKS5 proxy HOST:PORT[:USER:PASS], first = dialled (repeatable)",
    )
    parser.add_argument("--host", required=True, help="destination IPv4 address")
    parser.add_argument("--port", type=int, required=True, help="destination port")
    parser.add_argument("--size", type=int, default=200 << 20, help="bytes per transfer")
    parser.add_argument("--count", type=int, default=50, help="latency samples")
    parser.add_argument("--interval", type=float, default=0.02, help="pause between samples")
    parser.add_argument("--seconds", type=float, default=5.0, help="rate: how long")
    parser.add_argument("--parallel", type=int, default=8, help="rate: concurrent loops")
    parser.add_argument("--timeout", type=float, default=120.0, help="socket timeout, s")
    args = parser.parse_args()
    if args.mode == "latency":
        return latency(args)
    if args.mode == "rate":
        return rate(args)
    return bulk(args)


if __name__ == "__main__":
    sys.exit(main())
