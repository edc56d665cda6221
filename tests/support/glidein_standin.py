"""A stand-in for a glidein in a batch job, and the server it stages its output out to.

Standalone (stdlib only) so the site's own python3 runs it as the job's user. As a glidein it
holds a connection to the pool's collector and one to a shadow (line echo servers outside the
site), stays silent on both for several firewall timeouts, writes its output and stages it out,
sending a last update on both connections; SIGTERM (scancel, the time limit) cuts the silence
short and leads to the same last update and stage-out, then exit status --term-status. It knows
no proxy: its plain sockets reach the outside only through the wrapper's interposer.

    glidein_standin.py run --report-dir D --collector H:P --shadow H:P --stage-out H:P
                           [--idle S] [--output-bytes N] [--term-status N]
    glidein_standin.py serve --listen H:P --dir D

The report goes to D/<SLURM_JOB_ID>.json (the job's scratch directory is gone afterwards); a
stage-out server stores each upload as D/<name> and answers with the sha256 of what it got.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from pathlib import Path
from typing import Any

CONDOR_ENV = ("TardisDroneUuid", "_CONDOR_TardisDroneUuid", "_CONDOR_STARTD_EXPRS",
              "GLIDEIN_WRAPPER_CONDOR_CONFIG", "LD_PRELOAD", "SLURM_JOB_ID")  # fmt: skip

terminated = threading.Event()


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


class Line:
    """One long-lived line-echo connection, as a daemon's TCP connection to the pool."""

    def __init__(self, address: str, name: str) -> None:
        self.name = name
        self.sock = socket.create_connection(_hostport(address), timeout=60)
        self.file = self.sock.makefile("rb")

    def exchange(self, text: str) -> bool:
        line = f"{self.name} {text}\n".encode()
        self.sock.sendall(line)
        got = b""
        while len(got) < len(line):
            chunk = self.file.readline()
            if not chunk:
                return False
            got += chunk
        return got == line


def stage_out(address: str, path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    with socket.create_connection(_hostport(address), timeout=120) as sock:
        sock.sendall(f"{path.name} {len(data)}\n".encode() + data)
        sock.shutdown(socket.SHUT_WR)
        reply = sock.makefile("rb").readline().decode().strip()
    local = hashlib.sha256(data).hexdigest()
    return {"name": path.name, "bytes": len(data), "sha256": local, "ok": reply == local}


def run(opts: argparse.Namespace) -> int:
    job = os.environ.get("SLURM_JOB_ID", str(os.getpid()))
    report: dict[str, Any] = {
        "job": job,
        "hostname": socket.gethostname(),
        "uid": os.getuid(),
        "cwd": os.getcwd(),
        "env": {name: os.environ.get(name) for name in CONDOR_ENV},
        "signal": None,
    }
    config = os.environ.get("GLIDEIN_WRAPPER_CONDOR_CONFIG")
    if config and Path(config).exists():
        report["condor_config"] = Path(config).read_text()
    out = Path(opts.report_dir) / f"{job}.json"

    def on_term(signum: int, frame: Any) -> None:
        report["signal"] = signal.Signals(signum).name
        terminated.set()

    signal.signal(signal.SIGTERM, on_term)
    status = 1
    try:
        lines = [Line(opts.collector, "collector"), Line(opts.shadow, "shadow")]
        report["first"] = {line.name: line.exchange("hello") for line in lines}
        _write(out, report)  # "connected": a test may signal the job from here on
        terminated.wait(opts.idle)
        report["idled"] = not terminated.is_set()
        output = Path(f"output-{job}.bin")
        output.write_bytes(os.urandom(opts.output_bytes))
        report["stage_out"] = stage_out(opts.stage_out, output)
        report["last"] = {line.name: line.exchange("bye") for line in lines}
        status = opts.term_status if terminated.is_set() else 0
    except OSError as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
    report["status"] = status
    _write(out, report)
    return status


def _write(path: Path, report: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(path)


class _Store(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        name, size = self.rfile.readline().decode().split()
        directory: Path = self.server.directory  # type: ignore[attr-defined]
        digest = hashlib.sha256()
        with (directory / Path(name).name).open("wb") as fh:
            left = int(size)
            while left:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                fh.write(chunk)
                digest.update(chunk)
                left -= len(chunk)
        self.wfile.write(digest.hexdigest().encode() + b"\n")


def serve(opts: argparse.Namespace) -> int:
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    server = socketserver.ThreadingTCPServer(_hostport(opts.listen), _Store)
    server.daemon_threads = True
    server.directory = Path(opts.dir)  # type: ignore[attr-defined]
    server.serve_forever()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("run")
    r.add_argument("--report-dir", required=True)
    r.add_argument("--collector", required=True)
    r.add_argument("--shadow", required=True)
    r.add_argument("--stage-out", required=True)
    r.add_argument("--idle", type=float, default=10.0)
    r.add_argument("--output-bytes", type=int, default=1 << 20)
    r.add_argument("--term-status", type=int, default=0)
    s = sub.add_parser("serve")
    s.add_argument("--listen", required=True)
    s.add_argument("--dir", required=True)
    opts = parser.parse_args()
    started = time.monotonic()
    status = run(opts) if opts.mode == "run" else serve(opts)
    print(f"{opts.mode} done after {time.monotonic() - started:.1f} s: {status}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
