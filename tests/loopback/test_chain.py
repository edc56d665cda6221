"""The working chain on loopback: real OpenSSH sshd as the login node, curl and python-socks
as clients, relay-worker and relay-exit in between."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

import pytest
from python_socks import ProxyError
from python_socks.async_.asyncio import Proxy

from relay.config.values import HostPort
from relay.exit.daemon import RelayExit
from relay.net.muxpump import MuxPump
from relay.proto import hello as hl
from relay.proto import mux, seal
from relay.proto import socks5 as s5
from relay.proto.session import UNCONFIRMED_WINDOW
from relay.worker.daemon import RelayWorker
from tests.support.helpers import (
    KEY_ID,
    PASSWORD,
    SECRET,
    USER,
    Chain,
    answer_after_eof_handler,
    exit_settings,
    metric,
    reset_handler,
    server_half_closes_first,
    sha256,
    socks_handshake_raw,
    worker_settings,
)


async def test_curl_fetches_50mib_through_the_chain(chain: Chain, tmp_path):
    out = tmp_path / "file"
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--fail", "--max-time", "120",
        "--socks5-hostname", f"127.0.0.1:{chain.socks_port}",
        "--proxy-user", f"{USER}:{PASSWORD}",
        "-o", str(out), f"http://localhost:{chain.http_port}/payload",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert hashlib.sha256(out.read_bytes()).hexdigest() == sha256(chain.payload)
    # The exit counts a stream's bytes when the stream ends, a moment after curl is done.
    assert await _eventually(
        lambda: (
            metric(chain.exit.metrics, "relay_bytes_total", direction="down") >= len(chain.payload)
        )
    )
    assert metric(chain.worker.metrics, "relay_carriers_total", result="ok") >= 1
    assert metric(chain.worker.metrics, "relay_ssh_connections_active") == 1


async def test_python_socks_fetches_the_same_file(chain: Chain):
    reader, writer = await chain.open("127.0.0.1", chain.http_port)
    writer.write(b"GET /payload HTTP/1.0\r\nHost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200")
    body = await asyncio.wait_for(reader.read(), 120)
    writer.close()
    assert sha256(body) == sha256(chain.payload)


async def test_upload_then_half_close_gets_the_answer(chain: Chain):
    """Client -> destination half-close: the destination sees EOF and can still answer."""
    port = await chain.servers.start(answer_after_eof_handler)
    reader, writer = await chain.open("127.0.0.1", port)
    data = os.urandom(8 * 1024 * 1024 + 17)
    writer.write(data)
    await writer.drain()
    writer.write_eof()
    answer = await asyncio.wait_for(reader.read(), 60)
    assert answer == b"sha256=" + sha256(data).encode() + b"\n"
    writer.close()


async def test_destination_half_closes_first(chain: Chain):
    """Destination -> client half-close: the client sees EOF and can still send."""
    received: asyncio.Queue[bytes] = asyncio.Queue()
    port = await chain.servers.start(server_half_closes_first(received))
    reader, writer = await chain.open("127.0.0.1", port)
    assert await asyncio.wait_for(reader.read(), 10) == b"hello from server\n"
    writer.write(b"answer after your EOF\n")
    await writer.drain()
    writer.write_eof()
    assert await asyncio.wait_for(received.get(), 10) == b"answer after your EOF\n"
    writer.close()


async def test_idle_stream_keeps_heartbeating(chain: Chain):
    reader, writer = await chain.open("127.0.0.1", chain.echo_port)
    writer.write(b"one\n")
    assert await reader.readexactly(4) == b"one\n"
    before = metric(chain.worker.metrics, "relay_heartbeat_rtt_seconds_count")
    await asyncio.sleep(3.5)
    writer.write(b"two\n")
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"two\n"
    # heartbeat 1 s: the worker pinged (and got answers) about three times while idle
    assert metric(chain.worker.metrics, "relay_heartbeat_rtt_seconds_count") >= before + 2
    writer.close()


async def test_destination_reset_reaches_the_client_as_a_reset(chain: Chain):
    port = await chain.servers.start(reset_handler)
    reader, writer = await chain.open("127.0.0.1", port)
    writer.write(b"hi\n")
    assert await reader.readline() == b"bye\n"
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(100), 10)
    writer.close()
    assert await _eventually(
        lambda: metric(chain.exit.metrics, "relay_streams_total", result="peer-reset") >= 1
    )


async def test_client_reset_reaches_the_destination(chain: Chain):
    got: asyncio.Queue[BaseException | bytes] = asyncio.Queue()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"ready\n")
        await writer.drain()
        try:
            got.put_nowait(await reader.read())
        except ConnectionResetError as exc:
            got.put_nowait(exc)

    port = await chain.servers.start(handler)
    reader, writer = await chain.open("127.0.0.1", port)
    assert await reader.readline() == b"ready\n"
    import socket
    import struct

    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
    result = await asyncio.wait_for(got.get(), 10)
    assert isinstance(result, ConnectionResetError)


# -- refusals -------------------------------------------------------------------------------


async def test_local_client_without_credentials_is_refused(chain: Chain):
    answer = await socks_handshake_raw(chain.socks_port, b"\x05\x01\x00")
    assert answer == b"\x05\xff"
    assert metric(chain.worker.metrics, "relay_auth_failures_total",
                  reason="local-no-credentials") == 1  # fmt: skip


async def test_local_client_with_wrong_password_is_refused(chain: Chain):
    auth = s5.Socks5Client.userpass(USER, "wrong")
    answer = await socks_handshake_raw(chain.socks_port, b"\x05\x01\x02", auth)
    assert answer == b"\x05\x02\x01\x01"
    assert metric(chain.worker.metrics, "relay_auth_failures_total",
                  reason="local-bad-credentials") == 1  # fmt: skip


@pytest.mark.parametrize("command", [s5.CMD_BIND, s5.CMD_UDP_ASSOCIATE])
async def test_bind_and_udp_are_not_supported(chain: Chain, command: int):
    auth = s5.Socks5Client.userpass(USER, PASSWORD)
    request = s5.Socks5Client.request(command, "127.0.0.1", 9)
    answer = await socks_handshake_raw(chain.socks_port, b"\x05\x01\x02", auth, request)
    assert answer[:4] == b"\x05\x02\x01\x00"
    assert answer[4:6] == bytes((5, s5.COMMAND_NOT_SUPPORTED))


async def test_worker_with_wrong_secret_is_refused_by_the_exit(chain: Chain):
    wrong = RelayWorker(
        worker_settings(chain.sshd, chain.exit.address, secret=b"x" * 32, no_optimistic=True)
    )
    await wrong.start()
    try:
        proxy = Proxy.from_url(f"socks5://{USER}:{PASSWORD}@127.0.0.1:{wrong.address[1]}")
        with pytest.raises(ProxyError) as info:
            await proxy.connect("127.0.0.1", chain.echo_port, timeout=20)
        assert info.value.error_code == s5.GENERAL_FAILURE
    finally:
        await wrong.stop()
    assert metric(chain.exit.metrics, "relay_auth_failures_total", reason="bad-mac") == 1
    assert metric(wrong.metrics, "relay_carriers_total", result="refused") == 1


async def test_unknown_key_id_is_refused(chain: Chain):
    wrong = RelayWorker(
        worker_settings(chain.sshd, chain.exit.address, key_id="nobody", no_optimistic=True)
    )
    await wrong.start()
    try:
        proxy = Proxy.from_url(f"socks5://{USER}:{PASSWORD}@127.0.0.1:{wrong.address[1]}")
        with pytest.raises(ProxyError):
            await proxy.connect("127.0.0.1", chain.echo_port, timeout=20)
    finally:
        await wrong.stop()
    assert metric(chain.exit.metrics, "relay_auth_failures_total", reason="unknown-key") == 1


def _hello_flight(timestamp_ms: int, nonce: bytes, port: int) -> bytes:
    return b"\x05\x01\x80" + hl.encode_hello(SECRET, KEY_ID, timestamp_ms, nonce, heartbeat_ms=1000)


async def _exit_answer(relay_exit: RelayExit, flight: bytes) -> tuple[hl.HelloReply, bytes]:
    """Send a hand-built first flight straight to the exit; return its HELLO reply and rest."""
    reader, writer = await asyncio.open_connection(*relay_exit.address)
    writer.write(flight)
    assert await reader.readexactly(2) == b"\x05\x80"
    decoded = hl.decode_reply(await reader.readexactly(hl.REPLY_SIZE))
    assert decoded is not None
    writer.close()
    return decoded[0], b""


async def test_replayed_hello_is_refused(chain: Chain):
    flight = _hello_flight(int(time.time() * 1000), os.urandom(16), chain.echo_port)
    first, _ = await _exit_answer(chain.exit, flight)
    assert first.status == hl.OK
    second, _ = await _exit_answer(chain.exit, flight)
    assert second.status == hl.REPLAY
    assert metric(chain.exit.metrics, "relay_auth_failures_total", reason="replay") == 1


async def test_hello_with_old_timestamp_is_refused(chain: Chain):
    old = int(time.time() * 1000) - 10 * 60 * 1000
    reply, _ = await _exit_answer(chain.exit, _hello_flight(old, os.urandom(16), 9))
    assert reply.status == hl.CLOCK_SKEW
    assert metric(chain.exit.metrics, "relay_auth_failures_total", reason="clock-skew") == 1


async def test_plain_socks5_client_is_refused_when_allow_plain_is_off(chain: Chain):
    answer = await socks_handshake_raw(chain.exit.address[1], b"\x05\x01\x02")
    assert answer == b"\x05\xff"
    assert metric(chain.exit.metrics, "relay_auth_failures_total", reason="plain-refused") == 1


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("169.254.169.254", "link_local"),
        ("0.0.0.0", "unspecified"),
        ("localhost", "loopback"),
        ("2130706433", "loopback"),
        ("0x7f.0.0.1", "loopback"),
    ],
)
async def test_denied_destinations_get_not_allowed(chain: Chain, host: str, reason: str):
    """Under a broad allow rule, default-denied ranges stay denied, also behind a name."""
    strict = RelayExit(exit_settings("0.0.0.0/0:*", "[::]/0:*", ".localhost:*"))
    await strict.start()
    worker = RelayWorker(worker_settings(chain.sshd, strict.address, no_optimistic=True))
    await worker.start()
    try:
        proxy = Proxy.from_url(f"socks5://{USER}:{PASSWORD}@127.0.0.1:{worker.address[1]}")
        with pytest.raises(ProxyError) as info:
            await proxy.connect(host, chain.echo_port, timeout=20, rdns=True)
        assert info.value.error_code == s5.NOT_ALLOWED
    finally:
        await worker.stop()
        await strict.stop()
    assert metric(strict.metrics, "relay_policy_denials_total", reason=reason) == 1
    assert metric(strict.metrics, "relay_streams_total", result="denied") == 1


async def test_port_outside_the_rule_is_denied(chain: Chain):
    narrow = RelayExit(exit_settings(f"127.0.0.1:{chain.http_port}"))
    await narrow.start()
    worker = RelayWorker(worker_settings(chain.sshd, narrow.address, no_optimistic=True))
    await worker.start()
    try:
        proxy = Proxy.from_url(f"socks5://{USER}:{PASSWORD}@127.0.0.1:{worker.address[1]}")
        with pytest.raises(ProxyError) as info:
            await proxy.connect("127.0.0.1", chain.echo_port, timeout=20)
        assert info.value.error_code == s5.NOT_ALLOWED
        sock = await proxy.connect("127.0.0.1", chain.http_port, timeout=20)
        sock.close()
    finally:
        await worker.stop()
        await narrow.stop()
    assert metric(narrow.metrics, "relay_policy_denials_total", reason="port") == 1


async def test_exit_unreachable_from_login_node_is_a_general_failure(chain: Chain):
    worker = RelayWorker(worker_settings(chain.sshd, ("127.0.0.1", 1), no_optimistic=True))
    await worker.start()
    try:
        proxy = Proxy.from_url(f"socks5://{USER}:{PASSWORD}@127.0.0.1:{worker.address[1]}")
        with pytest.raises(ProxyError) as info:
            await proxy.connect("127.0.0.1", chain.echo_port, timeout=20)
        assert info.value.error_code == s5.GENERAL_FAILURE
    finally:
        await worker.stop()
    assert metric(worker.metrics, "relay_carriers_total", result="exit-unreachable") >= 1


async def test_metrics_endpoints_serve_prometheus_text(chain: Chain):
    relay_exit = RelayExit(exit_settings(metrics=HostPort("127.0.0.1", 0)))
    await relay_exit.start()
    try:
        host, port = relay_exit.metrics_address or ("", 0)
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
        text = (await asyncio.wait_for(reader.read(), 5)).decode()
        writer.close()
    finally:
        await relay_exit.stop()
    assert text.startswith("HTTP/1.0 200")
    for name in ("relay_streams_active", "relay_heartbeat_rtt_seconds_bucket",
                 "relay_handshake_seconds_bucket", 'relay_info{role="exit"'):  # fmt: skip
        assert name in text


async def _eventually(predicate, timeout: float = 5.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return bool(predicate())


# -- optimistic data: the client is answered at once, its first bytes ride with the CONNECT ---


async def test_optimistic_refusal_reaches_the_client_as_a_reset(chain: Chain):
    strict = RelayExit(exit_settings(f"127.0.0.1:{chain.http_port}"))
    await strict.start()
    worker = RelayWorker(worker_settings(chain.sshd, strict.address))
    await worker.start()
    try:
        proxy = Proxy.from_url(f"socks5://{USER}:{PASSWORD}@127.0.0.1:{worker.address[1]}")
        sock = await proxy.connect("127.0.0.1", chain.echo_port, timeout=20)  # answered at once
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"hello?\n")
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 15)
        writer.close()
    finally:
        await worker.stop()
        await strict.stop()
    assert metric(strict.metrics, "relay_policy_denials_total", reason="port") == 1
    assert metric(worker.metrics, "relay_streams_total", result="refused") == 1


class _SilentExit:
    """Accepts carriers, records what arrives, answers nothing (or closes at once)."""

    def __init__(self, close_after_first_read: bool = False) -> None:
        self.received = bytearray()
        self.first_read = asyncio.get_running_loop().create_future()
        self.close_after_first_read = close_after_first_read
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return "127.0.0.1", int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        while True:
            data = await reader.read(1 << 20)
            if not data:
                return
            self.received += data
            if not self.first_read.done():
                self.first_read.set_result(None)
            if self.close_after_first_read:
                writer.transport.abort()
                return

    async def close(self) -> None:
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()
        await self.server.wait_closed()


async def test_optimistic_first_bytes_follow_the_open_before_any_answer():
    """The exit has not answered the OPEN yet, and the client's bytes already ride behind it
    on the carrier; what goes out unconfirmed is bounded (64 KiB)."""
    fake = _HelloOnlyExit()
    address = await fake.start()
    worker = RelayWorker(worker_settings(None, address, carriers=1))
    await worker.start()
    try:
        proxy = Proxy.from_url(f"socks5://{USER}:{PASSWORD}@127.0.0.1:{worker.address[1]}")
        sock = await proxy.connect("collector.example.org", 9618, timeout=10)
        _reader, writer = await asyncio.open_connection(sock=sock)
        first = b"GET / HTTP/1.0\r\n\r\n"
        writer.write(first)
        assert await _eventually(lambda: any(isinstance(f, mux.Data) for f in fake.frames))
        kinds = [type(f) for f in fake.frames]
        assert kinds.index(mux.Open) < kinds.index(mux.Data)
        opened = next(f for f in fake.frames if isinstance(f, mux.Open))
        assert opened.address == s5.encode_address("collector.example.org", 9618)
        data = b"".join(bytes(f.payload) for f in fake.frames if isinstance(f, mux.Data))
        assert data == first
        writer.write(os.urandom(2 << 20))  # more than may go out before the exit answers
        await asyncio.sleep(1.0)
        data = b"".join(bytes(f.payload) for f in fake.frames if isinstance(f, mux.Data))
        assert len(data) == UNCONFIRMED_WINDOW
        writer.close()
    finally:
        await worker.stop()
        await fake.close()


class _HelloOnlyExit:
    """An exit that accepts the HELLO, then only reads the worker's frames: it never
    answers an OPEN."""

    def __init__(self) -> None:
        self.frames: list[mux.Frame] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return "127.0.0.1", int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        assert await reader.readexactly(3) == b"\x05\x01\x80"
        head = await reader.readexactly(2)
        rest = await reader.readexactly(head[1] + 8 + 16 + 16 + 8 + 4 + 1 + hl.MAC_SIZE)
        decoded = hl.decode_hello(head + rest)
        assert decoded is not None
        hello = decoded[0]
        nonce, session_id = os.urandom(16), os.urandom(16)
        now_ms = int(time.time() * 1000)
        writer.write(
            b"\x05\x80"
            + hl.encode_reply(SECRET, hello.mac, hl.OK, session_id, 0, 1000, nonce, now_ms)
        )
        key = hl.session_key(SECRET, hello.nonce, nonce, session_id)
        to_exit, _ = seal.derive_keys(key, hello.nonce, nonce)
        unsealer, decoder = seal.Unsealer(to_exit), mux.FrameDecoder()
        while True:
            data = await reader.read(1 << 20)
            if not data:
                return
            for record in unsealer.feed(data):
                self.frames.extend(decoder.feed(record))

    async def close(self) -> None:
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()
        await self.server.wait_closed()


async def test_optimistic_bytes_sent_to_a_failing_exit_reach_the_next_one_once(chain: Chain):
    dropper = _SilentExit(close_after_first_read=True)
    first_exit = await dropper.start()
    worker = RelayWorker(worker_settings(chain.sshd, first_exit))
    worker.settings.exit += (HostPort(*chain.exit.address),)
    await worker.start()
    try:
        proxy = Proxy.from_url(f"socks5://{USER}:{PASSWORD}@127.0.0.1:{worker.address[1]}")
        sock = await proxy.connect("127.0.0.1", chain.echo_port, timeout=20)
        reader, writer = await asyncio.open_connection(sock=sock)
        payload = os.urandom(48 * 1024)
        writer.write(payload)
        echoed = await asyncio.wait_for(reader.readexactly(len(payload)), 20)
        assert echoed == payload
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b""  # nothing more, nothing twice
        writer.close()
        assert dropper.received.startswith(b"\x05\x01\x80")
        assert await _eventually(
            lambda: metric(worker.metrics, "relay_streams_total", result="ok") == 1
        )
    finally:
        await worker.stop()
        await dropper.close()


async def test_optimistic_internal_failure_resets_the_answered_client(chain: Chain, monkeypatch):
    """A failure inside the worker after the client was answered is a reset, not a second
    SOCKS5 reply inside the stream's bytes."""

    def broken(*args, **kwargs):
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(MuxPump, "attach_plain", broken)
    reader, writer = await chain.open("127.0.0.1", chain.echo_port)
    writer.write(b"hello?\n")
    with pytest.raises(ConnectionResetError):
        data = await asyncio.wait_for(reader.read(), 10)
        assert data == b"", data  # nothing may arrive before the reset
    writer.close()
    assert await _eventually(
        lambda: metric(chain.worker.metrics, "relay_streams_total", result="refused") == 1
    )
    assert not chain.worker.pumps
