"""Tests for the sans-IO SOCKS5 codec (:mod:`relay.proto.socks5`), RFC 1928 and RFC 1929."""

from __future__ import annotations

import ipaddress
import random
from typing import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.proto import ProtocolError
from relay.proto import hello as hl
from relay.proto import socks5 as s5

# ---------------------------------------------------------------------------------------------
# helpers


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


def expected_host(host: str) -> str:
    """What the far side decodes for ``host`` as written by :func:`s5.encode_address`."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    return str(ipaddress.ip_address(ip.packed))


Decide = Callable[[s5.Socks5Server, s5.Event], bytes]


def drive_server(
    server: s5.Socks5Server, chunks: list[bytes], decide: Decide
) -> tuple[list[s5.Event], bytes]:
    """Feed ``chunks``; answer each event with ``decide`` as soon as it comes out."""
    events: list[s5.Event] = []
    answers = bytearray()
    for chunk in chunks:
        pending = server.receive(chunk)
        while pending:
            event = pending.pop(0)
            events.append(event)
            answers += decide(server, event)
            if server.state == "closed":
                return events, bytes(answers)
            pending += server.receive()
    return events, bytes(answers)


def accept_all(server: s5.Socks5Server, event: s5.Event) -> bytes:
    if isinstance(event, s5.Greeting):
        for method in (0x80, s5.USERPASS, s5.NO_AUTH):
            if method in event.methods:
                return server.select_method(method)
        return server.select_method(s5.NO_ACCEPTABLE)
    if isinstance(event, s5.UserPass):
        return server.auth_reply(True)
    if isinstance(event, s5.SubNegotiation):
        server.subnegotiation_done(True)
        return b"<subneg-answer>"
    assert isinstance(event, s5.Request)
    return server.reply(s5.SUCCEEDED, "10.0.0.1", 1080)


# Strategies ---------------------------------------------------------------------------------

domains = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=255
)
hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    domains,
)
ports = st.integers(0, 65535)
credentials = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=80
).filter(lambda s: len(s.encode("utf-8")) <= 255)
commands = st.sampled_from([s5.CMD_CONNECT, s5.CMD_BIND, s5.CMD_UDP_ASSOCIATE])
cuts_strategy = st.lists(st.integers(0, 2**31), max_size=20)


# ---------------------------------------------------------------------------------------------
# encode_address


@pytest.mark.parametrize(
    ("host", "port", "wire"),
    [
        ("127.0.0.1", 80, b"\x01\x7f\x00\x00\x01\x00\x50"),
        ("0.0.0.0", 0, b"\x01\x00\x00\x00\x00\x00\x00"),
        ("::1", 443, b"\x04" + bytes(15) + b"\x01\x01\xbb"),
        (
            "2001:db8::7",
            65535,
            b"\x04\x20\x01\x0d\xb8" + bytes(10) + b"\x00\x07\xff\xff",
        ),
        ("example.com", 443, b"\x03\x0bexample.com\x01\xbb"),
        ("b\u00fccher.de", 80, b"\x03\x10xn--bcher-kva.de\x00\x50"),
        ("a" * 255, 1, b"\x03\xff" + b"a" * 255 + b"\x00\x01"),
    ],
)
def test_encode_address(host: str, port: int, wire: bytes) -> None:
    assert s5.encode_address(host, port) == wire


@pytest.mark.parametrize("host", ["", "a" * 256])
def test_encode_address_rejects_bad_domain_length(host: str) -> None:
    with pytest.raises(ValueError):
        s5.encode_address(host, 80)


# decode_address: the destination of an OPEN frame, the bound address of a REPLY


@given(hosts, ports)
def test_decode_address_round_trip(host: str, port: int) -> None:
    raw = s5.encode_address(host, port)
    if raw[0] == s5.ATYP_DOMAIN and any(c < 0x21 or c == 0x7F for c in raw[2:-2]):
        return  # names the decoder refuses (next test)
    assert s5.decode_address(raw) == (expected_host(host), port, raw[0])


@pytest.mark.parametrize(
    ("raw", "reply"),
    [
        (b"", s5.ADDRESS_TYPE_NOT_SUPPORTED),
        (b"\x01\x7f\x00\x00\x01\x00", s5.ADDRESS_TYPE_NOT_SUPPORTED),  # one port byte short
        (b"\x01\x7f\x00\x00\x01\x00\x50\x00", s5.ADDRESS_TYPE_NOT_SUPPORTED),  # one too many
        (b"\x03\x00\x00\x50", s5.HOST_UNREACHABLE),  # empty name
        (b"\x03\x03a b\x00\x50", s5.HOST_UNREACHABLE),  # a space in the name
        (b"\x03\x02\xc3\xbc\x00\x50", s5.HOST_UNREACHABLE),  # not ASCII
        (b"\x05" + bytes(6), s5.ADDRESS_TYPE_NOT_SUPPORTED),  # unknown ATYP
    ],
)
def test_decode_address_refuses_with_the_reply_to_send(raw: bytes, reply: int) -> None:
    with pytest.raises(s5.Socks5Error) as info:
        s5.decode_address(raw)
    assert info.value.reply == reply


@given(st.binary(max_size=300))
def test_decode_address_arbitrary_bytes_raise_only_socks5_error(raw: bytes) -> None:
    try:
        host, port, atyp = s5.decode_address(raw)
    except s5.Socks5Error as exc:
        assert exc.reply in s5.REPLY_NAMES
        return
    assert atyp in (s5.ATYP_IPV4, s5.ATYP_DOMAIN, s5.ATYP_IPV6) and 0 <= port <= 65535
    assert host.isascii() and host.isprintable() and " " not in host


# ---------------------------------------------------------------------------------------------
# server: RFC 1928 / RFC 1929 byte vectors


def test_server_no_auth_connect_ipv4() -> None:
    server = s5.Socks5Server()
    assert server.state == "greeting"
    assert server.receive(b"\x05\x01\x00") == [s5.Greeting(b"\x00")]
    assert server.state == "choose-method"
    assert server.select_method(s5.NO_AUTH) == b"\x05\x00"
    assert server.method == s5.NO_AUTH
    assert server.state == "request"
    assert server.receive(b"\x05\x01\x00\x01\xc0\x00\x02\x01\x1f\x90") == [
        s5.Request(s5.CMD_CONNECT, "192.0.2.1", 8080, s5.ATYP_IPV4)
    ]
    assert server.state == "reply"
    assert server.reply(s5.SUCCEEDED, "10.0.0.1", 1080) == (
        b"\x05\x00\x00\x01\x0a\x00\x00\x01\x04\x38"
    )
    assert server.state == "done"
    assert server.trailing() == b""


def test_server_ipv6_and_domain_requests() -> None:
    v6 = bytes.fromhex("20010db8000000000000000000000001")
    for wire, request in [
        (b"\x05\x01\x00\x04" + v6 + b"\x01\xbb", s5.Request(1, "2001:db8::1", 443, 4)),
        (b"\x05\x01\x00\x03\x0bexample.com\x00\x50", s5.Request(1, "example.com", 80, 3)),
        (b"\x05\x01\x00\x03\x01x\xff\xff", s5.Request(1, "x", 65535, 3)),
    ]:
        server = s5.Socks5Server()
        server.receive(b"\x05\x01\x00")
        server.select_method(s5.NO_AUTH)
        assert server.receive(wire) == [request]


def test_server_reply_address_types() -> None:
    for host, tail in [
        ("2001:db8::1", b"\x04" + bytes.fromhex("20010db8000000000000000000000001") + b"\x00\x16"),
        ("relay.example", b"\x03\x0drelay.example\x00\x16"),
    ]:
        server = s5.Socks5Server()
        server.receive(b"\x05\x01\x00")
        server.select_method(s5.NO_AUTH)
        server.receive(b"\x05\x01\x00\x01\x01\x02\x03\x04\x00\x16")
        assert server.reply(s5.SUCCEEDED, host, 22) == b"\x05\x00\x00" + tail


def test_server_userpass() -> None:
    server = s5.Socks5Server()
    assert server.receive(b"\x05\x02\x00\x02") == [s5.Greeting(b"\x00\x02")]
    assert server.select_method(s5.USERPASS) == b"\x05\x02"
    assert server.state == "userpass"
    assert server.receive(b"\x01\x04user\x06s3cr3t") == [s5.UserPass("user", "s3cr3t")]
    assert server.state == "auth-decide"
    assert server.auth_reply(True) == b"\x01\x00"
    assert server.state == "request"


def test_server_userpass_utf8_and_rejection() -> None:
    server = s5.Socks5Server()
    server.receive(b"\x05\x01\x02")
    server.select_method(s5.USERPASS)
    user = "j\u00fcrgen".encode()
    assert server.receive(b"\x01" + bytes([len(user)]) + user + b"\x01p") == [
        s5.UserPass("j\u00fcrgen", "p")
    ]
    assert server.auth_reply(False) == b"\x01\x01"
    assert server.state == "closed"
    with pytest.raises(ProtocolError):
        server.receive(b"\x05\x01\x00\x01\x01\x02\x03\x04\x00\x16")


def test_server_no_acceptable_method() -> None:
    server = s5.Socks5Server()
    assert server.receive(b"\x05\x01\x02") == [s5.Greeting(b"\x02")]
    assert server.select_method(s5.NO_ACCEPTABLE) == b"\x05\xff"
    assert server.state == "closed"
    with pytest.raises(ProtocolError):
        server.receive(b"\x01\x01a\x01b")


@pytest.mark.parametrize("command", [s5.CMD_BIND, s5.CMD_UDP_ASSOCIATE, 0x09])
def test_server_other_commands_parse_as_requests(command: int) -> None:
    server = s5.Socks5Server()
    server.receive(b"\x05\x01\x00")
    server.select_method(s5.NO_AUTH)
    wire = bytes([5, command, 0]) + b"\x01\x00\x00\x00\x00\x00\x00"
    assert server.receive(wire) == [s5.Request(command, "0.0.0.0", 0, s5.ATYP_IPV4)]
    assert server.reply(s5.COMMAND_NOT_SUPPORTED) == b"\x05\x07\x00\x01" + bytes(6)
    assert server.state == "closed"


@pytest.mark.parametrize("first", [b"\x04", b"\x00", b"\x04\x01\x00", b"GET / HTTP/1.1\r\n"])
def test_server_bad_greeting_version(first: bytes) -> None:
    with pytest.raises(s5.Socks5Error):
        s5.Socks5Server().receive(first)


@pytest.mark.parametrize("wire", [b"\x04", b"\x04\x01\x00\x01", b"\x00\x01\x00\x01" + bytes(6)])
def test_server_bad_request_version(wire: bytes) -> None:
    server = s5.Socks5Server()
    server.receive(b"\x05\x01\x00")
    server.select_method(s5.NO_AUTH)
    with pytest.raises(s5.Socks5Error):
        server.receive(wire)


def test_server_bad_userpass_version() -> None:
    server = s5.Socks5Server()
    server.receive(b"\x05\x01\x02")
    server.select_method(s5.USERPASS)
    with pytest.raises(s5.Socks5Error):
        server.receive(b"\x05\x01a\x01b")


@pytest.mark.parametrize("atyp", [0x00, 0x02, 0x05, 0xFF])
@pytest.mark.parametrize("split", [False, True])
def test_server_bad_atyp_leaves_a_reply_due(atyp: int, split: bool) -> None:
    server = s5.Socks5Server()
    server.receive(b"\x05\x01\x00")
    server.select_method(s5.NO_AUTH)
    wire = bytes([5, 1, 0, atyp]) + bytes(6)
    if split:
        assert server.receive(wire[:3]) == []
    with pytest.raises(s5.Socks5Error) as info:
        server.receive(wire[3:] if split else wire)
    assert isinstance(info.value, ProtocolError)
    assert info.value.reply == s5.ADDRESS_TYPE_NOT_SUPPORTED
    assert server.state == "reply"
    assert server.reply(info.value.reply) == b"\x05\x08\x00\x01" + bytes(6)
    assert server.state == "closed"


@pytest.mark.parametrize(
    "address",
    [
        b"\x03\x00\x00\x50",  # empty name
        b"\x03\x03a\x00b\x00\x50",  # NUL
        b"\x03\x03a b\x00\x50",  # space
        b"\x03\x03a\x7fb\x00\x50",  # DEL
        b"\x03\x02\xc3\xbc\x00\x50",  # non-ASCII (UTF-8 u-umlaut)
        b"\x03\x03a\nb\x00\x50",  # newline (log injection)
    ],
)
def test_server_bad_domain_names(address: bytes) -> None:
    server = s5.Socks5Server()
    server.receive(b"\x05\x01\x00")
    server.select_method(s5.NO_AUTH)
    with pytest.raises(s5.Socks5Error) as info:
        server.receive(b"\x05\x01\x00" + address)
    assert info.value.reply == s5.HOST_UNREACHABLE
    assert server.state == "reply"
    assert server.reply(info.value.reply)[:2] == b"\x05\x04"


def test_server_waits_for_complete_messages() -> None:
    server = s5.Socks5Server()
    assert server.receive(b"\x05") == []
    assert server.receive(b"\x02\x00") == []
    assert server.receive(b"\x02") == [s5.Greeting(b"\x00\x02")]
    server.select_method(s5.USERPASS)
    for byte in b"\x01\x01u\x01":
        assert server.receive(bytes([byte])) == []
    assert server.receive(b"p") == [s5.UserPass("u", "p")]
    server.auth_reply(True)
    request = b"\x05\x01\x00\x03\x03abc\x00\x50"
    for i in range(len(request) - 1):
        assert server.receive(request[i : i + 1]) == []
    assert server.receive(request[-1:]) == [s5.Request(1, "abc", 80, 3)]


def test_server_stops_at_each_decision() -> None:
    """Pipelined bytes are held until the caller has answered the event before them."""
    server = s5.Socks5Server()
    flight = b"\x05\x01\x02" + b"\x01\x01u\x01p" + b"\x05\x01\x00\x01\x01\x02\x03\x04\x00\x50"
    assert server.receive(flight) == [s5.Greeting(b"\x02")]
    assert server.receive() == []  # still waiting for select_method
    server.select_method(s5.USERPASS)
    assert server.receive() == [s5.UserPass("u", "p")]
    assert server.receive() == []
    server.auth_reply(True)
    assert server.receive() == [s5.Request(1, "1.2.3.4", 80, 1)]


def test_server_decisions_out_of_order_raise() -> None:
    server = s5.Socks5Server()
    with pytest.raises(RuntimeError):
        server.select_method(s5.NO_AUTH)
    with pytest.raises(RuntimeError):
        server.reply(s5.SUCCEEDED)
    with pytest.raises(RuntimeError):
        server.auth_reply(True)
    with pytest.raises(RuntimeError):
        server.subnegotiation_done(True)
    server.receive(b"\x05\x01\x81")
    with pytest.raises(ValueError):
        server.select_method(0x81)  # no handler for it


def test_server_empty_method_list() -> None:
    server = s5.Socks5Server()
    assert server.receive(b"\x05\x00") == [s5.Greeting(b"")]
    assert server.select_method(s5.NO_ACCEPTABLE) == b"\x05\xff"


def test_server_trailing_bytes_after_reply() -> None:
    server = s5.Socks5Server()
    flight = b"\x05\x01\x00" + b"\x05\x01\x00\x01\x01\x02\x03\x04\x00\x50" + b"GET / HTTP/1.0"
    events, _ = drive_server(server, [flight], accept_all)
    assert events[-1] == s5.Request(1, "1.2.3.4", 80, 1)
    assert server.state == "done"
    assert server.receive(b"\r\n\r\n") == []
    assert server.trailing() == b"GET / HTTP/1.0\r\n\r\n"
    assert server.trailing() == b""


# ---------------------------------------------------------------------------------------------
# client: byte vectors


def test_client_encoders() -> None:
    client = s5.Socks5Client()
    assert client.greeting(b"\x00\x02") == b"\x05\x02\x00\x02"
    assert s5.Socks5Client.userpass("user", "pass") == b"\x01\x04user\x04pass"
    assert s5.Socks5Client.request(s5.CMD_CONNECT, "example.com", 443) == (
        b"\x05\x01\x00\x03\x0bexample.com\x01\xbb"
    )
    assert s5.Socks5Client.request(s5.CMD_BIND, "10.0.0.1", 21) == (
        b"\x05\x02\x00\x01\x0a\x00\x00\x01\x00\x15"
    )


@pytest.mark.parametrize(
    ("user", "password"), [("", "p"), ("u", ""), ("u" * 256, "p"), ("u", "\u00e9" * 128)]
)
def test_client_userpass_length_limits(user: str, password: str) -> None:
    with pytest.raises(ValueError):
        s5.Socks5Client.userpass(user, password)


@pytest.mark.parametrize("methods", [b"", bytes(256)])
def test_client_greeting_limits(methods: bytes) -> None:
    with pytest.raises(ValueError):
        s5.Socks5Client().greeting(methods)


def test_client_full_exchange() -> None:
    client = s5.Socks5Client()
    client.greeting(b"\x00\x02")
    assert client.receive(b"\x05") == []
    assert client.receive(b"\x02") == [s5.MethodSelected(s5.USERPASS)]
    assert client.method == s5.USERPASS
    assert client.state == "auth"
    assert client.receive(b"\x01\x00") == [s5.AuthReply(True)]
    assert client.state == "reply"
    v6 = bytes.fromhex("20010db8000000000000000000000001")
    assert client.receive(b"\x05\x00\x00\x04" + v6 + b"\x04\x38data") == [
        s5.Reply(s5.SUCCEEDED, "2001:db8::1", 1080)
    ]
    assert client.state == "done"
    assert client.receive(b"-more") == []
    assert client.trailing() == b"data-more"


def test_client_failure_reply_and_auth_failure() -> None:
    client = s5.Socks5Client()
    client.greeting(b"\x00")
    assert client.receive(b"\x05\x00\x05\x05\x00\x03\x04host\x00\x00") == [
        s5.MethodSelected(0),
        s5.Reply(s5.CONNECTION_REFUSED, "host", 0),
    ]
    client = s5.Socks5Client()
    client.greeting(b"\x02")
    assert client.receive(b"\x05\x02\x01\x01") == [s5.MethodSelected(2), s5.AuthReply(False)]
    assert client.state == "done"


def test_client_no_acceptable_method() -> None:
    client = s5.Socks5Client()
    client.greeting(b"\x02")
    assert client.receive(b"\x05\xff") == [s5.MethodSelected(s5.NO_ACCEPTABLE)]
    assert client.state == "done"


def test_client_rejects_method_not_offered() -> None:
    client = s5.Socks5Client()
    client.greeting(b"\x02")
    with pytest.raises(s5.Socks5Error):
        client.receive(b"\x05\x00")


@pytest.mark.parametrize("wire", [b"\x04\x00", b"\x00\x00"])
def test_client_bad_method_version(wire: bytes) -> None:
    client = s5.Socks5Client()
    client.greeting(b"\x00")
    with pytest.raises(s5.Socks5Error):
        client.receive(wire)


@pytest.mark.parametrize(
    "wire",
    [
        b"\x04\x00\x00\x01\x00\x00\x00\x00\x00\x00",  # version
        b"\x05\x00\x00\x07\x00\x00\x00\x00\x00\x00",  # ATYP
        b"\x05\x00\x00\x03\x00\x00\x00",  # empty domain
        b"\x05\x00\x00\x03\x01\x01\x00\x00",  # control character
    ],
)
def test_client_bad_reply(wire: bytes) -> None:
    client = s5.Socks5Client()
    client.greeting(b"\x00")
    client.receive(b"\x05\x00")
    with pytest.raises(s5.Socks5Error):
        client.receive(wire)


# ---------------------------------------------------------------------------------------------
# server and client against each other


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from([s5.NO_AUTH, s5.USERPASS]),
    credentials,
    credentials,
    commands,
    hosts,
    ports,
    hosts,
    ports,
    st.binary(max_size=50),
    st.binary(max_size=50),
)
def test_client_and_server_talk(
    method: int,
    user: str,
    password: str,
    command: int,
    host: str,
    port: int,
    bound_host: str,
    bound_port: int,
    up: bytes,
    down: bytes,
) -> None:
    client = s5.Socks5Client()
    server = s5.Socks5Server()
    flight = client.greeting(bytes([method]))
    if method == s5.USERPASS:
        flight += client.userpass(user, password)
    flight += client.request(command, host, port) + up

    seen: list[s5.Event] = []

    def decide(server: s5.Socks5Server, event: s5.Event) -> bytes:
        seen.append(event)
        if isinstance(event, s5.Greeting):
            return server.select_method(event.methods[0])
        if isinstance(event, s5.UserPass):
            return server.auth_reply(True)
        return server.reply(s5.SUCCEEDED, bound_host, bound_port)

    _, answers = drive_server(server, [flight], decide)
    expected: list[s5.Event] = [s5.Greeting(bytes([method]))]
    if method == s5.USERPASS:
        expected.append(s5.UserPass(user, password))
    atyp = s5.encode_address(host, port)[0]
    expected.append(s5.Request(command, expected_host(host), port, atyp))
    assert seen == expected
    assert server.trailing() == up

    client_events = client.receive(answers + down)
    expected_client: list[s5.Event] = [s5.MethodSelected(method)]
    if method == s5.USERPASS:
        expected_client.append(s5.AuthReply(True))
    expected_client.append(s5.Reply(s5.SUCCEEDED, expected_host(bound_host), bound_port))
    assert client_events == expected_client
    assert client.state == "done"
    assert client.trailing() == down


# ---------------------------------------------------------------------------------------------
# properties: splitting


@settings(max_examples=150, deadline=None)
@given(credentials, credentials, commands, hosts, ports, st.binary(max_size=100), cuts_strategy)
def test_any_split_of_pipelined_client_stream(
    user: str,
    password: str,
    command: int,
    host: str,
    port: int,
    trailing: bytes,
    cuts: list[int],
) -> None:
    client = s5.Socks5Client()
    stream = (
        client.greeting(b"\x00\x02")
        + client.userpass(user, password)
        + client.request(command, host, port)
        + trailing
    )
    reference = s5.Socks5Server()
    ref_events, ref_answers = drive_server(reference, [stream], accept_all)
    ref_trailing = reference.trailing()
    assert ref_events == [
        s5.Greeting(b"\x00\x02"),
        s5.UserPass(user, password),
        s5.Request(command, expected_host(host), port, s5.encode_address(host, port)[0]),
    ]
    assert ref_trailing == trailing

    server = s5.Socks5Server()
    events, answers = drive_server(server, split_at(stream, cuts), accept_all)
    assert events == ref_events
    assert answers == ref_answers
    assert server.state == "done"
    assert server.trailing() == ref_trailing


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([0, 5]), hosts, ports, st.binary(max_size=60), cuts_strategy)
def test_any_split_of_server_stream(
    code: int, host: str, port: int, trailing: bytes, cuts: list[int]
) -> None:
    stream = b"\x05\x02" + b"\x01\x00" + b"\x05" + bytes([code, 0]) + s5.encode_address(host, port)
    stream += trailing
    client = s5.Socks5Client()
    client.greeting(b"\x00\x02")
    events: list[s5.Event] = []
    for chunk in split_at(stream, cuts):
        events += client.receive(chunk)
    assert events == [
        s5.MethodSelected(2),
        s5.AuthReply(True),
        s5.Reply(code, expected_host(host), port),
    ]
    assert client.trailing() == trailing


# ---------------------------------------------------------------------------------------------
# tunnel method sub-negotiation


def tunnel_flight(trailing: bytes = b"") -> bytes:
    """A worker's first flight (protocol v2): greeting and HELLO, no request; what follows is
    the sealed data phase."""
    return (
        s5.Socks5Client().greeting(bytes([hl.METHOD_TUNNEL]))
        + hl.encode_hello(b"s" * 32, "worker-7", 1_700_000_000_000, bytes(16), hl.NEW_SESSION)
        + trailing
    )


def accept_tunnel(server: s5.Socks5Server, event: s5.Event) -> bytes:
    """The exit's way: choose the tunnel method, answer the HELLO and leave the rest to the
    data phase (no subnegotiation_done, no request)."""
    if isinstance(event, s5.SubNegotiation):
        return b"<subneg-answer>"
    return accept_all(server, event)


def test_tunnel_subnegotiation_in_one_flight() -> None:
    server = s5.Socks5Server({hl.METHOD_TUNNEL: hl.decode_hello})
    # the data phase may start with bytes that look like a SOCKS5 request: never parsed
    early = s5.Socks5Client.request(s5.CMD_CONNECT, "collector.example.org", 9618) + b"early"
    flight = tunnel_flight(early)
    assert server.receive(flight) == [s5.Greeting(b"\x80")]
    assert server.select_method(hl.METHOD_TUNNEL) == b"\x05\x80"
    assert server.state == "subnegotiation"
    [event] = server.receive()
    assert isinstance(event, s5.SubNegotiation)
    assert event.method == hl.METHOD_TUNNEL
    hello = event.message
    assert isinstance(hello, hl.Hello)
    assert hello.key_id == "worker-7"
    assert not hello.is_resume
    assert hl.verify_hello(hello, b"s" * 32)
    assert server.state == "subnegotiation-decide"
    assert server.receive() == []
    assert server.receive(b"more") == []
    assert server.trailing() == early + b"more"
    assert server.trailing() == b""


def test_tunnel_subnegotiation_refused_closes() -> None:
    server = s5.Socks5Server({hl.METHOD_TUNNEL: hl.decode_hello})
    server.receive(tunnel_flight())
    server.select_method(hl.METHOD_TUNNEL)
    server.receive()
    server.subnegotiation_done(False)
    assert server.state == "closed"
    with pytest.raises(ProtocolError):
        server.receive()


def test_tunnel_subnegotiation_bad_hello_raises_protocol_error() -> None:
    server = s5.Socks5Server({hl.METHOD_TUNNEL: hl.decode_hello})
    server.receive(b"\x05\x01\x80")
    server.select_method(hl.METHOD_TUNNEL)
    with pytest.raises(ProtocolError):
        server.receive(b"\x07\x08worker-1")


@pytest.mark.parametrize("version", [0, 1, 3])
def test_tunnel_hello_of_another_version_raises_protocol_error(version: int) -> None:
    """A v1 worker (HELLO version 1, CONNECT behind it) fails at its HELLO."""
    server = s5.Socks5Server({hl.METHOD_TUNNEL: hl.decode_hello})
    flight = bytearray(tunnel_flight())
    flight[3] = version
    assert server.receive(bytes(flight)) == [s5.Greeting(b"\x80")]
    server.select_method(hl.METHOD_TUNNEL)
    with pytest.raises(ProtocolError, match=f"version {version}"):
        server.receive()


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=40), cuts_strategy)
def test_tunnel_flight_any_split(trailing: bytes, cuts: list[int]) -> None:
    flight = tunnel_flight(trailing)
    server = s5.Socks5Server({hl.METHOD_TUNNEL: hl.decode_hello})
    events, answers = drive_server(server, split_at(flight, cuts), accept_tunnel)
    assert [type(e) for e in events] == [s5.Greeting, s5.SubNegotiation]
    assert isinstance(events[1], s5.SubNegotiation)
    assert hl.verify_hello(events[1].message, b"s" * 32)  # type: ignore[arg-type]
    assert answers == b"\x05\x80<subneg-answer>"
    assert server.trailing() == trailing


# ---------------------------------------------------------------------------------------------
# properties: robustness against arbitrary input


def valid_client_stream(draw_user: str, host: str, tunnel: bool) -> bytes:
    client = s5.Socks5Client()
    if tunnel:
        return tunnel_flight(b"data")
    return (
        client.greeting(b"\x00\x02")
        + client.userpass(draw_user, "pw")
        + client.request(s5.CMD_CONNECT, host, 80)
        + b"data"
    )


@st.composite
def mutated(draw, base: st.SearchStrategy[bytes]) -> bytes:
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(["flip", "flip", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, len(data)))
        if kind == "flip" and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 4))]
        else:
            del data[pos:]
    return bytes(data)


@st.composite
def client_streams(draw) -> bytes:
    """Mostly valid pipelined client flights (so the server gets deep), some raw bytes."""
    kind = draw(st.sampled_from(["valid"] * 6 + ["raw", "socks-ish"]))
    if kind == "raw":
        return draw(st.binary(max_size=80))
    if kind == "socks-ish":
        return b"\x05" + draw(st.binary(max_size=80))
    return valid_client_stream(draw(credentials), draw(hosts), draw(st.booleans()))


def random_decider(rng: random.Random, tunnel: bool) -> Decide:
    supported = (0x00, 0x02, 0x80) if tunnel else (0x00, 0x02)

    def decide(server: s5.Socks5Server, event: s5.Event) -> bytes:
        if isinstance(event, s5.Greeting):
            usable = [m for m in event.methods if m in supported]
            choice = rng.choice([*usable, *usable, *usable, s5.NO_ACCEPTABLE])
            return server.select_method(choice)
        if isinstance(event, s5.UserPass):
            return server.auth_reply(rng.random() < 0.8)
        if isinstance(event, s5.SubNegotiation):
            server.subnegotiation_done(rng.random() < 0.8)
            return b""
        assert isinstance(event, s5.Request)
        code = s5.SUCCEEDED if rng.random() < 0.5 else rng.choice(sorted(s5.REPLY_NAMES))
        return server.reply(code, "192.0.2.1", 1)

    return decide


@settings(max_examples=400, deadline=None)
@given(mutated(client_streams()), cuts_strategy, st.integers(0, 2**32), st.booleans())
def test_server_arbitrary_bytes_raise_only_protocol_error(
    blob: bytes, cuts: list[int], seed: int, with_tunnel: bool
) -> None:
    server = s5.Socks5Server({hl.METHOD_TUNNEL: hl.decode_hello} if with_tunnel else None)
    decide = random_decider(random.Random(seed), with_tunnel)
    try:
        drive_server(server, split_at(blob, cuts), decide)
    except s5.Socks5Error as exc:
        assert exc.reply in s5.REPLY_NAMES
        if server.state == "reply":  # a reply is still due and can be sent
            assert server.reply(exc.reply)[:2] == bytes([5, exc.reply])
    except ProtocolError:
        pass


server_streams = st.one_of(
    st.binary(max_size=80),
    st.builds(
        lambda m, code, addr, extra: (
            bytes([5, m]) + b"\x01\x00" + bytes([5, code, 0]) + addr + extra
        ),
        st.sampled_from([0x00, 0x02, 0x80]),
        st.integers(0, 9),
        st.builds(s5.encode_address, hosts, ports),
        st.binary(max_size=10),
    ),
    st.builds(
        lambda reply: b"\x05\x80" + reply + b"\x05\x00\x00\x01" + bytes(6),
        st.builds(hl.encode_reply, st.just(b"k"), st.just(bytes(32)), st.integers(0, 7)),
    ),
)


@settings(max_examples=400, deadline=None)
@given(
    mutated(server_streams),
    cuts_strategy,
    st.sampled_from([b"\x00", b"\x02", b"\x80", b"\x00\x02\x80"]),
    st.booleans(),
)
def test_client_arbitrary_bytes_raise_only_protocol_error(
    blob: bytes, cuts: list[int], offered: bytes, fail_subneg: bool
) -> None:
    client = s5.Socks5Client({hl.METHOD_TUNNEL: hl.decode_reply})
    client.greeting(offered)
    seen: list[s5.Event] = []
    try:
        for chunk in split_at(blob, cuts):
            events = client.receive(chunk)
            seen += events
            for event in events:
                if isinstance(event, s5.MethodSelected):
                    assert event.method in offered or event.method == s5.NO_ACCEPTABLE
                if isinstance(event, s5.SubNegotiation) and fail_subneg:
                    client.subnegotiation_failed()
    except ProtocolError:
        return
    if any(isinstance(e, s5.Reply) for e in seen):
        assert client.state == "done"
    client.trailing()
