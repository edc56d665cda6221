"""Test helpers: destinations (HTTP, echo, half-close, reset), the in-process relay chain
through a real OpenSSH sshd, and small readers for metrics."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest

from relay.config.values import HostPort, LoginTarget, parse_rule
from relay.exit.daemon import RelayExit
from relay.exit.settings import ExitSettings
from relay.metrics import Metrics
from relay.worker.daemon import RelayWorker
from relay.worker.settings import WorkerSettings
from tests.support.sshd import Sshd

__all__ = ["chain", "http_payload"]

KEY_ID = "worker-1"
SECRET = b"0123456789abcdef0123456789abcdef"
USER, PASSWORD = "glidein", "local-pass"
PAYLOAD_SIZE = 50 * 1024 * 1024


def metric(metrics: Metrics, name: str, **labels: str) -> float:
    """Current value of a sample (0 when it has not been created yet)."""
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@dataclass
class Servers:
    """Destination services on loopback; ``close()`` ends them all."""

    servers: list[asyncio.Server] = field(default_factory=list)
    writers: set[asyncio.StreamWriter] = field(default_factory=set)
    log: list[str] = field(default_factory=list)

    async def start(self, handler: Any, host: str = "127.0.0.1") -> int:
        async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.writers.add(writer)
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                self.writers.discard(writer)
                writer.close()

        server = await asyncio.start_server(tracked, host, 0)
        self.servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        for server in self.servers:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 2)


def http_handler(payload: bytes) -> Any:
    """A minimal HTTP/1.0 server that answers every GET with ``payload``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(payload)
        )
        view = memoryview(payload)
        for start in range(0, len(view), 1 << 20):
            writer.write(view[start : start + (1 << 20)])
            await writer.drain()
        writer.write_eof()
        await writer.drain()

    return handle


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo until EOF, then half-close our side too."""
    while data := await reader.read(1 << 18):
        writer.write(data)
        await writer.drain()
    writer.write_eof()
    await writer.drain()


async def answer_after_eof_handler(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Read everything until the client half-closes, then answer with its digest."""
    data = await reader.read()
    writer.write(b"sha256=" + hashlib.sha256(data).hexdigest().encode() + b"\n")
    await writer.drain()
    writer.write_eof()
    await writer.drain()


async def reset_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer one line, then reset the connection (SO_LINGER 0)."""
    await reader.readline()
    writer.write(b"bye\n")
    await writer.drain()
    await asyncio.sleep(0.2)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def server_half_closes_first(received: asyncio.Queue[bytes]) -> Any:
    """The server speaks and half-closes first, then still reads what the client answers."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello from server\n")
        await writer.drain()
        writer.write_eof()
        received.put_nowait(await reader.read())

    return handle


@dataclass
class Chain:
    """exit + worker in this process, with OpenSSH sshd as the login node."""

    exit: RelayExit
    worker: RelayWorker
    sshd: Sshd
    servers: Servers
    payload: bytes
    http_port: int
    echo_port: int

    @property
    def socks_port(self) -> int:
        return self.worker.address[1]

    @property
    def socks_url(self) -> str:
        return f"socks5://{USER}:{PASSWORD}@127.0.0.1:{self.socks_port}"

    async def open(self, host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A client connection through the chain, opened with python-socks."""
        from python_socks.async_.asyncio import Proxy

        sock = await Proxy.from_url(self.socks_url).connect(host, port, timeout=20)
        return await asyncio.open_connection(sock=sock)


WORKER_DERIVED = ("secret", "socks_credentials", "upstream_credentials", "exit_tls")
EXIT_DERIVED = ("secrets", "policy", "tls", "tls_fingerprint")
"""What the settings derive from files (secrets, TLS): tests may hand them over in memory."""


def _settings(cls: Any, derived: tuple[str, ...], options: dict[str, Any]) -> Any:
    """``cls`` from its options, then the derived values given in ``options`` set on it,
    as a reload sets them on a running exit."""
    given = {name: options.pop(name) for name in derived if name in options}
    settings = cls(**options)
    for name, value in given.items():
        setattr(settings, name, value)
    return settings


def worker_settings(
    sshd: Optional[Sshd], exit_address: tuple[str, int], **overrides: Any
) -> WorkerSettings:
    """Settings for a worker through ``sshd`` (None: carriers go straight to the exit)."""
    options: dict[str, Any] = {
        "socks": HostPort("127.0.0.1", 0),
        "login": (LoginTarget(sshd.user, sshd.host, sshd.port),) if sshd else (),
        "ssh_key": sshd.client_key if sshd else None,
        "known_hosts": sshd.known_hosts if sshd else None,
        "exit": (HostPort(*exit_address),),
        "key_id": KEY_ID,
        "heartbeat": 1.0,
        "connect_timeout": 10.0,
    }
    if "secret_file" not in overrides:
        options["secret"] = SECRET
    if "socks_auth" not in overrides and "no_socks_auth" not in overrides:
        options["socks_credentials"] = (USER, PASSWORD)
    options.update(overrides)
    settings: WorkerSettings = _settings(WorkerSettings, WORKER_DERIVED, options)
    return settings


def exit_settings(*rules: str, **overrides: Any) -> ExitSettings:
    options: dict[str, Any] = {
        "listen": HostPort("127.0.0.1", 0),
        "allow": tuple(parse_rule(r) for r in rules or ("127.0.0.1/32:*", "[::1]/128:*")),
        "heartbeat": 1.0,
        "tcp_keepalive": 5.0,
    }
    if "keys" not in overrides:
        options["secrets"] = {KEY_ID: SECRET}
    options.update(overrides)
    settings: ExitSettings = _settings(ExitSettings, EXIT_DERIVED, options)
    return settings


@pytest.fixture(scope="session")
def http_payload() -> bytes:
    return os.urandom(PAYLOAD_SIZE)


@pytest.fixture
async def chain(sshd: Sshd, http_payload: bytes) -> AsyncIterator[Chain]:
    servers = Servers()
    http_port = await servers.start(http_handler(http_payload))
    echo_port = await servers.start(echo_handler)
    relay_exit = RelayExit(exit_settings())
    await relay_exit.start()
    worker = RelayWorker(worker_settings(sshd, relay_exit.address))
    await worker.start()
    try:
        yield Chain(relay_exit, worker, sshd, servers, http_payload, http_port, echo_port)
    finally:
        await worker.stop()
        await relay_exit.stop()
        await servers.close()


async def socks_handshake_raw(
    port: int, greeting: bytes, *rest: bytes, read_timeout: float = 10
) -> bytes:
    """Send raw SOCKS5 bytes to ``port`` and return everything answered until close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(greeting + b"".join(rest))
        await writer.drain()
        return await asyncio.wait_for(reader.read(), read_timeout)
    finally:
        writer.close()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return bool(predicate())
