"""The issue's abuse matrix, the part test_chain.py does not cover: destinations in every
default-denied range and in every spelling (IPv6 link-local and ULA, IPv4-mapped, the
decimal/octal/hex forms of loopback and of private addresses in a domain-name request),
HELLOs that must not authenticate (unknown key, MAC of another key, old and future
timestamps, replayed nonce, malformed), resumes of another key's session, and plain SOCKS5
clients. Each is refused with the right answer and counted. First flights are built by hand
and sent straight to the exit; test_chain.py does the same through worker and sshd."""

from __future__ import annotations

import asyncio
import os
import struct
import time
from collections.abc import AsyncIterator
from typing import Optional

import pytest

from relay.exit import RelayExit
from relay.proto import hello as hl
from relay.proto import socks5 as s5
from tests.helpers import KEY_ID, SECRET, Servers, echo_handler, exit_settings, metric

OTHER_KEY, OTHER_SECRET = "worker-2", b"fedcba9876543210fedcba9876543210"


@pytest.fixture
async def broad() -> AsyncIterator[RelayExit]:
    """An exit with rules as broad as they get: only the default-denied ranges stay shut."""
    relay_exit = RelayExit(
        exit_settings(
            "0.0.0.0/0:*", "[::]/0:*", ".localhost:*",
            keys={KEY_ID: SECRET, OTHER_KEY: OTHER_SECRET}, allow_plain=True,
        )
    )  # fmt: skip
    await relay_exit.start()
    try:
        yield relay_exit
    finally:
        await relay_exit.stop()


def hello(
    *, key_id: str = KEY_ID, secret: bytes = SECRET, skew_ms: int = 0,
    nonce: Optional[bytes] = None, session: bytes = hl.NEW_SESSION,
) -> bytes:  # fmt: skip
    now = int(time.time() * 1000) + skew_ms
    return hl.encode_hello(secret, key_id, now, nonce or os.urandom(16), session, 0, 1000)


def domain_request(name: str, port: int) -> bytes:
    raw = name.encode()
    return bytes((5, s5.CMD_CONNECT, 0, s5.ATYP_DOMAIN, len(raw))) + raw + struct.pack("!H", port)


async def exchange(relay_exit: RelayExit, flight: bytes) -> bytes:
    """Everything the exit answers to ``flight`` (then our half-close) until it closes."""
    reader, writer = await asyncio.open_connection(*relay_exit.address)
    try:
        writer.write(flight)
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


def hello_status(answer: bytes) -> int:
    assert answer[:2] == b"\x05\x80", answer
    decoded = hl.decode_reply(answer[2 : 2 + hl.REPLY_SIZE])
    assert decoded is not None
    return decoded[0].status


def socks_reply(answer: bytes) -> int:
    """The CONNECT reply code after a successful HELLO."""
    assert hello_status(answer) == hl.OK
    return answer[2 + hl.REPLY_SIZE + 1]


DENIED = [
    # (host as the worker's client names it, ATYP, reason counted by the exit)
    ("fe80::1", "ip", "link_local"),
    ("fd00::1", "ip", "ula"),
    ("fec0::1", "ip", "site_local"),
    ("::ffff:10.0.0.1", "ip", "private"),
    ("::ffff:169.254.169.254", "ip", "link_local"),
    ("64:ff9b::7f00:1", "ip", "loopback"),
    ("::", "ip", "unspecified"),
    ("100.64.0.1", "ip", "cgnat"),
    ("224.0.0.251", "ip", "multicast"),
    ("192.168.1.1", "ip", "private"),
    ("0177.0.0.1", "name", "loopback"),
    ("0x7f000001", "name", "loopback"),
    ("017700000001", "name", "loopback"),
    ("127.1", "name", "loopback"),
    ("127.000.000.001", "name", "loopback"),
    ("0", "name", "unspecified"),
    ("012.0.0.1", "name", "private"),
    ("0xa.0.0.1", "name", "private"),
    ("0xa9.0xfe.0xa9.0xfe", "name", "link_local"),
    ("2852039166", "name", "link_local"),
    ("localhost", "name", "loopback"),
]
# Only names that resolve without DNS (numeric forms, /etc/hosts): tests send no traffic
# beyond loopback.


async def test_every_denied_range_in_every_spelling(broad: RelayExit) -> None:
    """All refused with 'not allowed', none dialled, each counted under its range."""
    servers = Servers()
    port = await servers.start(echo_handler)
    try:
        counts: dict[str, int] = {}
        for host, kind, reason in DENIED:
            if kind == "ip":
                request = s5.Socks5Client.request(s5.CMD_CONNECT, host, port)
            else:
                request = domain_request(host, port)
            answer = await exchange(broad, b"\x05\x01\x80" + hello() + request)
            assert socks_reply(answer) == s5.NOT_ALLOWED, (host, answer)
            counts[reason] = counts.get(reason, 0) + 1
        for reason, count in counts.items():
            got = metric(broad.metrics, "relay_policy_denials_total", reason=reason)
            assert got == count, reason
        assert metric(broad.metrics, "relay_streams_total", result="denied") == len(DENIED)
        assert not servers.writers  # nothing reached the destination
    finally:
        await servers.close()


async def test_port_zero_is_denied(broad: RelayExit) -> None:
    request = s5.Socks5Client.request(s5.CMD_CONNECT, "198.51.100.7", 0)
    answer = await exchange(broad, b"\x05\x01\x80" + hello() + request)
    assert socks_reply(answer) == s5.NOT_ALLOWED
    assert metric(broad.metrics, "relay_policy_denials_total", reason="port") == 1


async def test_hellos_that_must_not_authenticate(broad: RelayExit) -> None:
    request = s5.Socks5Client.request(s5.CMD_CONNECT, "192.0.2.1", 9)
    nonce = os.urandom(16)
    recorded = hello(nonce=nonce, skew_ms=-1)
    cases = [
        (hello(key_id="nobody"), hl.BAD_AUTH, "unknown-key"),
        (hello(secret=b"w" * 32), hl.BAD_AUTH, "bad-mac"),
        (hello(secret=OTHER_SECRET), hl.BAD_AUTH, "bad-mac"),  # another key's secret
        (hello(skew_ms=-121_000), hl.CLOCK_SKEW, "clock-skew"),
        (hello(skew_ms=+121_000), hl.CLOCK_SKEW, "clock-skew"),
        (recorded, hl.OK, ""),
        (recorded, hl.REPLAY, "replay"),  # the very same HELLO again
        (hello(nonce=nonce), hl.REPLAY, "replay"),  # a new HELLO reusing the nonce
    ]
    for flight, status, _ in cases:
        answer = await exchange(broad, b"\x05\x01\x80" + flight + request)
        assert hello_status(answer) == status, (status, answer[:4])
        if status != hl.OK:
            assert answer[2 + hl.REPLY_SIZE - hl.MAC_SIZE : 2 + hl.REPLY_SIZE] == bytes(32)
            assert len(answer) == 2 + hl.REPLY_SIZE  # nothing more: no CONNECT reply
    for reason in ("unknown-key", "bad-mac", "clock-skew", "replay"):
        expected = sum(1 for _, _, r in cases if r == reason)
        assert metric(broad.metrics, "relay_auth_failures_total", reason=reason) == expected
    assert metric(broad.metrics, "relay_streams_total", result="ok") == 0


@pytest.mark.parametrize(
    "flight",
    [
        b"\x05\x01\x80\x02" + bytes(200),  # HELLO version 2
        b"\x05\x01\x80\x01\x00" + bytes(100),  # key id length 0
        b"\x05\x01\x80\x01\x41" + bytes(200),  # key id length 65
        b"\x05\x01\x80\x01\x02\xff\xfe" + bytes(100),  # key id not ASCII
    ],
)
async def test_malformed_hellos_are_closed_and_counted(broad: RelayExit, flight: bytes) -> None:
    answer = await exchange(broad, flight)
    assert answer == b"\x05\x80"  # the method choice, then the close
    assert metric(broad.metrics, "relay_protocol_errors_total", stage="hello") == 1


async def test_truncated_hello_then_close(broad: RelayExit) -> None:
    answer = await exchange(broad, b"\x05\x01\x80" + hello()[:40])
    assert answer == b"\x05\x80"
    assert metric(broad.metrics, "relay_protocol_errors_total", stage="handshake") == 1
    assert broad.handshakes == 0


async def test_resume_of_another_keys_session_is_refused() -> None:
    broad = RelayExit(exit_settings(keys={KEY_ID: SECRET, OTHER_KEY: OTHER_SECRET}))
    await broad.start()
    servers = Servers()
    port = await servers.start(echo_handler)
    try:
        nonce = os.urandom(16)
        reader, writer = await asyncio.open_connection(*broad.address)
        writer.write(
            b"\x05\x01\x80" + hello(nonce=nonce) + s5.Socks5Client.request(1, "127.0.0.1", port)
        )
        head = await reader.readexactly(2 + hl.REPLY_SIZE + 10)
        reply = hl.decode_reply(head[2 : 2 + hl.REPLY_SIZE])
        assert reply is not None and reply[0].status == hl.OK
        session_id = reply[0].session_id
        # the other key's holder knows the session id (it is on the wire) and its own secret
        for key_id, secret in ((OTHER_KEY, OTHER_SECRET), (KEY_ID, SECRET)):
            answer = await exchange(
                broad, b"\x05\x01\x80" + hello(key_id=key_id, secret=secret, session=session_id)
            )
            assert hello_status(answer) == hl.BAD_AUTH
        assert metric(broad.metrics, "relay_resumes_total", result="bad-auth") == 2
        writer.close()
    finally:
        await broad.stop()
        await servers.close()


async def test_plain_socks5_clients(broad: RelayExit) -> None:
    """allow_plain is on here: only the right key id and secret get in, and then only to
    allowed destinations; a client offering no password method is refused."""
    assert await exchange(broad, b"\x05\x01\x00") == b"\x05\xff"
    assert metric(broad.metrics, "relay_auth_failures_total", reason="no-method") == 1
    bad = s5.Socks5Client.userpass(KEY_ID, "wrong-password")
    assert await exchange(broad, b"\x05\x01\x02" + bad) == b"\x05\x02\x01\x01"
    assert metric(broad.metrics, "relay_auth_failures_total", reason="bad-password") == 1
    good = s5.Socks5Client.userpass(KEY_ID, SECRET.decode())
    answer = await exchange(
        broad, b"\x05\x01\x02" + good + s5.Socks5Client.request(1, "127.0.0.1", 9)
    )
    assert answer[:4] == b"\x05\x02\x01\x00" and answer[5] == s5.NOT_ALLOWED
