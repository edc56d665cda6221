"""What TLS costs relay-exit, for docs/SECURITY.md (port 80 or 443): one relay-exit process
with and without --tls-cert, a worker in this process dialling it directly (no sshd).

    .venv/bin/python -m bench.tls_cost [--rounds 2] [--mib 512]

Prints one JSON line per run: stream set-up latency (p50/p95 over 50 streams), download
throughput and the exit's CPU seconds per GiB, exit RSS per idle stream (500 streams), and
the exit's CPU per TLS handshake (1000 handshakes of a plain ssl client). Loopback, so the
numbers are about the exit's own cost, not a network.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from python_socks.async_.asyncio import Proxy

from bench.common import free_port
from relay.net.tlslink import TlsClient, client_context
from relay.worker.daemon import RelayWorker
from tests.support.helpers import KEY_ID, PASSWORD, SECRET, USER, Servers, worker_settings
from tests.support.relays import wait_port, write_private
from tests.support.tlscerts import Pki, make_pki

BIN = Path(sys.executable).parent


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def start_exit(workdir: Path, pki: Pki, tls: bool) -> tuple[subprocess.Popen[bytes], int]:
    keys = write_private(workdir / "exit.keys", f"{KEY_ID} {SECRET.decode()}\n")
    port = free_port()
    args = [str(BIN / "relay-exit"), "--listen", f"127.0.0.1:{port}", "--keys", str(keys),
            "--allow", "127.0.0.1/32:*", "--log-level", "error"]  # fmt: skip
    if tls:
        args += ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key)]
    proc = subprocess.Popen(args)
    wait_port(port, proc)
    return proc, port


async def measure(workdir: Path, pki: Pki, tls: bool, mib: int) -> dict[str, Any]:
    proc, port = start_exit(workdir, pki, tls)
    chunk = os.urandom(1 << 20)

    async def bulk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        for _ in range(mib):
            writer.write(chunk)
            await writer.drain()
        writer.close()

    async def echo_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readline())
        await writer.drain()
        await reader.read()

    servers = Servers()
    bulk_port = await servers.start(bulk)
    echo_port = await servers.start(echo_once)
    exit_tls = TlsClient(client_context(pki.ca.cert)) if tls else None
    worker = RelayWorker(worker_settings(None, ("127.0.0.1", port), exit_tls=exit_tls))
    await worker.start()
    proxy = Proxy.from_url(f"socks5://{USER}:{PASSWORD}@127.0.0.1:{worker.address[1]}")
    try:
        setups = []
        for _ in range(50):
            started = time.monotonic()
            sock = await proxy.connect("127.0.0.1", echo_port, timeout=20)
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(b"x\n")
            await reader.readline()
            setups.append(time.monotonic() - started)
            writer.close()
        sock = await proxy.connect("127.0.0.1", bulk_port, timeout=20)
        reader, writer = await asyncio.open_connection(sock=sock)
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        writer.write(b"go\n")
        got = 0
        while data := await reader.read(1 << 20):
            got += len(data)
        elapsed, cpu = time.monotonic() - t0, cpu_seconds(proc.pid) - cpu0
        writer.close()
        await asyncio.sleep(0.5)
        before = rss_kib(proc.pid)
        held = [await proxy.connect("127.0.0.1", echo_port, timeout=20) for _ in range(500)]
        await asyncio.sleep(1.0)
        per_stream = (rss_kib(proc.pid) - before) / len(held)
        for sock in held:
            sock.close()
        ordered = sorted(setups)
        return {
            "tls": tls,
            "setup_p50_ms": round(statistics.median(ordered) * 1000, 2),
            "setup_p95_ms": round(ordered[int(len(ordered) * 0.95) - 1] * 1000, 2),
            "MiB_per_s": round(got / elapsed / 2**20),
            "exit_cpu_s_per_GiB": round(cpu / (got / 2**30), 2),
            "exit_rss_KiB_per_idle_stream": round(per_stream, 1),
        }
    finally:
        await worker.stop()
        await servers.close()
        proc.terminate()
        proc.wait(20)


def handshake_cost(workdir: Path, pki: Pki, count: int = 1000) -> dict[str, Any]:
    proc, port = start_exit(workdir, pki, tls=True)
    ctx = ssl.create_default_context(cafile=str(pki.ca.cert))
    try:
        cpu0 = cpu_seconds(proc.pid)
        for _ in range(count):
            with (
                socket.create_connection(("127.0.0.1", port)) as raw,
                ctx.wrap_socket(raw, server_hostname="exit.test"),
            ):
                pass
        cpu = cpu_seconds(proc.pid) - cpu0
        return {"tls_handshakes": count, "exit_cpu_ms_per_handshake": round(cpu / count * 1000, 2)}
    finally:
        proc.terminate()
        proc.wait(20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--mib", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        pki = make_pki(workdir / "pki")
        for _ in range(args.rounds):
            for tls in (False, True):
                print(json.dumps(asyncio.run(measure(workdir, pki, tls, args.mib))), flush=True)
        print(json.dumps(handshake_cost(workdir, pki)), flush=True)


if __name__ == "__main__":
    main()
