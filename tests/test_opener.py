"""Tests for the worker's carrier opening handshake (:mod:`relay.proto.opener`).

The exit is played by a real :class:`Socks5Server` with the HELLO functions, as in the exit.
"""

from __future__ import annotations

from typing import Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.proto import ProtocolError
from relay.proto import frames as fr
from relay.proto import hello as hl
from relay.proto import socks5 as s5
from relay.proto.opener import (
    AuthFailed,
    Connected,
    Established,
    KeptWarm,
    Refused,
    TunnelOpener,
)

SECRET = b"s" * 32
KEY_ID = "worker-1"
NOW_MS = 1_700_000_000_000
NONCE = bytes(range(16))
SESSION = bytes(range(16, 32))
EXIT_NONCE = bytes(range(32, 48))
EXIT_TS = NOW_MS + 40
HB = 25000


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


def new_opener(destination: tuple[str, int] = ("collector.example.org", 9618)) -> TunnelOpener:
    return TunnelOpener(
        key=SECRET,
        key_id=KEY_ID,
        now_ms=NOW_MS,
        nonce=NONCE,
        heartbeat_ms=HB,
        destination=destination,
    )


class FakeExit:
    """The exit's handshake: Socks5Server + decode/verify HELLO + signed reply + CONNECT reply."""

    def __init__(
        self,
        *,
        secrets: Optional[dict[str, bytes]] = None,
        sign_with: Optional[bytes] = None,
        method: int = hl.METHOD_TUNNEL,
        status: int = hl.OK,
        connect_code: int = s5.SUCCEEDED,
        recv_offset: int = 0,
        early_data: bytes = b"",
        hello_mac_override: Optional[bytes] = None,
    ) -> None:
        self.server = s5.Socks5Server({hl.METHOD_TUNNEL: hl.decode_hello})
        self.secrets = secrets if secrets is not None else {KEY_ID: SECRET}
        self.sign_with = sign_with
        self.method = method
        self.status = status
        self.connect_code = connect_code
        self.recv_offset = recv_offset
        self.early_data = early_data
        self.hello_mac_override = hello_mac_override
        self.hello: Optional[hl.Hello] = None
        self.request: Optional[s5.Request] = None

    def answer(self, flight: bytes) -> bytes:
        out = bytearray()
        pending = self.server.receive(flight)
        while pending:
            event = pending.pop(0)
            if isinstance(event, s5.Greeting):
                assert event.methods == bytes([hl.METHOD_TUNNEL])
                out += self.server.select_method(self.method)
                if self.method == s5.NO_ACCEPTABLE:
                    return bytes(out)
            elif isinstance(event, s5.SubNegotiation):
                hello = event.message
                assert isinstance(hello, hl.Hello)
                self.hello = hello
                key = self.secrets[hello.key_id]
                ok = hl.verify_hello(hello, key) and self.status == hl.OK
                mac = self.hello_mac_override or hello.mac
                if ok:
                    out += hl.encode_reply(
                        self.sign_with or key,
                        mac,
                        hl.OK,
                        hello.session_id if hello.is_resume else SESSION,
                        self.recv_offset,
                        HB,
                        EXIT_NONCE,
                        EXIT_TS,
                    )
                else:
                    out += hl.encode_reply(None, mac, self.status or hl.BAD_AUTH)
                self.server.subnegotiation_done(ok)
                if not ok or hello.is_resume:
                    return bytes(out)
            else:
                assert isinstance(event, s5.Request)
                self.request = event
                out += self.server.reply(self.connect_code, "10.1.2.3", 40000)
                out += self.early_data
                return bytes(out)
            pending += self.server.receive()
        return bytes(out)


LATE = fr.encode(fr.Data(b"late")) + fr.encode_ack(0)


def assert_done(opener: TunnelOpener, trailing: bytes = b"") -> None:
    """The handshake is over: later bytes give no events and belong to the data phase."""
    assert opener.receive(LATE) == []
    assert opener.trailing() == trailing + LATE
    assert opener.trailing() == b""


def run(opener: TunnelOpener, answer: bytes, cuts: Optional[list[int]] = None) -> list:
    events: list = []
    for chunk in split_at(answer, cuts or []):
        events += opener.receive(chunk)
    return events


# ---------------------------------------------------------------------------------------------
# new session


def test_first_flight_is_greeting_hello_connect() -> None:
    opener = new_opener()
    flight = opener.first_flight()
    hello = hl.encode_hello(SECRET, KEY_ID, NOW_MS, NONCE, hl.NEW_SESSION, 0, HB)
    connect = s5.Socks5Client.request(s5.CMD_CONNECT, "collector.example.org", 9618)
    assert flight == b"\x05\x01\x80" + hello + connect


def test_new_session_established_then_connected() -> None:
    opener = new_opener()
    exit_ = FakeExit(early_data=b"")
    answer = exit_.answer(opener.first_flight())
    assert exit_.hello is not None and not exit_.hello.is_resume
    assert exit_.request == s5.Request(s5.CMD_CONNECT, "collector.example.org", 9618, 3)
    assert not opener.is_resume
    events = opener.receive(answer)
    skey = hl.session_key(SECRET, NONCE, EXIT_NONCE, SESSION)
    assert events == [
        Established(SESSION, skey, HB, 0, EXIT_TS),
        Connected(s5.SUCCEEDED, "10.1.2.3", 40000),
    ]
    assert opener.established == events[0]
    assert_done(opener)
    # The exit derives the same session key from what it saw.
    assert exit_.hello is not None
    assert hl.session_key(SECRET, exit_.hello.nonce, EXIT_NONCE, SESSION) == skey


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(0, 2**31), max_size=12),
    st.binary(max_size=64),
    st.sampled_from([s5.SUCCEEDED, s5.CONNECTION_REFUSED, s5.HOST_UNREACHABLE, s5.NOT_ALLOWED]),
)
def test_new_session_any_split(cuts: list[int], early: bytes, code: int) -> None:
    opener = new_opener()
    answer = FakeExit(connect_code=code, early_data=early).answer(opener.first_flight())
    events = run(opener, answer, cuts)
    assert [type(e) for e in events] == [Established, Connected]
    assert events[1] == Connected(code, "10.1.2.3", 40000)
    assert_done(opener, early)


def test_established_before_connect_reply_arrives() -> None:
    opener = new_opener()
    answer = FakeExit().answer(opener.first_flight())
    events = opener.receive(answer[: 2 + hl.REPLY_SIZE])
    assert [type(e) for e in events] == [Established]
    assert opener.trailing() == b""
    assert opener.receive(answer[2 + hl.REPLY_SIZE :]) == [
        Connected(s5.SUCCEEDED, "10.1.2.3", 40000)
    ]
    assert_done(opener)


def test_trailing_data_frames_after_connect_reply() -> None:
    opener = new_opener(("192.0.2.9", 22))
    data = fr.encode(fr.Data(b"SSH-2.0-OpenSSH\r\n")) + fr.encode_ping(7)
    answer = FakeExit(early_data=data).answer(opener.first_flight())
    assert [type(e) for e in opener.receive(answer)] == [Established, Connected]
    assert opener.trailing() == data


def test_ipv6_destination() -> None:
    opener = new_opener(("2001:db8::5", 443))
    exit_ = FakeExit()
    exit_.answer(opener.first_flight())
    assert exit_.request == s5.Request(s5.CMD_CONNECT, "2001:db8::5", 443, s5.ATYP_IPV6)


# ---------------------------------------------------------------------------------------------
# refusals and authentication failures


@pytest.mark.parametrize(
    "status", [hl.FAILURE, hl.BAD_AUTH, hl.CLOCK_SKEW, hl.REPLAY, hl.UNKNOWN_SESSION, hl.BUSY]
)
def test_refused_hello(status: int) -> None:
    opener = new_opener()
    answer = FakeExit(status=status).answer(opener.first_flight())
    assert opener.receive(answer) == [Refused("hello", status)]
    assert opener.established is None
    assert_done(opener)


def test_hello_with_unknown_secret_is_refused_by_the_exit() -> None:
    opener = new_opener()
    answer = FakeExit(secrets={KEY_ID: b"other" * 8}).answer(opener.first_flight())
    assert opener.receive(answer) == [Refused("hello", hl.BAD_AUTH)]


def test_method_refused() -> None:
    opener = new_opener()
    answer = FakeExit(method=s5.NO_ACCEPTABLE).answer(opener.first_flight())
    assert answer == b"\x05\xff"
    assert opener.receive(answer) == [Refused("method", hl.BAD_AUTH)]
    assert opener.established is None
    assert_done(opener)


def test_method_not_offered_is_a_protocol_error() -> None:
    opener = new_opener()
    with pytest.raises(ProtocolError):
        opener.receive(b"\x05\x00")


def test_reply_signed_with_wrong_key_fails_authentication() -> None:
    opener = new_opener()
    answer = FakeExit(sign_with=b"x" * 32).answer(opener.first_flight())
    with pytest.raises(AuthFailed) as info:
        opener.receive(answer)
    assert isinstance(info.value, ProtocolError)
    assert opener.established is None


def test_reply_recorded_for_another_hello_fails_authentication() -> None:
    opener = new_opener()
    answer = FakeExit(hello_mac_override=bytes(32)).answer(opener.first_flight())
    with pytest.raises(AuthFailed):
        opener.receive(answer)


def test_unauthenticated_ok_reply_fails_authentication() -> None:
    opener = new_opener()
    hello_mac = hl.encode_hello(SECRET, KEY_ID, NOW_MS, NONCE, hl.NEW_SESSION, 0, HB)[-32:]
    assert hello_mac in opener.first_flight()
    forged = hl.encode_reply(None, hello_mac, hl.OK, SESSION, 0, HB, EXIT_NONCE, EXIT_TS)
    with pytest.raises(AuthFailed):
        opener.receive(b"\x05\x80" + forged)


def test_garbage_reply_raises_protocol_error() -> None:
    opener = new_opener()
    with pytest.raises(ProtocolError):
        opener.receive(b"\x05\x80\x07" + bytes(100))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=150), st.booleans())
def test_arbitrary_answers_raise_only_protocol_error(blob: bytes, prefix: bool) -> None:
    opener = new_opener()
    try:
        opener.receive((b"\x05\x80" if prefix else b"") + blob)
    except ProtocolError:
        return
    opener.trailing()


# ---------------------------------------------------------------------------------------------
# resume


def resume_opener(recv_offset: int = 1234) -> tuple[TunnelOpener, bytes]:
    skey = hl.session_key(SECRET, NONCE, EXIT_NONCE, SESSION)
    opener = TunnelOpener(
        key=skey,
        key_id=KEY_ID,
        now_ms=NOW_MS + 60_000,
        nonce=bytes(range(100, 116)),
        heartbeat_ms=HB,
        session_id=SESSION,
        recv_offset=recv_offset,
    )
    return opener, skey


def test_resume_first_flight_has_no_connect() -> None:
    opener, skey = resume_opener()
    flight = opener.first_flight()
    hello = hl.encode_hello(
        skey, KEY_ID, NOW_MS + 60_000, bytes(range(100, 116)), SESSION, 1234, HB
    )
    assert flight == b"\x05\x01\x80" + hello


def test_resume_established_only_and_done() -> None:
    opener, skey = resume_opener()
    exit_ = FakeExit(secrets={KEY_ID: skey}, recv_offset=777)
    answer = exit_.answer(opener.first_flight())
    assert exit_.hello is not None
    assert exit_.hello.is_resume
    assert exit_.hello.recv_offset == 1234
    assert exit_.request is None
    assert opener.is_resume
    events = opener.receive(answer)
    assert events == [Established(SESSION, skey, HB, 777, EXIT_TS)]
    assert opener.established == events[0]
    assert_done(opener)


def test_resume_rejects_a_reply_signed_with_the_long_term_secret() -> None:
    opener, skey = resume_opener()
    answer = FakeExit(secrets={KEY_ID: skey}, sign_with=SECRET).answer(opener.first_flight())
    with pytest.raises(AuthFailed):
        opener.receive(answer)


def test_resume_unknown_session_refused() -> None:
    opener, skey = resume_opener()
    answer = FakeExit(secrets={KEY_ID: skey}, status=hl.UNKNOWN_SESSION).answer(
        opener.first_flight()
    )
    assert opener.receive(answer) == [Refused("hello", hl.UNKNOWN_SESSION)]
    assert_done(opener)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(0, 2**31), max_size=10),
    st.lists(
        st.one_of(
            st.binary(min_size=1, max_size=50).map(lambda b: fr.encode(fr.Data(b))),
            st.integers(0, 2**40).map(fr.encode_ack),
            st.integers(0, 2**40).map(fr.encode_fin),
            st.integers(0, 2**40).map(fr.encode_ping),
        ),
        max_size=4,
    ),
)
def test_resume_data_phase_bytes_come_out_of_trailing(cuts: list[int], frames: list[bytes]) -> None:
    """The exit replays its unacknowledged bytes right after its reply, maybe in one segment."""
    opener, skey = resume_opener()
    answer = FakeExit(secrets={KEY_ID: skey}).answer(opener.first_flight())
    data = b"".join(frames)
    events = run(opener, answer + data, cuts)
    assert events == [Established(SESSION, skey, HB, 0, EXIT_TS)]
    assert_done(opener, data)


# ---------------------------------------------------------------------------------------------
# arguments


def test_new_session_needs_a_destination_and_resume_must_not_have_one() -> None:
    with pytest.raises(ValueError):
        TunnelOpener(key=SECRET, key_id=KEY_ID, now_ms=NOW_MS, nonce=NONCE, heartbeat_ms=HB)
    with pytest.raises(ValueError):
        TunnelOpener(
            key=SECRET,
            key_id=KEY_ID,
            now_ms=NOW_MS,
            nonce=NONCE,
            heartbeat_ms=HB,
            destination=("example.org", 80),
            session_id=SESSION,
        )


# ---------------------------------------------------------------------------------------------
# warm carriers


def warm_opener() -> TunnelOpener:
    return TunnelOpener(
        key=SECRET, key_id=KEY_ID, now_ms=NOW_MS, nonce=NONCE, heartbeat_ms=HB, warm=True
    )


class WarmExit:
    """The exit's side of a warm carrier, fed the worker's bytes in pieces."""

    def __init__(self, connect_code: int = s5.SUCCEEDED, early_data: bytes = b"") -> None:
        self.server = s5.Socks5Server({hl.METHOD_TUNNEL: hl.decode_hello})
        self.connect_code = connect_code
        self.early_data = early_data
        self.keep_warms = 0
        self.request: Optional[s5.Request] = None

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        pending = self.server.receive(data)
        while pending:
            event = pending.pop(0)
            if isinstance(event, s5.Greeting):
                out += self.server.select_method(hl.METHOD_TUNNEL)
            elif isinstance(event, s5.SubNegotiation):
                hello = event.message
                assert isinstance(hello, hl.Hello) and hl.verify_hello(hello, SECRET)
                out += hl.encode_reply(
                    SECRET, hello.mac, hl.OK, SESSION, 0, HB, EXIT_NONCE, EXIT_TS
                )
                self.server.subnegotiation_done(True)
            else:
                assert isinstance(event, s5.Request)
                if event.command == s5.CMD_KEEP_WARM:
                    assert (event.host, event.port, event.atyp) == ("0.0.0.0", 0, s5.ATYP_IPV4)
                    self.keep_warms += 1
                    out += self.server.keep_warm_reply()
                else:
                    self.request = event
                    out += self.server.reply(self.connect_code, "10.1.2.3", 40000)
                    out += self.early_data
                    return bytes(out)
            pending += self.server.receive()
        return bytes(out)


def test_warm_first_flight_is_greeting_hello_keep_warm() -> None:
    flight = warm_opener().first_flight()
    hello = hl.encode_hello(SECRET, KEY_ID, NOW_MS, NONCE, hl.NEW_SESSION, 0, HB)
    assert flight == b"\x05\x01\x80" + hello + bytes.fromhex("05800001000000000000")
    assert bytes.fromhex("05800001000000000000") == s5.KEEP_WARM
    assert bytes.fromhex("05000001000000000000") == s5.KEEP_WARM_REPLY


def test_warm_carrier_keeps_warm_then_connects() -> None:
    opener = warm_opener()
    exit_ = WarmExit()
    answer = exit_.feed(opener.first_flight(now=10.0))
    events = opener.receive(answer, now=10.25)
    skey = hl.session_key(SECRET, NONCE, EXIT_NONCE, SESSION)
    assert events == [Established(SESSION, skey, HB, 0, EXIT_TS), KeptWarm(0, 0.25)]
    assert opener.usable
    assert opener.receive(exit_.feed(opener.keep_warm(now=35.0)), now=35.5) == [KeptWarm(0, 0.5)]
    answer = exit_.feed(opener.request("collector.example.org", 9618))
    assert exit_.request == s5.Request(s5.CMD_CONNECT, "collector.example.org", 9618, 3)
    assert exit_.keep_warms == 2
    assert opener.receive(answer) == [Connected(s5.SUCCEEDED, "10.1.2.3", 40000)]
    assert not opener.usable
    assert_done(opener)
    with pytest.raises(RuntimeError):
        opener.keep_warm(40.0)
    with pytest.raises(RuntimeError):
        opener.request("x", 1)


@settings(max_examples=150, deadline=None)
@given(
    st.integers(0, 6),
    st.integers(0, 6),
    st.lists(st.integers(0, 2**31), max_size=12),
    st.lists(st.integers(0, 2**31), max_size=12),
    st.binary(max_size=64),
    st.sampled_from([s5.SUCCEEDED, s5.CONNECTION_REFUSED, s5.NOT_ALLOWED]),
)
def test_warm_any_split_and_any_pipelining(
    answered: int, pipelined: int, wcuts: list[int], cuts: list[int], early: bytes, code: int
) -> None:
    """Keep-warms answered one by one, then more sent together with the CONNECT before their
    replies come back; both byte streams split anywhere: every reply is matched in order."""
    opener = warm_opener()
    exit_ = WarmExit(connect_code=code, early_data=early)
    events: list = []
    events += opener.receive(exit_.feed(opener.first_flight(now=0.0)), now=1.0)
    for i in range(answered):
        events += opener.receive(
            exit_.feed(opener.keep_warm(now=10.0 * (i + 1))), now=10.0 * i + 12
        )
    flight = b"".join(opener.keep_warm(now=100.0) for _ in range(pipelined))
    flight += opener.request("192.0.2.7", 443)
    answer = b"".join(exit_.feed(chunk) for chunk in split_at(flight, wcuts))
    for chunk in split_at(answer, cuts):
        events += opener.receive(chunk, now=101.0)
    assert exit_.keep_warms == 1 + answered + pipelined
    assert exit_.request == s5.Request(s5.CMD_CONNECT, "192.0.2.7", 443, s5.ATYP_IPV4)
    assert type(events[0]) is Established
    assert (
        events[1:-1]
        == [KeptWarm(0, 1.0)] + [KeptWarm(0, 2.0)] * answered + [KeptWarm(0, 1.0)] * pipelined
    )
    assert events[-1] == Connected(code, "10.1.2.3", 40000)
    assert_done(opener, early)


@pytest.mark.parametrize("code", [s5.GENERAL_FAILURE, s5.COMMAND_NOT_SUPPORTED])
def test_keep_warm_refused_ends_the_opener(code: int) -> None:
    """A full warm limit (01) or an exit that does not know keep-warm (07)."""
    opener = warm_opener()
    answer = FakeExit(connect_code=code).answer(opener.first_flight(now=1.0))
    events = opener.receive(answer, now=2.0)
    assert [type(e) for e in events] == [Established, KeptWarm]
    assert events[1].code == code
    assert not opener.usable
    with pytest.raises(RuntimeError):
        opener.request("192.0.2.7", 443)


def test_warm_reply_to_no_request_is_a_protocol_error() -> None:
    opener = warm_opener()
    answer = WarmExit().feed(opener.first_flight())
    with pytest.raises(ProtocolError):
        opener.receive(answer + s5.KEEP_WARM_REPLY)


def test_keep_warm_reply_with_an_address_is_a_protocol_error() -> None:
    opener = warm_opener()
    answer = WarmExit().feed(opener.first_flight())
    answer = answer[: -len(s5.KEEP_WARM_REPLY)] + bytes.fromhex("05000001c000020701bb")
    with pytest.raises(ProtocolError):
        opener.receive(answer)


def test_warm_opener_misuse() -> None:
    with pytest.raises(ValueError):
        TunnelOpener(
            key=SECRET, key_id=KEY_ID, now_ms=NOW_MS, nonce=NONCE, heartbeat_ms=HB,
            destination=("x", 1), warm=True,
        )  # fmt: skip
    with pytest.raises(ValueError):
        TunnelOpener(
            key=SECRET, key_id=KEY_ID, now_ms=NOW_MS, nonce=NONCE, heartbeat_ms=HB,
            session_id=SESSION, warm=True,
        )  # fmt: skip
    with pytest.raises(RuntimeError):
        warm_opener().keep_warm(0.0)  # before the first flight
    with pytest.raises(RuntimeError):
        new_opener().first_flight() and new_opener().request("x", 1)
