"""Plain TCP tools to run inside lab namespaces (as `ip netns exec NS python nsclient.py ...`).

A subprocess per namespace is the only way to put a socket in another namespace on every Python
>= 3.9, so this is a standalone script (stdlib only, no imports from the test package).

Modes (each result is one JSON line on stdout, exit status 0 unless the arguments are wrong):

  echo-server HOST PORT
      Threaded echo server: sends every received chunk back. Runs until terminated.
  connect HOST PORT [--timeout S]
      One TCP connect: {"connected": bool, "error": str|null, "elapsed": s}
  client HOST PORT [--idle S] [--heartbeat S] [--timeout S] [--connect-timeout S]
                   [--keepalive S] [--wait-stdin]
      Connect, send a line and read its echo; then stay idle for --idle seconds (sending a
      small message every --heartbeat seconds and reading its echo, if given; or, with
      --wait-stdin, print {"event": "first", ...} and wait for a line on stdin instead);
      then send another line and wait at most --timeout seconds for its echo. Prints
      {"connected", "first", "heartbeats_sent", "heartbeats_ok", "after_idle", "error",
       "elapsed"}; e.g. {"first": true, "after_idle": false, "error": "timeout"}.
      --socks URL (socks5://USER:PASS@HOST:PORT) connects through a SOCKS5 proxy with
      python-socks instead of directly. --until-closed replaces the last exchange: wait at
      most --timeout seconds for the peer to end the connection and report how
      ("closed": "eof" | "reset" | "open", "closed_after": seconds).
  many HOST PORT --streams N --socks URL [--timeout S]
      Open N streams through the SOCKS5 proxy, one line echoed on each; print
      {"event": "open", "open": n}; wait for a line on stdin (the test looks at the network
      meanwhile); then echo one more line on every stream and print {"ok": n, "errors": [..]}.
"""

from __future__ import annotations

import argparse
import json
import socket
import socketserver
import sys
import time
from typing import Any


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                sock.sendall(data)
        except OSError:
            return


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def echo_server(host: str, port: int) -> int:
    if ":" in host:
        _Server.address_family = socket.AF_INET6
    with _Server((host, port), _Echo) as srv:
        _emit({"event": "listening", "host": host, "port": srv.server_address[1]})
        srv.serve_forever()
    return 0


def connect(host: str, port: int, timeout: float) -> int:
    start = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
        _emit({"connected": True, "error": None, "elapsed": time.monotonic() - start})
    except socket.timeout:
        _emit({"connected": False, "error": "timeout", "elapsed": time.monotonic() - start})
    except OSError as exc:
        err = f"{type(exc).__name__}: {exc.strerror or exc}"
        _emit({"connected": False, "error": err, "elapsed": time.monotonic() - start})
    return 0


class _Lines:
    """Line reader with a per-call deadline (echoes may arrive split or merged)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def read_line(self, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("timeout")
            self.sock.settimeout(left)
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("connection closed by peer")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return line


def _set_keepalive(sock: socket.socket, interval: float) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    secs = max(1, int(interval))
    for name, value in (("TCP_KEEPIDLE", secs), ("TCP_KEEPINTVL", secs), ("TCP_KEEPCNT", 5)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def client(args: argparse.Namespace) -> int:
    start = time.monotonic()
    result: dict[str, Any] = {
        "connected": False,
        "first": False,
        "heartbeats_sent": 0,
        "heartbeats_ok": 0,
        "after_idle": False,
        "error": None,
    }

    def exchange(lines: _Lines, sock: socket.socket, payload: bytes, timeout: float) -> bool:
        sock.sendall(payload + b"\n")
        return lines.read_line(timeout) == payload

    step = "connect"
    try:
        if args.socks:
            from python_socks.sync import Proxy

            sock = Proxy.from_url(args.socks).connect(
                args.host, args.port, timeout=args.connect_timeout
            )
        else:
            sock = socket.create_connection((args.host, args.port), timeout=args.connect_timeout)
        with sock:
            result["connected"] = True
            if args.keepalive:
                _set_keepalive(sock, args.keepalive)
            lines = _Lines(sock)
            step = "first"
            result["first"] = exchange(lines, sock, b"first", args.timeout)
            if args.wait_stdin:
                _emit({"event": "first", "first": result["first"]})
                sys.stdin.readline()
            else:
                idle_end = time.monotonic() + args.idle
                step = "heartbeat"
                while args.heartbeat and time.monotonic() + args.heartbeat < idle_end:
                    time.sleep(args.heartbeat)
                    result["heartbeats_sent"] += 1
                    n = result["heartbeats_sent"]
                    if exchange(lines, sock, f"hb {n}".encode(), args.timeout):
                        result["heartbeats_ok"] += 1
                time.sleep(max(0.0, idle_end - time.monotonic()))
            if args.until_closed:
                step = "until_closed"
                result.update(_until_closed(sock, args.timeout))
            else:
                step = "after_idle"
                result["after_idle"] = exchange(lines, sock, b"after idle", args.timeout)
    except socket.timeout:
        result["error"] = "timeout" if step == "after_idle" else f"timeout during {step}"
    except OSError as exc:
        result["error"] = f"{type(exc).__name__} during {step}: {exc.strerror or exc}"
    result["elapsed"] = round(time.monotonic() - start, 3)
    _emit(result)
    return 0


def _until_closed(sock: socket.socket, timeout: float) -> dict[str, Any]:
    """Block until the peer ends the connection (or the timeout): how did it end?"""
    start = time.monotonic()
    sock.settimeout(timeout)
    how = "open"
    try:
        while sock.recv(65536):
            pass
        how = "eof"
    except socket.timeout:
        how = "open"
    except ConnectionResetError:
        how = "reset"
    except OSError as exc:
        how = f"{type(exc).__name__}"
    return {"closed": how, "closed_after": round(time.monotonic() - start, 3)}


def many(args: argparse.Namespace) -> int:
    from python_socks.sync import Proxy

    proxy = Proxy.from_url(args.socks)
    streams: list[tuple[socket.socket, _Lines]] = []
    errors: list[str] = []
    for i in range(args.streams):
        try:
            sock = proxy.connect(args.host, args.port, timeout=args.timeout)
            lines = _Lines(sock)
            sock.sendall(b"open %d\n" % i)
            if lines.read_line(args.timeout) != b"open %d" % i:
                raise ConnectionError("wrong echo")
            streams.append((sock, lines))
        except OSError as exc:
            errors.append(f"open {i}: {type(exc).__name__}: {exc}")
    _emit({"event": "open", "open": len(streams), "errors": errors[:5]})
    sys.stdin.readline()
    ok = 0
    for i, (sock, lines) in enumerate(streams):
        try:
            sock.sendall(b"again %d\n" % i)
            if lines.read_line(args.timeout) == b"again %d" % i:
                ok += 1
        except OSError as exc:
            errors.append(f"again {i}: {type(exc).__name__}: {exc}")
        sock.close()
    _emit({"ok": ok, "errors": errors[:5]})
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("echo-server")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p = sub.add_parser("connect")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--timeout", type=float, default=2.0)
    p = sub.add_parser("client")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--idle", type=float, default=0.0, help="seconds to stay idle")
    p.add_argument("--heartbeat", type=float, default=0.0, help="send every S s while idle")
    p.add_argument("--timeout", type=float, default=3.0, help="max wait for each echo")
    p.add_argument("--connect-timeout", type=float, default=3.0)
    p.add_argument("--keepalive", type=float, default=0.0, help="TCP keepalive interval")
    p.add_argument("--wait-stdin", action="store_true", help="idle until a line on stdin")
    p.add_argument("--socks", default="", help="socks5://USER:PASS@HOST:PORT to connect through")
    p.add_argument("--until-closed", action="store_true", help="wait for the peer to close")
    p = sub.add_parser("many")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--streams", type=int, default=100)
    p.add_argument("--socks", required=True)
    p.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    if args.mode == "many":
        return many(args)
    if args.mode == "echo-server":
        return echo_server(args.host, args.port)
    if args.mode == "connect":
        return connect(args.host, args.port, args.timeout)
    return client(args)


if __name__ == "__main__":
    sys.exit(main())
