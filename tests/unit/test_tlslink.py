"""The TLS adapter without sockets: two TlsEngines talk through memory, TlsLink is driven
with a fake raw link; contexts, fingerprints and their errors."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ssl
from pathlib import Path
from typing import Any, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.config.values import parse_fingerprint
from relay.errors import ConfigError
from relay.net.tlslink import (
    TlsClient,
    TlsEngine,
    TlsError,
    TlsLink,
    TlsVerifyError,
    cert_fingerprint,
    client_context,
    fingerprint,
    server_context,
)
from tests.support.tlscerts import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def pair(pki: Pki, client: TlsClient, host: str = "exit.test") -> tuple[TlsEngine, TlsEngine]:
    server = TlsEngine(server_context(pki.server.cert, pki.server.key), server_side=True)
    return client.engine(host), server


def shuttle(client: TlsEngine, server: TlsEngine, first: bytes) -> None:
    """Pass bytes back and forth until neither side has anything to say."""
    to_server = first
    for _ in range(10):
        if to_server:
            server.feed(to_server)
        to_client = server.outgoing()
        if to_client:
            client.feed(to_client)
        to_server = client.outgoing()
        if not to_server and not to_client:
            return


def test_handshake_and_data_both_ways_with_a_ca(pki: Pki) -> None:
    client, server = pair(pki, TlsClient(client_context(pki.ca.cert)))
    shuttle(client, server, client.start())
    assert client.handshake_done and server.handshake_done
    assert server.sslobj.version() in ("TLSv1.2", "TLSv1.3")
    payload = bytes(range(256)) * 1000
    server.feed(client.encrypt(payload))
    got = b""
    while chunk := server.read():
        got += chunk
    assert got == payload
    client.feed(server.encrypt(b"answer"))
    assert client.read() == b"answer"


@pytest.mark.parametrize(
    ("ca", "host", "pins", "message"),
    [
        ("other", "exit.test", (), "certificate not accepted"),
        ("right", "wrong.test", (), "Hostname mismatch"),
        (None, "exit.test", (b"\0" * 32,), "matches no pinned fingerprint"),
    ],
)
def test_a_certificate_that_does_not_verify_is_refused(
    pki: Pki, ca: Optional[str], host: str, pins: tuple[bytes, ...], message: str
) -> None:
    cafile = {"other": pki.other_ca.cert, "right": pki.ca.cert, None: None}[ca]
    client, server = pair(pki, TlsClient(client_context(cafile), None, pins), host)
    with pytest.raises(TlsVerifyError, match=message):
        shuttle(client, server, client.start())
    assert not client.handshake_done
    with pytest.raises(TlsVerifyError):
        client.feed(b"more")


def test_pin_alone_accepts_a_self_signed_certificate(pki: Pki) -> None:
    server = TlsEngine(server_context(pki.self_signed.cert, pki.self_signed.key), server_side=True)
    client = TlsClient(client_context(None), None, (b"\1" * 32, pki.self_signed.sha256))
    engine = client.engine("127.0.0.1")
    shuttle(engine, server, engine.start())
    assert engine.handshake_done


def test_server_name_overrides_the_host(pki: Pki) -> None:
    client, server = pair(pki, TlsClient(client_context(pki.ca.cert), "exit.test"), "10.9.9.9")
    shuttle(client, server, client.start())
    assert client.handshake_done


def test_plain_bytes_to_a_server_fail_cleanly(pki: Pki) -> None:
    server = TlsEngine(server_context(pki.server.cert, pki.server.key), server_side=True)
    with pytest.raises(TlsError, match="0x05, a SOCKS5 client without TLS"):
        server.feed(b"\x05\x01\x80")
    with pytest.raises(TlsError):
        server.feed(b"more")  # failed for good


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=600))
def test_any_bytes_to_a_server_end_in_tls_error_or_need_more(data: bytes) -> None:
    server = TlsEngine(_FUZZ_CTX[0], server_side=True)
    try:
        server.feed(b"\x16" + data)
    except TlsError:
        return
    assert not server.handshake_done


_FUZZ_CTX: list[ssl.SSLContext] = []


@pytest.fixture(autouse=True, scope="module")
def _fuzz_ctx(pki: Pki) -> None:
    _FUZZ_CTX[:] = [server_context(pki.server.cert, pki.server.key)]


def test_close_notify_is_seen_as_peer_closed(pki: Pki) -> None:
    client, server = pair(pki, TlsClient(client_context(pki.ca.cert)))
    shuttle(client, server, client.start())
    server.feed(client.shutdown())
    assert server.read() == b"" and server.peer_closed


def test_fingerprint_formats(pki: Pki) -> None:
    digest = pki.server.sha256
    b64 = base64.b64encode(digest).decode().rstrip("=")
    colons = ":".join(f"{b:02X}" for b in digest)
    for text in (digest.hex(), colons, f"sha256 Fingerprint={colons}", f"SHA256:{b64}",
                 f"SHA256:{b64}=", f"  {digest.hex().upper()}  "):  # fmt: skip
        assert parse_fingerprint(text) == digest, text
    assert fingerprint(pki.server.der) == f"SHA256:{b64}"
    assert cert_fingerprint(pki.server.cert) == f"SHA256:{b64}"
    for bad in ("", "abc", digest.hex()[:-2], "SHA256:" + b64[:-1], "md5:" + digest.hex()):
        with pytest.raises(ValueError):
            parse_fingerprint(bad)


def test_context_errors_name_the_option(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--tls-cert/--tls-key"):
        server_context(pki.server.cert, pki.self_signed.key)  # key of another certificate
    with pytest.raises(ConfigError, match="--exit-ca"):
        client_context(pki.server.key)  # not a certificate
    with pytest.raises(ConfigError, match="--exit-ca"):
        client_context(tmp_path / "missing.pem")
    assert hashlib.sha256(pki.server.der).digest() == pki.server.sha256


# -- TlsLink with fake raw links -----------------------------------------------------------


class FakeRaw:
    """A raw link that records what the TlsLink does to it."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.paused = False
        self.closed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.sent.append(bytes(data))

    def take(self) -> bytes:
        data, self.sent = b"".join(self.sent), []
        return data

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("192.0.2.9", 4242)}.get(name, default)


class Inner:
    """A protocol on top of a TlsLink."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.data: list[bytes] = []
        self.eof = False
        self.lost: list[Optional[BaseException]] = []
        self.tls_errors: list[TlsError] = []
        self.pause_after_first = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data.append(data)
        if self.pause_after_first:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        return False

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.lost.append(exc)

    def tls_failed(self, exc: TlsError) -> None:
        self.tls_errors.append(exc)


async def linked(pki: Pki) -> tuple[TlsLink, FakeRaw, Inner, TlsLink, FakeRaw, Inner]:
    """A client link and a server link whose raw sides are shuttled by hand."""
    c_inner, s_inner = Inner(), Inner()
    tls = TlsClient(client_context(pki.ca.cert))
    client = TlsLink(tls.engine("exit.test"), c_inner, eager=False)
    server_ctx = server_context(pki.server.cert, pki.server.key)
    server = TlsLink(TlsEngine(server_ctx, server_side=True), s_inner, eager=True)
    c_raw, s_raw = FakeRaw(), FakeRaw()
    server.connection_made(s_raw)
    assert s_inner.transport is server  # eager: at once
    client.connection_made(c_raw)
    assert c_inner.transport is None  # not before the handshake
    for _ in range(6):
        if data := c_raw.take():
            server.data_received(data)
        if data := s_raw.take():
            client.data_received(data, None)
    return client, c_raw, c_inner, server, s_raw, s_inner


async def test_link_carries_bytes_respects_pause_and_closes(pki: Pki) -> None:
    client, c_raw, c_inner, server, s_raw, s_inner = await linked(pki)
    assert client.handshake.done() and client.handshake.exception() is None
    assert c_inner.transport is client
    assert client.get_extra_info("peername") == ("192.0.2.9", 4242)
    assert client.get_extra_info("cipher") is not None
    client.writelines([b"hello ", memoryview(b"world")])
    server.data_received(c_raw.take())
    assert b"".join(s_inner.data) == b"hello world"
    # A paused inner protocol gets nothing more until it resumes; the raw link is paused too.
    s_inner.pause_after_first = True
    s_inner.data.clear()
    for chunk in (b"a" * 70000, b"b" * 70000):
        client.write(chunk)
    server.data_received(c_raw.take())
    assert s_raw.paused and len(s_inner.data) == 1
    s_inner.pause_after_first = False
    server.resume_reading()
    assert not s_raw.paused
    assert b"".join(s_inner.data) == b"a" * 70000 + b"b" * 70000
    client.close()
    assert c_raw.closed
    server.data_received(c_raw.take())  # close_notify
    assert s_inner.eof and s_raw.closed


async def test_link_early_writes_wait_for_the_handshake(pki: Pki) -> None:
    inner = Inner()
    server_inner = Inner()
    link = TlsLink(TlsClient(client_context(pki.ca.cert)).engine("exit.test"), inner, eager=True)
    server = TlsLink(
        TlsEngine(server_context(pki.server.cert, pki.server.key), server_side=True),
        server_inner,
        eager=True,
    )
    raw, s_raw = FakeRaw(), FakeRaw()
    server.connection_made(s_raw)
    link.connection_made(raw)
    link.write(b"first flight")  # before the handshake: held
    for _ in range(6):
        if data := raw.take():
            server.data_received(data)
        if data := s_raw.take():
            link.data_received(data)
    assert b"".join(server_inner.data) == b"first flight"


async def test_link_plain_client_on_a_tls_server_is_told_and_closed(pki: Pki) -> None:
    inner = Inner()
    link = TlsLink(
        TlsEngine(server_context(pki.server.cert, pki.server.key), server_side=True),
        inner,
        eager=True,
    )
    raw = FakeRaw()
    link.connection_made(raw)
    link.data_received(b"\x16\x03\x01\x00\x05hello")  # a record, but no ClientHello
    assert len(inner.tls_errors) == 1 and "handshake failed" in str(inner.tls_errors[0])
    assert raw.closed and raw.take()[:1] == b"\x15"  # a TLS alert record
    link.data_received(b"more")  # ignored after the failure
    assert inner.data == []


async def test_link_handshake_failure_reaches_the_waiting_worker(pki: Pki) -> None:
    inner = Inner()
    tls = TlsClient(client_context(None), None, (b"\0" * 32,))
    client = TlsLink(tls.engine("exit.test"), inner, eager=False)
    server = TlsLink(
        TlsEngine(server_context(pki.server.cert, pki.server.key), server_side=True),
        Inner(),
        eager=True,
    )
    c_raw, s_raw = FakeRaw(), FakeRaw()
    server.connection_made(s_raw)
    client.connection_made(c_raw)
    for _ in range(4):
        if data := c_raw.take():
            server.data_received(data)
        if data := s_raw.take():
            client.data_received(data)
    with pytest.raises(TlsVerifyError, match="pinned"):
        await asyncio.wait_for(client.handshake, 1)
    assert c_raw.closed and inner.transport is None
    client.connection_lost(None)
    assert inner.lost == []  # never connected, never told


async def test_link_eof_during_handshake_and_loss(pki: Pki) -> None:
    inner = Inner()
    link = TlsLink(TlsClient(client_context(pki.ca.cert)).engine("exit.test"), inner, eager=False)
    raw = FakeRaw()
    link.connection_made(raw)
    assert raw.take()[:1] == b"\x16"  # ClientHello
    assert link.eof_received() is False
    with pytest.raises(TlsError, match="during the TLS handshake"):
        await link.handshake
    link.connection_lost(ConnectionResetError())
