"""The application end of every chain: plain blocking sockets, as an unmodified glidein has.

Run bare for ``direct``, or under ``proxychains4 -f CONF`` for the proxied chains (the
interposer turns each connect() into the chain's SOCKS handshakes, as in production).
Prints one JSON object on stdout.

    python -m bench.client up   --port P --size N --expect SHA256
    python -m bench.client down --port P --size N --expect SHA256
    python -m bench.client latency --port Q --count N
    python -m bench.client rate --port Q --start-at EPOCH --seconds T
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time

from bench.common import recv_hash, send_pattern


def _connect(host: str, port: int) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def bulk_up(host: str, port: int, size: int, expect: str) -> dict[str, object]:
    sock = _connect(host, port)
    with sock:
        started = time.perf_counter()
        sock.sendall(f"UP {size}\n".encode())
        send_pattern(sock, size)
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = sock.recv(256)
            if not chunk:
                break
            answer += chunk
        elapsed = time.perf_counter() - started
    parts = answer.decode().split()
    got = int(parts[1]) if len(parts) == 3 else -1
    digest = parts[2] if len(parts) == 3 else ""
    return {"bytes": got, "seconds": elapsed, "ok": got == size and digest == expect}


def bulk_down(host: str, port: int, size: int, expect: str) -> dict[str, object]:
    sock = _connect(host, port)
    with sock:
        started = time.perf_counter()
        sock.sendall(f"DOWN {size}\n".encode())
        got, digest = recv_hash(sock)
        elapsed = time.perf_counter() - started
    return {"bytes": got, "seconds": elapsed, "ok": got == size and digest == expect}


def latency(host: str, port: int, count: int) -> dict[str, object]:
    """connect (through the chain) + 1-byte echo, ``count`` times, one after the other."""
    samples: list[float] = []
    errors = 0
    for _ in range(count):
        started = time.perf_counter()
        try:
            sock = socket.create_connection((host, port), timeout=10)
            with sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.sendall(b"x")
                if sock.recv(1) != b"x":
                    raise ConnectionError("bad echo")
                samples.append(time.perf_counter() - started)
        except OSError:
            errors += 1
    return {"samples": samples, "errors": errors}


def rate(host: str, port: int, start_at: float, seconds: float) -> dict[str, object]:
    """Open + 1-byte echo + close, back to back, from start_at for ``seconds``."""
    time.sleep(max(0.0, start_at - time.time()))
    began = time.time()
    end = start_at + seconds
    ok = errors = 0
    while time.time() < end:
        try:
            sock = socket.create_connection((host, port), timeout=10)
            with sock:
                sock.sendall(b"x")
                if sock.recv(1) != b"x":
                    raise ConnectionError("bad echo")
            ok += 1
        except OSError:
            errors += 1
    return {"ok": ok, "errors": errors, "seconds": time.time() - began}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("up", "down", "latency", "rate"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--size", type=int, default=0)
    parser.add_argument("--expect", default="")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--start-at", type=float, default=0.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    if args.mode == "up":
        result = bulk_up(args.host, args.port, args.size, args.expect)
    elif args.mode == "down":
        result = bulk_down(args.host, args.port, args.size, args.expect)
    elif args.mode == "latency":
        result = latency(args.host, args.port, args.count)
    else:
        result = rate(args.host, args.port, args.start_at, args.seconds)
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
