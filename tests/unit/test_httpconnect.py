"""Tests for the sans-IO HTTP CONNECT request parser (:mod:`relay.proto.httpconnect`)."""

from __future__ import annotations

import base64
import contextlib
from typing import Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.proto import ProtocolError
from relay.proto import httpconnect as hc


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


def feed(chunks: list[bytes]) -> tuple[Optional[hc.Request], bytes]:
    parser = hc.HttpConnectParser()
    request = None
    for chunk in chunks:
        got = parser.receive(chunk)
        if got is not None:
            assert request is None
            request = got
    return request, parser.trailing()


def outcome(chunks: list[bytes]) -> object:
    """The parse result or the error status: what any split of the same bytes must agree on."""
    try:
        return feed(chunks)
    except hc.HttpConnectError as exc:
        return ("error", exc.status)


CURL_HEAD = (
    b"CONNECT collector.example.org:9618 HTTP/1.1\r\n"
    b"Host: collector.example.org:9618\r\n"
    b"Proxy-Authorization: Basic Z2xpZGVpbjpzM2NyM3Q=\r\n"
    b"User-Agent: curl/7.88.1\r\n"
    b"Proxy-Connection: Keep-Alive\r\n"
    b"\r\n"
)


def test_parses_a_curl_request_and_keeps_early_tunnel_bytes() -> None:
    request, trailing = feed([CURL_HEAD + b"\x16\x03\x01hello"])
    assert request is not None
    assert request.method == "CONNECT"
    assert request.target == "collector.example.org:9618"
    assert request.version == (1, 1)
    assert request.header("PROXY-AUTHORIZATION") == ["Basic Z2xpZGVpbjpzM2NyM3Q="]
    assert hc.basic_credentials(request.header("proxy-authorization")[0]) == ("glidein", "s3cr3t")
    assert hc.connect_target(request.target) == ("collector.example.org", 9618)
    assert trailing == b"\x16\x03\x01hello"


def test_incomplete_head_waits() -> None:
    parser = hc.HttpConnectParser()
    assert parser.receive(CURL_HEAD[:-2]) is None
    assert not parser.done
    assert parser.receive(b"\r\n") is not None
    assert parser.done
    assert parser.receive(b"more") is None
    assert parser.trailing() == b"more"


def test_bare_lf_and_leading_empty_lines_are_accepted() -> None:
    request, _ = feed([b"\r\n\nCONNECT [2001:db8::1]:443 HTTP/1.0\nHost: x\n\n"])
    assert request is not None and request.version == (1, 0)
    assert hc.connect_target(request.target) == ("2001:db8::1", 443)


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"CONNECT a:1 HTTP/2.0\r\n\r\n", 505),
        (b"CONNECT a:1 HTTP/1.1 extra\r\n\r\n", 400),
        (b"CONNECT  a:1 HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT a:1 HTTX/1.1\r\n\r\n", 400),
        (b"CONNECT a:1 HTTP/1.1\r\nBad Name: x\r\n\r\n", 400),
        (b"CONNECT a:1 HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 400),
        (b"CONNECT a:1 HTTP/1.1\r\nNoColon\r\n\r\n", 400),
        (b"CONNECT a:1 HTTP/1.1\r\nX: a\x01b\r\n\r\n", 400),
        (b"CONNECT a:1 HTTP/1.1\r\nX: a\rb\r\n\r\n", 400),
        (b"C\xc3\xa4NNECT a:1 HTTP/1.1\r\n\r\n", 400),
        (b"CONNECT a:1 HTTP/1.1\r\n" + b"X: y\r\n" * (hc.MAX_FIELDS + 1) + b"\r\n", 431),
    ],
)
def test_malformed_heads(head: bytes, status: int) -> None:
    with pytest.raises(hc.HttpConnectError) as info:
        feed([head])
    assert info.value.status == status


def test_head_size_is_bounded_even_without_an_end() -> None:
    parser = hc.HttpConnectParser()
    parser.receive(b"CONNECT a:1 HTTP/1.1\r\nX: ")
    with pytest.raises(hc.HttpConnectError) as info:
        for _ in range(100):
            parser.receive(b"a" * 1024)
    assert info.value.status == 431


def test_head_of_exactly_the_limit_is_accepted() -> None:
    head = b"CONNECT a:1 HTTP/1.1\r\nX: "
    head += b"a" * (hc.MAX_HEAD - len(head) - 4) + b"\r\n\r\n"
    assert len(head) == hc.MAX_HEAD
    assert feed([head])[0] is not None
    with pytest.raises(hc.HttpConnectError):
        feed([head[:-4] + b"a\r\n\r\n"])


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("203.0.113.2:80", ("203.0.113.2", 80)),
        ("host.example.org.:443", ("host.example.org.", 443)),
        ("[::1]:9618", ("::1", 9618)),
        ("under_score:65535", ("under_score", 65535)),
    ],
)
def test_connect_targets(target: str, expected: tuple[str, int]) -> None:
    assert hc.connect_target(target) == expected


@pytest.mark.parametrize(
    "target",
    [
        "host",
        "host:",
        ":80",
        "host:0",
        "host:65536",
        "host:+80",
        "host:080000",
        "::1:80",
        "[::1]80",
        "[nothex]:80",
        "300.1.1.1:80",
        "http://host:80",
        "a..b:80",
        "-a:80",
        "/path",
    ],
)
def test_bad_connect_targets(target: str) -> None:
    with pytest.raises(hc.HttpConnectError) as info:
        hc.connect_target(target)
    assert info.value.status == 400


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Basic " + base64.b64encode(b"u:p:with:colons").decode(), ("u", "p:with:colons")),
        ("basic   " + base64.b64encode("ü:ß".encode()).decode(), ("ü", "ß")),
        ("Bearer abc", None),
        ("Basic !!!", None),
        ("Basic " + base64.b64encode(b"nocolon").decode(), None),
        ("Basic " + base64.b64encode(b"\xff:x").decode(), None),
        ("Basic", None),
    ],
)
def test_basic_credentials(value: str, expected: Optional[tuple[str, str]]) -> None:
    assert hc.basic_credentials(value) == expected


def test_responses() -> None:
    answer = hc.response(407, [("Proxy-Authenticate", 'Basic realm="x"')])
    assert answer.startswith(b"HTTP/1.1 407 Proxy Authentication Required\r\n")
    assert b'\r\nProxy-Authenticate: Basic realm="x"\r\n' in answer
    assert answer.endswith(b"Content-Length: 0\r\nConnection: close\r\n\r\n")
    assert hc.established() == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert b"Content-Length" not in hc.established()


# --------------------------------------------------------------------------- properties

_token = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnop-_.!#", min_size=1, max_size=12
)
_value = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"),
    max_size=40,
).map(str.strip)
_host = st.one_of(
    # names that look like IPv4 (digits and dots only) must be valid addresses: left out here
    st.from_regex(
        r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\.[a-z0-9]{1,8}){0,3}", fullmatch=True
    ).filter(lambda name: not set(name) <= set("0123456789.")),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
)


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, str, list[tuple[str, str]], bytes]:
    host = draw(_host)
    port = draw(st.integers(1, 65535))
    target = f"{host}:{port}"
    fields = draw(st.lists(st.tuples(_token, _value), max_size=8))
    eol = draw(st.sampled_from([b"\r\n", b"\n"]))
    lines = [f"CONNECT {target} HTTP/1.1".encode()]
    lines += [f"{name}: {value}".encode("latin-1") for name, value in fields]
    head = eol.join(lines) + eol + eol
    tail = draw(st.binary(max_size=64))
    return head + tail, target, fields, tail


@settings(max_examples=300, deadline=None)
@given(requests(), st.lists(st.integers(0, 10_000), max_size=8))
def test_any_split_parses_the_same(
    generated: tuple[bytes, str, list[tuple[str, str]], bytes], cuts: list[int]
) -> None:
    data, target, fields, tail = generated
    whole = feed([data])
    assert feed(split_at(data, cuts)) == whole
    request, trailing = whole
    assert request is not None
    assert request.target == target
    assert request.headers == tuple((name.lower(), value) for name, value in fields)
    assert trailing == tail
    host, port = hc.connect_target(target)
    assert target == (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(0, 1000), max_size=6))
def test_random_bytes_raise_only_protocol_errors(data: bytes, cuts: list[int]) -> None:
    results = []
    for chunks in ([data], split_at(data, cuts), [bytes([b]) for b in data]):
        try:
            request, _ = feed(chunks)
        except ProtocolError as exc:
            assert isinstance(exc, hc.HttpConnectError)
            assert exc.status in hc.REASONS
            results.append(("error", exc.status))
            continue
        results.append(("ok", request))
        if request is not None:
            with contextlib.suppress(hc.HttpConnectError):
                hc.connect_target(request.target)
            for value in request.header("proxy-authorization"):
                hc.basic_credentials(value)
    assert results[0] == results[1] == results[2]


@settings(max_examples=200, deadline=None)
@given(
    st.binary(max_size=40).map(lambda b: b"CONNECT a:1 HTTP/1.1\r\n" + b),
    st.lists(st.integers(0, 100), max_size=5),
)
def test_mutated_heads_split_the_same(prefix: bytes, cuts: list[int]) -> None:
    data = prefix + b"\r\n\r\n"
    assert outcome([data]) == outcome(split_at(data, cuts))
