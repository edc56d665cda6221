"""The abuse matrix, the part test_chain.py does not cover: destinations in every
default-denied range and in every spelling (IPv6 link-local and ULA, IPv4-mapped, the
decimal/octal/hex forms of loopback and of private addresses in a domain name), HELLOs that
must not authenticate (unknown key, MAC of another key, old and future timestamps, replayed
nonce, malformed, version 1), carriers that try to join another key's session, bytes after the
HELLO that are not the carrier's sealed records (garbage, another carrier's records, a replayed
or reordered record, sealed garbage), frames that break one stream, and plain SOCKS5 clients.
Each is refused with the right answer and counted, and what is refused is only the stream or
the carrier at fault. Carriers are spoken by hand (:class:`HandCarrier`) straight to the exit;
test_chain.py goes through worker and sshd.
"""

from __future__ import annotations

import asyncio
import os
import struct
import time
from collections.abc import AsyncIterator
from typing import Callable, Optional

import pytest

from relay.exit.daemon import RelayExit
from relay.proto import hello as hl
from relay.proto import mux, seal
from relay.proto import socks5 as s5
from relay.proto.opener import CarrierOpener, Established, Refused
from tests.support.helpers import KEY_ID, SECRET, Servers, echo_handler, exit_settings, metric

OTHER_KEY, OTHER_SECRET = "worker-2", b"fedcba9876543210fedcba9876543210"


# -- a carrier spoken by hand ------------------------------------------------------------------


class HandCarrier:
    """One carrier to an exit, spoken frame by frame: greeting and HELLO by
    :class:`relay.proto.opener.CarrierOpener`, then v2 frames sealed with this carrier's keys.
    It sends whatever a test asks, valid or not, and answers the exit's PINGs while it reads.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.status: Optional[int] = None
        """The HELLO reply's status; None if the exit closed without one."""
        self.est: Optional[Established] = None
        self.sealer: Optional[seal.Sealer] = None
        self.unsealer: Optional[seal.Unsealer] = None
        self.keys = (b"", b"")
        """(worker-to-exit, exit-to-worker) record keys of this carrier."""
        self.decoder = mux.FrameDecoder()
        self.inbox: list[mux.Frame] = []
        self.closed = False
        """The exit closed (or reset) the carrier."""
        self.sent: dict[int, int] = {}
        self.received: dict[int, int] = {}
        """Per stream: bytes sent, bytes received (carried over to a carrier that resumes)."""

    @classmethod
    async def open(
        cls,
        address: tuple[str, int],
        *,
        secret: bytes = SECRET,
        key_id: str = KEY_ID,
        join: Optional[HandCarrier] = None,
        heartbeat_ms: int = 60_000,
        skew_ms: int = 0,
    ) -> HandCarrier:
        """A new session (HELLO signed with ``secret``), or a further carrier of ``join``'s
        session (signed with its session key)."""
        reader, writer = await asyncio.open_connection(*address)
        carrier = cls(reader, writer)
        if join is not None:
            assert join.est is not None
            key, session_id = join.est.session_key, join.est.session_id
        else:
            key, session_id = secret, hl.NEW_SESSION
        opener = CarrierOpener(
            key=key,
            key_id=key_id,
            now_ms=int(time.time() * 1000) + skew_ms,
            nonce=os.urandom(hl.NONCE_SIZE),
            heartbeat_ms=heartbeat_ms,
            session_id=session_id,
        )
        writer.write(opener.first_flight())
        while carrier.status is None:
            data = await asyncio.wait_for(reader.read(65536), 10)
            if not data:
                carrier.closed = True
                return carrier
            for event in opener.receive(data):
                if isinstance(event, Refused):
                    carrier.status = event.status
                else:
                    carrier.status = hl.OK
                    carrier._established(event)
        if carrier.est is not None:
            carrier._feed(opener.trailing())
        return carrier

    def _established(self, est: Established) -> None:
        self.est = est
        self.keys = seal.derive_keys(est.session_key, est.worker_nonce, est.exit_nonce)
        self.sealer = seal.Sealer(self.keys[0])
        self.unsealer = seal.Unsealer(self.keys[1])

    @property
    def session_id(self) -> bytes:
        assert self.est is not None
        return self.est.session_id

    # -- sending --------------------------------------------------------------------------
    def sealed(self, *frames: bytes) -> bytes:
        """``frames`` as this carrier's next record (the sequence number moves on)."""
        assert self.sealer is not None
        return b"".join(self.sealer.seal(frames))

    def send(self, *frames: bytes) -> None:
        self.writer.write(self.sealed(*frames))

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    def open_stream(self, sid: int, host: str, port: int, data: bytes = b"") -> None:
        """OPEN (and optimistic first bytes) of stream ``sid``."""
        self.send(mux.encode_open(sid, s5.encode_address(host, port)))
        if data:
            self.write(sid, data)

    def write(self, sid: int, data: bytes) -> None:
        """DATA on stream ``sid`` at its next offset."""
        offset = self.sent.get(sid, 0)
        self.sent[sid] = offset + len(data)
        self.send(mux.data_header(sid, offset, len(data)) + data)

    # -- receiving ------------------------------------------------------------------------
    def _feed(self, data: bytes) -> None:
        assert self.unsealer is not None
        for record in self.unsealer.feed(data):
            for frame in self.decoder.feed(record):
                if isinstance(frame, mux.Ping):
                    self.send(mux.encode_pong(frame.token))
                elif isinstance(frame, mux.Data):
                    self.inbox.append(frame._replace(payload=bytes(frame.payload)))
                else:
                    self.inbox.append(frame)

    async def _read(self, timeout: float) -> bool:
        """Read once; False when the exit closed the carrier."""
        try:
            data = await asyncio.wait_for(self.reader.read(1 << 18), timeout)
        except ConnectionError:
            data = b""
        if not data:
            self.closed = True
            return False
        self._feed(data)
        return True

    async def expect(self, match: Callable[[mux.Frame], bool], timeout: float = 10.0) -> mux.Frame:
        """The first frame (received now or before) that ``match`` accepts; it is taken out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for index, frame in enumerate(self.inbox):
                if match(frame):
                    return self.inbox.pop(index)
            left = deadline - loop.time()
            assert left > 0, f"no such frame within {timeout}s; got {self.inbox}"
            assert await self._read(left), f"carrier closed; got {self.inbox}"

    async def reply(self, sid: int) -> mux.Reply:
        frame = await self.expect(lambda f: isinstance(f, mux.Reply) and f.stream == sid)
        assert isinstance(frame, mux.Reply)
        return frame

    async def read(self, sid: int, size: int, timeout: float = 10.0, ack: bool = True) -> bytes:
        """The next ``size`` bytes of stream ``sid`` (its DATA frames, in order), acknowledged
        unless ``ack`` is False."""
        start = self.received.get(sid, 0)
        got = bytearray()
        while len(got) < size:
            frame = await self.expect(
                lambda f: isinstance(f, mux.Data) and f.stream == sid, timeout
            )
            assert isinstance(frame, mux.Data) and frame.offset == start + len(got), frame
            got += frame.payload
        self.received[sid] = start + len(got)
        if ack:
            self.send(mux.encode_ack(sid, start + len(got)))
        return bytes(got)

    async def read_to_fin(self, sid: int, timeout: float = 30.0) -> bytes:
        """Everything stream ``sid`` still sends up to its FIN, acknowledged as it comes (a
        quarter window at a time), then our own FIN and the ACK of theirs."""
        got = bytearray()
        start = self.received.get(sid, 0)
        acked = start
        fin_at: Optional[int] = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while fin_at is None or start + len(got) < fin_at:
            try:
                frame = await self.expect(
                    lambda f: isinstance(f, (mux.Data, mux.Fin, mux.Reset)) and f.stream == sid,
                    min(0.25, max(0.01, deadline - loop.time())),
                )
            except (AssertionError, asyncio.TimeoutError):
                if self.closed or loop.time() >= deadline:
                    raise
                # as a worker does on its tick: acknowledge the rest, or an exit over its
                # --max-buffered would wait for this ACK forever
                if start + len(got) > acked:
                    acked = start + len(got)
                    self.send(mux.encode_ack(sid, acked))
                continue
            assert not isinstance(frame, mux.Reset), frame
            if isinstance(frame, mux.Fin):
                fin_at = frame.offset
                continue
            assert isinstance(frame, mux.Data) and frame.offset == start + len(got), frame
            got += frame.payload
            if start + len(got) - acked >= 128 * 1024:
                acked = start + len(got)
                self.send(mux.encode_ack(sid, acked))
        self.received[sid] = fin_at
        self.send(mux.encode_fin(sid, self.sent.get(sid, 0)), mux.encode_ack(sid, fin_at, True))
        return bytes(got)

    async def echo(self, sid: int, data: bytes) -> bytes:
        """``data`` to an echo destination on stream ``sid``, and what comes back."""
        self.write(sid, data)
        return await self.read(sid, len(data))

    async def closed_by_exit(self, timeout: float = 10.0) -> bool:
        """Read (answering PINGs) until the exit closes the carrier; False if it does not."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.closed:
            left = deadline - loop.time()
            if left <= 0:
                return False
            try:
                await self._read(left)
            except asyncio.TimeoutError:
                return False
        return True

    def close(self) -> None:
        self.writer.close()


def answered_reset(carrier: HandCarrier, sid: int) -> None:
    """What a worker does with a refused stream: answer, so that the exit may forget it."""
    carrier.send(mux.encode_reset(sid, mux.RST_ANSWER))


async def no_streams_held(relay_exit: RelayExit) -> bool:
    """Every stream of every session is forgotten (refusals answered, tombstones gone)."""
    for _ in range(100):
        if all(not m.driver.session.streams for m in relay_exit.sessions.values()):
            return True
        await asyncio.sleep(0.02)
    return False


# -- the exit under test ------------------------------------------------------------------------


@pytest.fixture
async def broad() -> AsyncIterator[RelayExit]:
    """An exit with rules as broad as they get: only the default-denied ranges stay shut."""
    relay_exit = RelayExit(
        exit_settings(
            "0.0.0.0/0:*", "[::]/0:*", ".localhost:*",
            secrets={KEY_ID: SECRET, OTHER_KEY: OTHER_SECRET}, allow_plain=True,
        )
    )  # fmt: skip
    await relay_exit.start()
    try:
        yield relay_exit
    finally:
        await relay_exit.stop()


@pytest.fixture
async def echo_exit() -> AsyncIterator[tuple[RelayExit, int]]:
    """An exit that allows loopback, and an echo destination there."""
    relay_exit = RelayExit(exit_settings(secrets={KEY_ID: SECRET, OTHER_KEY: OTHER_SECRET}))
    await relay_exit.start()
    servers = Servers()
    port = await servers.start(echo_handler)
    try:
        yield relay_exit, port
    finally:
        await relay_exit.stop()
        await servers.close()


def hello(
    *, key_id: str = KEY_ID, secret: bytes = SECRET, skew_ms: int = 0,
    nonce: Optional[bytes] = None, session: bytes = hl.NEW_SESSION,
) -> bytes:  # fmt: skip
    now = int(time.time() * 1000) + skew_ms
    return hl.encode_hello(secret, key_id, now, nonce or os.urandom(16), session, 0, 1000)


def domain_address(name: str, port: int) -> bytes:
    raw = name.encode()
    return bytes((s5.ATYP_DOMAIN, len(raw))) + raw + struct.pack("!H", port)


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


# -- destinations -------------------------------------------------------------------------------

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
    ("000", "name", "unspecified"),
    ("012.0.0.1", "name", "private"),
    ("0xa.0.0.1", "name", "private"),
    ("0xa9.0xfe.0xa9.0xfe", "name", "link_local"),
    ("2852039166", "name", "link_local"),
    ("localhost", "name", "loopback"),
]
# Only names that resolve without DNS (numeric forms, /etc/hosts): tests send no traffic
# beyond loopback.


async def test_every_denied_range_in_every_spelling(broad: RelayExit) -> None:
    """Each OPEN gets REPLY 02 on its own stream, none is dialled, each is counted under its
    range; the carrier stays up through all of them and the session forgets the refusals."""
    servers = Servers()
    port = await servers.start(echo_handler)
    carrier = await HandCarrier.open(broad.address)
    try:
        assert carrier.status == hl.OK
        counts: dict[str, int] = {}
        for sid, (host, kind, reason) in enumerate(DENIED, start=1):
            encode = s5.encode_address if kind == "ip" else domain_address
            address = encode(host, port)
            carrier.send(mux.encode_open(sid, address))
            reply = await carrier.reply(sid)
            assert reply.code == s5.NOT_ALLOWED, (host, reply)
            answered_reset(carrier, sid)
            counts[reason] = counts.get(reason, 0) + 1
        for reason, count in counts.items():
            got = metric(broad.metrics, "relay_policy_denials_total", reason=reason)
            assert got == count, reason
        assert metric(broad.metrics, "relay_streams_total", result="denied") == len(DENIED)
        assert not servers.writers  # nothing reached the destination
        assert not carrier.closed and len(broad.sessions) == 1
        assert await no_streams_held(broad)
    finally:
        carrier.close()
        await servers.close()


async def test_a_one_letter_name_is_refused_on_its_stream(broad: RelayExit) -> None:
    carrier = await HandCarrier.open(broad.address)
    try:
        carrier.send(mux.encode_open(1, domain_address("0", 80)))
        assert (await carrier.reply(1)).code == s5.NOT_ALLOWED
        assert metric(broad.metrics, "relay_policy_denials_total", reason="unspecified") == 1
    finally:
        carrier.close()


async def test_port_zero_is_denied(broad: RelayExit) -> None:
    carrier = await HandCarrier.open(broad.address)
    try:
        carrier.send(mux.encode_open(1, s5.encode_address("198.51.100.7", 0)))
        assert (await carrier.reply(1)).code == s5.NOT_ALLOWED
        assert metric(broad.metrics, "relay_policy_denials_total", reason="port") == 1
    finally:
        carrier.close()


async def test_open_with_a_bad_name_gets_its_reply_code(
    echo_exit: tuple[RelayExit, int],
) -> None:
    """A name the exit will not look up is refused on its stream (and counted), not the
    carrier: the next stream on it still opens."""
    relay_exit, port = echo_exit
    carrier = await HandCarrier.open(relay_exit.address)
    try:
        carrier.send(mux.encode_open(1, domain_address("a b", port)))
        assert (await carrier.reply(1)).code == s5.HOST_UNREACHABLE
        assert metric(relay_exit.metrics, "relay_protocol_errors_total", stage="open") == 1
        carrier.open_stream(3, "127.0.0.1", port, b"fine\n")
        assert (await carrier.reply(3)).code == s5.SUCCEEDED
        assert await carrier.read(3, 5) == b"fine\n"
    finally:
        carrier.close()


# -- HELLOs -------------------------------------------------------------------------------------


async def test_hellos_that_must_not_authenticate(broad: RelayExit) -> None:
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
        answer = await exchange(broad, b"\x05\x01\x80" + flight)
        assert hello_status(answer) == status, (status, answer[:4])
        if status != hl.OK:
            assert answer[2 + hl.REPLY_SIZE - hl.MAC_SIZE : 2 + hl.REPLY_SIZE] == bytes(32)
            assert len(answer) == 2 + hl.REPLY_SIZE  # nothing more: the carrier is closed
    for reason in ("unknown-key", "bad-mac", "clock-skew", "replay"):
        expected = sum(1 for _, _, r in cases if r == reason)
        assert metric(broad.metrics, "relay_auth_failures_total", reason=reason) == expected
    assert metric(broad.metrics, "relay_streams_total", result="ok") == 0
    assert await no_streams_held(broad) and not broad.sessions  # the one good carrier left


@pytest.mark.parametrize(
    "flight",
    [
        b"\x05\x01\x80\x01\x08worker-1" + bytes(200),  # HELLO version 1 (a v1 worker)
        b"\x05\x01\x80\x03\x08worker-1" + bytes(200),  # HELLO version 3
        b"\x05\x01\x80\x02\x00" + bytes(100),  # key id length 0
        b"\x05\x01\x80\x02\x41" + bytes(200),  # key id length 65
        b"\x05\x01\x80\x02\x02\xff\xfe" + bytes(100),  # key id not ASCII
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


async def test_joining_another_keys_session_is_refused(
    echo_exit: tuple[RelayExit, int],
) -> None:
    """The session id is on the wire; only the session key (derived from the first HELLO's
    secret and nonces) lets a carrier join. Refusals leave the session and its stream alone."""
    relay_exit, port = echo_exit
    first = await HandCarrier.open(relay_exit.address)
    try:
        first.open_stream(1, "127.0.0.1", port, b"before\n")
        assert await first.read(1, 7) == b"before\n"
        session_id = first.session_id
        # the other key's holder knows the session id and its own secret; the session's own
        # key holder without the session key; the right session key under another key id
        for key_id, secret in ((OTHER_KEY, OTHER_SECRET), (KEY_ID, SECRET)):
            answer = await exchange(
                relay_exit,
                b"\x05\x01\x80" + hello(key_id=key_id, secret=secret, session=session_id),
            )
            assert hello_status(answer) == hl.BAD_AUTH
        assert first.est is not None
        answer = await exchange(
            relay_exit,
            b"\x05\x01\x80"
            + hello(key_id=OTHER_KEY, secret=first.est.session_key, session=session_id),
        )
        assert hello_status(answer) == hl.BAD_AUTH
        assert metric(relay_exit.metrics, "relay_resumes_total", result="bad-auth") == 3
        assert metric(relay_exit.metrics, "relay_auth_failures_total", reason="resume-bad-mac") == 3
        # a join with the session key works, and the stream never noticed the attempts
        second = await HandCarrier.open(relay_exit.address, join=first)
        assert second.status == hl.OK and second.session_id == session_id
        assert len(relay_exit.sessions[session_id].conns) == 2
        assert await first.echo(1, b"after\n") == b"after\n"
        second.close()
    finally:
        first.close()


# -- bytes after the HELLO that are not this carrier's records ---------------------------------


def _sealer_at(key: bytes, sequence: int) -> seal.Sealer:
    sealer = seal.Sealer(key)
    sealer._seq = sequence
    return sealer


def junk(case: str, first: HandCarrier, second: HandCarrier) -> bytes:
    """What the second carrier gets instead of its next record (the first one's sequence
    numbers are left as they are: it goes on)."""
    assert first.sealer is not None and second.sealer is not None
    to_exit, to_worker = second.keys
    ping = [mux.encode_ping(7)]
    if case == "plain-frames":
        return mux.encode_ping(7)  # frames without the seal
    if case == "random":
        return os.urandom(64)
    if case == "exit-to-worker-key":
        return b"".join(_sealer_at(to_worker, second.sealer.sequence).seal(ping))
    if case == "other-carrier-record":  # the first carrier's next record, sent on this one
        return b"".join(_sealer_at(first.keys[0], first.sealer.sequence).seal(ping))
    if case == "replayed-record":
        record = second.sealed(mux.encode_ping(7))
        second.send_raw(record)  # fine the first time
        return record
    if case == "reordered-records":
        one, two = second.sealed(mux.encode_ping(1)), second.sealed(mux.encode_ping(2))
        return two + one
    if case == "skipped-record":
        return b"".join(_sealer_at(to_exit, second.sealer.sequence + 1).seal(ping))
    if case == "sealed-garbage":
        return second.sealed(b"\xee" + bytes(20))  # authentic, but not a frame
    if case == "malformed-open":  # an OPEN whose address is not a SOCKS5 address
        return second.sealed(struct.pack("!BII", mux.OPEN, 9, 7) + b"\x09" + bytes(6))
    if case == "bad-frame-length":
        return second.sealed(struct.pack("!BII", mux.PING, 0, 9) + bytes(9))
    assert case == "oversized-record"
    return struct.pack("!I", seal.MAX_RECORD + seal.TAG_SIZE + 1)


@pytest.mark.parametrize(
    "case",
    [
        "plain-frames",
        "random",
        "exit-to-worker-key",
        "other-carrier-record",
        "replayed-record",
        "reordered-records",
        "skipped-record",
        "sealed-garbage",
        "malformed-open",
        "bad-frame-length",
        "oversized-record",
    ],
)
async def test_junk_after_the_hello_closes_that_carrier_only(
    echo_exit: tuple[RelayExit, int], case: str
) -> None:
    """Nobody on the path (nor a worker) can inject, replay or reorder a record: the carrier
    it arrives on is closed and counted; the session's streams go on on its other carrier."""
    relay_exit, port = echo_exit
    first = await HandCarrier.open(relay_exit.address)
    second = await HandCarrier.open(relay_exit.address, join=first)
    try:
        first.open_stream(1, "127.0.0.1", port, b"one\n")
        assert await first.read(1, 4) == b"one\n"
        second.send_raw(junk(case, first, second))
        assert await second.closed_by_exit()
        assert metric(relay_exit.metrics, "relay_protocol_errors_total", stage="carrier") == 1
        session = relay_exit.sessions[first.session_id]
        assert len(session.conns) == 1 and not session.ended
        assert await first.echo(1, b"two\n") == b"two\n"
    finally:
        first.close()
        second.close()


# -- frames that break one stream ----------------------------------------------------------------


@pytest.mark.parametrize("case", ["data-gap", "ack-beyond-sent", "fin-before-data", "reply"])
async def test_a_frame_that_breaks_a_stream_resets_that_stream_only(
    echo_exit: tuple[RelayExit, int], case: str
) -> None:
    """Offsets that cannot be right reset their stream (RST protocol-error both ways, counted);
    the carrier and the session's other streams go on. A frame only an exit sends (REPLY)
    breaks the carrier instead: the worker is not following the protocol at all."""
    relay_exit, port = echo_exit
    carrier = await HandCarrier.open(relay_exit.address)
    spare = await HandCarrier.open(relay_exit.address, join=carrier)
    try:
        for sid in (1, 3):
            carrier.open_stream(sid, "127.0.0.1", port, b"hi\n")
            assert await carrier.read(sid, 3) == b"hi\n"
        bad = {
            "data-gap": mux.data_header(1, 10, 3) + b"gap",  # 3 bytes sent so far, not 10
            "ack-beyond-sent": mux.encode_ack(1, 1000),  # the exit sent 3
            "fin-before-data": mux.encode_fin(1, 1),  # FIN at 1 after 3 bytes
            "reply": mux.encode_reply(1, 0, b"\x01\0\0\0\0\0\0"),
        }[case]
        carrier.send(bad)
        if case == "reply":
            assert await carrier.closed_by_exit()
            assert metric(relay_exit.metrics, "relay_protocol_errors_total", stage="carrier") == 1
            for sid in (1, 3):  # the streams move to the session's other carrier
                spare.send(mux.encode_sync(sid, carrier.received[sid], False))
                spare.sent[sid], spare.received[sid] = carrier.sent[sid], carrier.received[sid]
                assert await spare.echo(sid, b"moved\n") == b"moved\n"
            return
        reset = await carrier.expect(lambda f: isinstance(f, mux.Reset) and f.stream == 1)
        assert isinstance(reset, mux.Reset) and reset.code == mux.RST_PROTOCOL, reset
        assert await carrier.echo(3, b"still\n") == b"still\n"
        assert not carrier.closed
        assert metric(relay_exit.metrics, "relay_streams_total", result="protocol-error") == 1
        assert metric(relay_exit.metrics, "relay_protocol_errors_total", stage="stream") == 1
        assert metric(relay_exit.metrics, "relay_protocol_errors_total", stage="carrier") == 0
    finally:
        carrier.close()
        spare.close()


# -- plain SOCKS5 ----------------------------------------------------------------------------------


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
