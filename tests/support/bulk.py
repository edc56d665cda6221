"""Bulk transfer both ways at once, run inside lab namespaces (`python bulk.py ...`).

  server HOST PORT --size N --seed S
      For each connection: send N pseudo-random bytes (seed S) while reading everything the
      client sends; at the client's EOF print {"received": n, "sha256": hex}.
  client HOST PORT --size N --seed S [--socks URL] [--progress BYTES]
      Send N pseudo-random bytes (seed S), then half-close, while reading the server's bytes
      until EOF. Prints {"event": "progress", "received": n} every --progress bytes and at
      the end {"received": n, "sha256": hex, "sent": n, "error": null|text}.
Data is `random.Random(seed).randbytes(size)`, so a test can compute the digests itself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import socket
import socketserver
import sys
import threading
from typing import Any

CHUNK = 1 << 16


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def _send_all(sock: socket.socket, data: bytes, result: dict[str, Any]) -> None:
    view = memoryview(data)
    try:
        for start in range(0, len(view), CHUNK):
            sock.sendall(view[start : start + CHUNK])
            result["sent"] = start + len(view[start : start + CHUNK])
        sock.shutdown(socket.SHUT_WR)
    except OSError as exc:
        result["send_error"] = f"{type(exc).__name__}: {exc}"


def _receive(sock: socket.socket, progress: int = 0) -> tuple[int, str]:
    digest = hashlib.sha256()
    received = 0
    next_mark = progress
    while True:
        data = sock.recv(1 << 18)
        if not data:
            return received, digest.hexdigest()
        digest.update(data)
        received += len(data)
        if progress and received >= next_mark:
            _emit({"event": "progress", "received": received})
            next_mark += progress


def serve(host: str, port: int, size: int, seed: int) -> int:
    data = payload(size, seed)

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock: socket.socket = self.request
            result: dict[str, Any] = {"sent": 0}
            sender = threading.Thread(target=_send_all, args=(sock, data, result), daemon=True)
            sender.start()
            try:
                received, sha = _receive(sock)
            except OSError as exc:
                _emit({"error": f"{type(exc).__name__}: {exc}"})
                return
            sender.join()
            _emit({"received": received, "sha256": sha, **result})

    class Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True

    with Server((host, port), Handler) as server:
        _emit({"event": "listening", "port": server.server_address[1]})
        server.serve_forever()
    return 0


def client(args: argparse.Namespace) -> int:
    data = payload(args.size, args.seed)
    if args.socks:
        from python_socks.sync import Proxy

        sock = Proxy.from_url(args.socks).connect(args.host, args.port, timeout=30)
    else:
        sock = socket.create_connection((args.host, args.port), timeout=30)
    sock.settimeout(None)
    if args.rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, args.rcvbuf)
    result: dict[str, Any] = {"sent": 0, "error": None}
    sender = threading.Thread(target=_send_all, args=(sock, data, result), daemon=True)
    sender.start()
    try:
        received, sha = _receive(sock, args.progress)
        result.update(received=received, sha256=sha)
    except OSError as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    sender.join(timeout=60)
    if "send_error" in result:
        result["error"] = result["error"] or result["send_error"]
    _emit(result)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    for name in ("server", "client"):
        p = sub.add_parser(name)
        p.add_argument("host")
        p.add_argument("port", type=int)
        p.add_argument("--size", type=int, required=True)
        p.add_argument("--seed", type=int, required=True)
        if name == "client":
            p.add_argument("--socks", default="")
            p.add_argument("--progress", type=int, default=0)
            p.add_argument("--rcvbuf", type=int, default=0)
    args = parser.parse_args(argv)
    if args.mode == "server":
        return serve(args.host, args.port, args.size, args.seed)
    return client(args)


if __name__ == "__main__":
    sys.exit(main())
