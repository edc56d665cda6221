"""HTTP CONNECT proxy requests (RFC 9110 section 9.3.6, RFC 9112), server side, sans-IO.

Only the request head is parsed: the request line, the header fields and the empty line that
ends them. Everything after the head belongs to the tunnel and is handed back untouched by
:meth:`HttpConnectParser.trailing`. The head is bounded (:data:`MAX_HEAD`, :data:`MAX_FIELDS`),
so a client cannot make the listener buffer without limit, and any split of the byte stream
parses the same. Malformed input raises :class:`HttpConnectError`, which carries the status
code to answer with.

The parser accepts any method, so the caller can answer a ``GET`` with ``405`` instead of a bare
close; :func:`connect_target` checks a CONNECT's authority-form target (``host:port``,
``[v6]:port``) and :func:`basic_credentials` decodes ``Proxy-Authorization: Basic``.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Iterable
from typing import NamedTuple, Optional

from relay.proto import ProtocolError

__all__ = [
    "MAX_FIELDS",
    "MAX_HEAD",
    "REASONS",
    "HttpConnectError",
    "HttpConnectParser",
    "Request",
    "basic_credentials",
    "connect_target",
    "established",
    "response",
]

#: Longest request head (request line, fields, empty line) accepted, in bytes.
MAX_HEAD = 16 * 1024
#: Most header fields accepted in one request.
MAX_FIELDS = 100

REASONS = {
    200: "Connection established",
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_TARGET = re.compile(rb"[\x21-\x7e]+")
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
_FIELD_VALUE_BAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_HOST_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_IPV4ISH = re.compile(r"[0-9.]+")


class HttpConnectError(ProtocolError):
    """A request the proxy cannot serve; ``status`` is the HTTP status to answer with."""

    reason = "http-error"

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message, code=status)
        self.status = status


class Request(NamedTuple):
    """A complete request head. ``headers`` keep their order; names are lower-cased."""

    method: str
    target: str
    version: tuple[int, int]
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> list[str]:
        """Every value of the field ``name`` (case-insensitive), in order."""
        wanted = name.lower()
        return [value for key, value in self.headers if key == wanted]


class HttpConnectParser:
    """Collects one request head; feed bytes with :meth:`receive` until it returns a request."""

    def __init__(self, max_head: int = MAX_HEAD, max_fields: int = MAX_FIELDS) -> None:
        self._buf = bytearray()
        self._scan = 0  # where the search for the end of the head resumes
        self._started = False  # a non-empty line (the request line) has been seen
        self._max_head = max_head
        self._max_fields = max_fields
        self._request: Optional[Request] = None
        self._trailing = b""

    @property
    def done(self) -> bool:
        return self._request is not None

    def receive(self, data: bytes) -> Optional[Request]:
        """Add bytes; return the request once its head is complete, else None.

        After the request has been returned, further bytes are kept for :meth:`trailing`.
        """
        if self._request is not None:
            self._trailing += data
            return None
        self._buf += data
        end = self._head_end()
        if end is None:
            if len(self._buf) > self._max_head:
                raise HttpConnectError(f"request head longer than {self._max_head} bytes", 431)
            return None
        if end > self._max_head:
            raise HttpConnectError(f"request head longer than {self._max_head} bytes", 431)
        head = bytes(self._buf[:end])
        self._trailing = bytes(self._buf[end:])
        self._buf.clear()
        self._request = _parse_head(head, self._max_fields)
        return self._request

    def trailing(self) -> bytes:
        """Bytes received after the head (the client's first tunnel bytes), handed out once."""
        data, self._trailing = self._trailing, b""
        return data

    def _head_end(self) -> Optional[int]:
        """Offset just past the empty line that ends the head, or None if it has not come yet.

        Lines end in CRLF or a bare LF (RFC 9112 section 2.2 lets a recipient accept LF);
        empty lines before the request line are skipped, as that section also allows.
        """
        buf = self._buf
        pos = self._scan
        while True:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                self._scan = pos
                return None
            line_start = pos
            pos = nl + 1
            line = buf[line_start:nl]
            if line not in (b"", b"\r"):
                self._started = True
            elif self._started:
                return pos


def _split_lines(head: bytes) -> list[bytes]:
    lines = head.split(b"\n")
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def _parse_head(head: bytes, max_fields: int) -> Request:
    lines = _split_lines(head)
    while lines and lines[0] == b"":
        lines.pop(0)
    while lines and lines[-1] == b"":
        lines.pop()
    if not lines:
        raise HttpConnectError("empty request")
    method, target, version = _request_line(lines[0])
    fields = lines[1:]
    if len(fields) > max_fields:
        raise HttpConnectError(f"more than {max_fields} header fields", 431)
    headers = tuple(_field(line) for line in fields)
    return Request(method, target, version, headers)


def _request_line(line: bytes) -> tuple[str, str, tuple[int, int]]:
    parts = line.split(b" ")
    if len(parts) != 3:
        raise HttpConnectError("malformed request line")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise HttpConnectError("malformed method")
    if not _TARGET.fullmatch(target):
        raise HttpConnectError("malformed request target")
    m = _VERSION.fullmatch(version)
    if m is None:
        raise HttpConnectError("malformed HTTP version")
    major, minor = int(m.group(1)), int(m.group(2))
    if major != 1:
        raise HttpConnectError(f"HTTP/{major}.{minor} is not supported", 505)
    return method.decode("ascii"), target.decode("ascii"), (major, minor)


def _field(line: bytes) -> tuple[str, str]:
    if line[:1] in (b" ", b"\t"):
        raise HttpConnectError("obsolete line folding in header fields")
    name, sep, value = line.partition(b":")
    if not sep or not _TOKEN.fullmatch(name):
        raise HttpConnectError("malformed header field")
    value = value.strip(b" \t")
    if _FIELD_VALUE_BAD.search(value):
        raise HttpConnectError("control character in a header field value")
    return name.decode("ascii").lower(), value.decode("latin-1")


def connect_target(target: str) -> tuple[str, int]:
    """Host (IPv6 without brackets) and port of a CONNECT's authority-form target."""
    if target.startswith("["):
        end = target.find("]")
        if end < 0 or target[end + 1 : end + 2] != ":":
            raise HttpConnectError("CONNECT target must be host:port")
        host, port_text = target[1:end], target[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise HttpConnectError("bad IPv6 address in CONNECT target") from None
    else:
        host, sep, port_text = target.rpartition(":")
        if not sep or not host:
            raise HttpConnectError("CONNECT target must be host:port")
        if not _valid_host(host):
            raise HttpConnectError("bad host in CONNECT target")
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        raise HttpConnectError("bad port in CONNECT target")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise HttpConnectError("port out of range in CONNECT target")
    return host, port


def _valid_host(host: str) -> bool:
    if _IPV4ISH.fullmatch(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
        return True
    name = host[:-1] if host.endswith(".") else host
    return 0 < len(name) <= 253 and all(_HOST_NAME.fullmatch(p) for p in name.split("."))


def basic_credentials(value: str) -> Optional[tuple[str, str]]:
    """``(user, password)`` from a ``Basic`` credentials value, or None if it is not one."""
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    token = token.strip()
    try:
        raw = base64.b64decode(token.encode("ascii"), validate=True)
        text = raw.decode("utf-8")
    except (UnicodeError, ValueError, binascii.Error):
        return None
    user, sep, password = text.partition(":")
    if not sep:
        return None
    return user, password


def response(status: int, headers: Iterable[tuple[str, str]] = (), body: bytes = b"") -> bytes:
    """A complete error response that closes the connection (``Connection: close``)."""
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


def established() -> bytes:
    """The 2xx answer to a CONNECT: no Content-Length, the tunnel starts after it."""
    return b"HTTP/1.1 200 Connection established\r\n\r\n"
