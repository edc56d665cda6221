"""The worker's HTTP CONNECT listener and static forwards, through the real chain (OpenSSH sshd
as the login node, relay-exit in this process), with curl and plain sockets as clients."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.config.loading import load_worker_config
from relay.config.values import ForwardTarget, HostPort
from relay.errors import ConfigError
from relay.exit.daemon import RelayExit
from relay.proto import socks5 as s5
from relay.worker.daemon import RelayWorker
from relay.worker.listeners import http_status
from relay.worker.settings import WorkerSettings
from tests.support.helpers import (
    PASSWORD,
    USER,
    Servers,
    answer_after_eof_handler,
    echo_handler,
    exit_settings,
    http_handler,
    metric,
    wait_for,
    worker_settings,
)
from tests.support.sshd import Sshd

PAYLOAD = os.urandom(300 * 1024)


@dataclass
class Listening:
    exit: RelayExit
    worker: RelayWorker
    servers: Servers
    http_port: int  # the destination web server
    echo_port: int
    proxy_port: int  # the worker's HTTP CONNECT listener
    forward_port: int  # static forward to the echo server
    refused_forward_port: int  # static forward to a closed port


async def _closed_port() -> int:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    server.close()
    await server.wait_closed()
    return port


@pytest.fixture
async def listening(sshd: Sshd) -> AsyncIterator[Listening]:
    servers = Servers()
    http_port = await servers.start(http_handler(PAYLOAD))
    echo_port = await servers.start(echo_handler)
    closed = await _closed_port()
    relay_exit = RelayExit(exit_settings())
    await relay_exit.start()
    settings: WorkerSettings = worker_settings(
        sshd,
        relay_exit.address,
        http=HostPort("127.0.0.1", 0),
        forward=(
            ForwardTarget(HostPort("127.0.0.1", 0), HostPort("127.0.0.1", echo_port)),
            ForwardTarget(HostPort("127.0.0.1", 0), HostPort("127.0.0.1", closed)),
        ),
    )
    worker = RelayWorker(settings)
    await worker.start()
    proxy = worker.listeners.http_address
    assert proxy is not None
    forwards = worker.listeners.forward_addresses
    try:
        yield Listening(
            relay_exit, worker, servers, http_port, echo_port, proxy[1], forwards[0][1],
            forwards[1][1],
        )  # fmt: skip
    finally:
        await worker.stop()
        await relay_exit.stop()
        await servers.close()


async def _curl(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "30", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


async def _raw(port: int, data: bytes) -> bytes:
    """Send ``data`` to a local listener and return everything answered until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def test_curl_through_the_http_connect_listener(listening: Listening, tmp_path: Path):
    out = tmp_path / "payload"
    rc, _, err = await _curl(
        "--fail", "--proxytunnel", "--proxy", f"http://127.0.0.1:{listening.proxy_port}",
        "--proxy-user", f"{USER}:{PASSWORD}",
        "-o", str(out), f"http://127.0.0.1:{listening.http_port}/file",
    )  # fmt: skip
    assert rc == 0, err
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(PAYLOAD).digest()
    # carried by the tunnel: the exit saw the stream and its bytes
    assert await wait_for(
        lambda: metric(listening.exit.metrics, "relay_streams_total", result="ok")
    )
    assert metric(listening.exit.metrics, "relay_bytes_total", direction="down") >= len(PAYLOAD)


async def test_wrong_or_missing_proxy_credentials_get_407(listening: Listening):
    rc, code, _ = await _curl(
        "--proxytunnel", "--proxy", f"http://127.0.0.1:{listening.proxy_port}",
        "--proxy-user", f"{USER}:wrong", "-o", "/dev/null", "-w", "%{http_connect}",
        f"http://127.0.0.1:{listening.http_port}/file",
    )  # fmt: skip
    assert rc != 0 and code == "407"
    target = f"127.0.0.1:{listening.echo_port}"
    head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
    for auth in (
        "",
        f"Proxy-Authorization: {_basic('nobody', PASSWORD)}\r\n",
        "Proxy-Authorization: Basic %%%\r\n",
    ):
        answer = await _raw(listening.proxy_port, (head + auth + "\r\n").encode())
        assert answer.startswith(b"HTTP/1.1 407 "), answer
        assert b'\r\nProxy-Authenticate: Basic realm="hpc-relay"\r\n' in answer
    worker_metrics = listening.worker.metrics
    assert metric(worker_metrics, "relay_auth_failures_total", reason="local-bad-credentials") == 3
    assert metric(worker_metrics, "relay_auth_failures_total", reason="local-no-credentials") == 1
    assert metric(listening.exit.metrics, "relay_carriers_active") == 0


async def test_raw_connect_relays_both_ways_with_early_bytes_and_half_close(listening: Listening):
    port = await listening.servers.start(answer_after_eof_handler)
    target = f"127.0.0.1:{port}"
    reader, writer = await asyncio.open_connection("127.0.0.1", listening.proxy_port)
    auth = _basic(USER, PASSWORD)
    # the first tunnel bytes come in the same flight as the request head
    writer.write(f"CONNECT {target} HTTP/1.0\r\nProxy-Authorization: {auth}\r\n\r\n".encode())
    writer.write(b"early ")
    writer.write(b"bytes")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
    assert head == b"HTTP/1.1 200 Connection established\r\n\r\n"
    writer.write_eof()
    answer = await asyncio.wait_for(reader.read(), 15)
    assert answer == b"sha256=" + hashlib.sha256(b"early bytes").hexdigest().encode() + b"\n"
    writer.close()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"405"),
        (
            b"CONNECT nonsense HTTP/1.1\r\n"
            b"Proxy-Authorization: Basic Z2xpZGVpbjpsb2NhbC1wYXNz\r\n\r\n",
            b"400",
        ),
        (b"\x05\x01\x00garbage\r\n\r\n", b"400"),
        (b"CONNECT a:1 HTTP/3.0\r\n\r\n", b"505"),
    ],
)
async def test_bad_requests(listening: Listening, request_bytes: bytes, status: bytes):
    answer = await _raw(listening.proxy_port, request_bytes)
    assert answer.startswith(b"HTTP/1.1 " + status + b" "), answer
    assert metric(listening.worker.metrics, "relay_protocol_errors_total", stage="local-http") == 1


async def test_failed_connects_map_to_http_statuses(listening: Listening):
    listening.worker.settings.no_optimistic = True  # refusals as statuses, not resets
    auth = f"Proxy-Authorization: {_basic(USER, PASSWORD)}\r\n\r\n"
    # the exit's policy allows loopback only: 403
    answer = await _raw(listening.proxy_port, ("CONNECT 192.0.2.1:80 HTTP/1.1\r\n" + auth).encode())
    assert answer.startswith(b"HTTP/1.1 403 "), answer
    # nothing listens there: the exit's connect is refused, 502
    closed = await _closed_port()
    answer = await _raw(
        listening.proxy_port, f"CONNECT 127.0.0.1:{closed} HTTP/1.1\r\n{auth}".encode()
    )
    assert answer.startswith(b"HTTP/1.1 502 "), answer
    assert [http_status(code) for code in range(1, 9)] == [502, 403, 502, 502, 502, 504, 502, 502]
    assert http_status(s5.CONNECTION_REFUSED) == 502


async def test_optimistic_connect_answers_200_then_resets_a_refused_stream(
    listening: Listening,
):
    auth = f"Proxy-Authorization: {_basic(USER, PASSWORD)}\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", listening.proxy_port)
    writer.write(("CONNECT 192.0.2.1:80 HTTP/1.1\r\n" + auth).encode())
    assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 200 ")
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(), 15)
    writer.close()
    assert await wait_for(
        lambda: metric(listening.worker.metrics, "relay_streams_total", result="refused") == 1
    )
    assert metric(listening.exit.metrics, "relay_policy_denials_total", reason="no_rule") == 1


async def test_static_forward_carries_a_plain_client(listening: Listening):
    reader, writer = await asyncio.open_connection("127.0.0.1", listening.forward_port)
    writer.write(b"through the forward\n")
    await writer.drain()
    assert await asyncio.wait_for(reader.readline(), 15) == b"through the forward\n"
    writer.write_eof()  # the echo server half-closes back: end to end
    assert await asyncio.wait_for(reader.read(), 15) == b""
    writer.close()
    assert await wait_for(
        lambda: metric(listening.exit.metrics, "relay_streams_total", result="ok")
    )


async def test_static_forward_to_a_refused_destination_resets_the_client(listening: Listening):
    reader, writer = await asyncio.open_connection("127.0.0.1", listening.refused_forward_port)
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(), 15)
    writer.close()
    assert await wait_for(
        lambda: metric(listening.worker.metrics, "relay_streams_total", result="refused") == 1
    )


async def test_stop_closes_the_extra_listeners(sshd: Sshd):
    relay_exit = RelayExit(exit_settings())
    await relay_exit.start()
    worker = RelayWorker(
        worker_settings(
            sshd, relay_exit.address, http=HostPort("127.0.0.1", 0),
            forward=(ForwardTarget(HostPort("127.0.0.1", 0), HostPort("127.0.0.1", 9)),),
        )
    )  # fmt: skip
    await worker.start()
    ports = [worker.listeners.http_address[1]] + [a[1] for a in worker.listeners.forward_addresses]  # type: ignore[index]
    await worker.stop()
    await relay_exit.stop()
    for port in ports:
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)


def test_config_http_and_forward(tmp_path: Path) -> None:
    auth = tmp_path / "socks.auth"
    auth.write_text("u:p\n")
    auth.chmod(0o600)
    base = ["--upstream", "socks5://127.0.0.1:1080", "--socks-auth", str(auth)]
    cfg = load_worker_config(
        [*base, "--http", "127.0.0.1:0", "--forward", "127.0.0.1:9618=collector.example.org:9618",
         "--forward", "[::1]:8443=[2001:db8::1]:443"]
    )  # fmt: skip
    assert cfg["http"] == ("127.0.0.1", 0)
    assert [str(f) for f in cfg["forward"]] == [
        "127.0.0.1:9618=collector.example.org:9618",
        "[::1]:8443=[2001:db8::1]:443",
    ]
    settings = WorkerSettings.from_values(cfg)
    assert settings.forward[0] == (("127.0.0.1", 9618), ("collector.example.org", 9618))
    assert settings.http == ("127.0.0.1", 0)
    config = tmp_path / "worker.toml"
    config.write_text('[worker]\nforward = ["0.0.0.0:9618=collector.example.org:9618"]\n')
    with pytest.raises(ConfigError) as info:
        load_worker_config([*base, "--config", str(config)])
    assert "forward in" in str(info.value) and "loopback" in str(info.value)
    for bad in ("127.0.0.1:1", "127.0.0.1:1=a", "127.0.0.1:1=a:2=b:3", "127.0.0.1:0=a:1"):
        with pytest.raises(ConfigError, match="--forward"):
            load_worker_config([*base, "--forward", bad])
