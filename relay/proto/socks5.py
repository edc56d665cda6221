"""SOCKS5 codec (RFC 1928, RFC 1929 user/password), both sides, sans-IO.

Both state machines accept any split of the byte stream and keep bytes that arrive early
(a pipelined client sends greeting, sub-negotiation and request in one flight), so the
caller's decisions (which method, is this password right) can be taken between events.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Mapping
from typing import Callable, NamedTuple, Optional, Union

from relay.proto import ProtocolError

VERSION = 5
AUTH_VERSION = 1

NO_AUTH = 0x00
USERPASS = 0x02
NO_ACCEPTABLE = 0xFF

CMD_CONNECT = 0x01
CMD_BIND = 0x02
CMD_UDP_ASSOCIATE = 0x03

ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04

SUCCEEDED = 0x00
GENERAL_FAILURE = 0x01
NOT_ALLOWED = 0x02
NETWORK_UNREACHABLE = 0x03
HOST_UNREACHABLE = 0x04
CONNECTION_REFUSED = 0x05
TTL_EXPIRED = 0x06
COMMAND_NOT_SUPPORTED = 0x07
ADDRESS_TYPE_NOT_SUPPORTED = 0x08
REPLY_NAMES = {
    SUCCEEDED: "succeeded",
    GENERAL_FAILURE: "general SOCKS server failure",
    NOT_ALLOWED: "connection not allowed by ruleset",
    NETWORK_UNREACHABLE: "network unreachable",
    HOST_UNREACHABLE: "host unreachable",
    CONNECTION_REFUSED: "connection refused",
    TTL_EXPIRED: "TTL expired",
    COMMAND_NOT_SUPPORTED: "command not supported",
    ADDRESS_TYPE_NOT_SUPPORTED: "address type not supported",
}

SubParser = Callable[[bytearray], Optional[tuple[object, int]]]
"""Parses a method-specific sub-negotiation message from the front of a buffer."""


class Socks5Error(ProtocolError):
    """Malformed SOCKS5 input; ``reply`` is the code to answer with when a reply is still due."""

    reason = "socks5-error"

    def __init__(self, message: str, reply: int = GENERAL_FAILURE) -> None:
        super().__init__(message, code=reply)
        self.reply = reply


class Greeting(NamedTuple):
    methods: bytes


class UserPass(NamedTuple):
    username: str
    password: str


class SubNegotiation(NamedTuple):
    method: int
    message: object


class Request(NamedTuple):
    command: int
    host: str
    port: int
    atyp: int


class MethodSelected(NamedTuple):
    method: int


class AuthReply(NamedTuple):
    ok: bool


class Reply(NamedTuple):
    code: int
    host: str
    port: int


Event = Union[Greeting, UserPass, SubNegotiation, Request, MethodSelected, AuthReply, Reply]


def encode_address(host: str, port: int) -> bytes:
    """ATYP + address + port; IP literals go as addresses, everything else as a domain."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("idna") if not host.isascii() else host.encode("ascii")
        if not 1 <= len(name) <= 255:
            raise ValueError(f"domain name length {len(name)} out of range") from None
        return bytes((ATYP_DOMAIN, len(name))) + name + struct.pack("!H", port)
    if ip.version == 4:
        return bytes((ATYP_IPV4,)) + ip.packed + struct.pack("!H", port)
    return bytes((ATYP_IPV6,)) + ip.packed + struct.pack("!H", port)


def _decode_address(buf: bytearray, pos: int) -> Optional[tuple[str, int, int, int]]:
    """(host, port, atyp, end) of the address at ``pos``; None if incomplete."""
    if len(buf) <= pos:
        return None
    atyp = buf[pos]
    if atyp == ATYP_IPV4:
        end = pos + 1 + 4 + 2
        if len(buf) < end:
            return None
        host = str(ipaddress.IPv4Address(bytes(buf[pos + 1 : pos + 5])))
    elif atyp == ATYP_IPV6:
        end = pos + 1 + 16 + 2
        if len(buf) < end:
            return None
        host = str(ipaddress.IPv6Address(bytes(buf[pos + 1 : pos + 17])))
    elif atyp == ATYP_DOMAIN:
        if len(buf) < pos + 2:
            return None
        n = buf[pos + 1]
        if n == 0:
            raise Socks5Error("empty domain name", HOST_UNREACHABLE)
        end = pos + 2 + n + 2
        if len(buf) < end:
            return None
        raw = bytes(buf[pos + 2 : pos + 2 + n])
        if not raw.isascii() or any(c < 0x21 or c == 0x7F for c in raw):
            raise Socks5Error("domain name has non-printable or non-ASCII bytes", HOST_UNREACHABLE)
        host = raw.decode("ascii")
    else:
        raise Socks5Error(f"address type 0x{atyp:02x} not supported", ADDRESS_TYPE_NOT_SUPPORTED)
    port = (buf[end - 2] << 8) | buf[end - 1]
    return host, port, atyp, end


def decode_address(raw: bytes) -> tuple[str, int, int]:
    """(host, port, atyp) of an address that fills ``raw`` exactly (OPEN and REPLY frames)."""
    parsed = _decode_address(bytearray(raw), 0)
    if parsed is None or parsed[3] != len(raw):
        raise Socks5Error("truncated or overlong address", ADDRESS_TYPE_NOT_SUPPORTED)
    return parsed[0], parsed[1], parsed[2]


# Server states
_S_GREETING = "greeting"
_S_CHOOSE = "choose-method"
_S_USERPASS = "userpass"
_S_AUTH_DECIDE = "auth-decide"
_S_SUBNEG = "subnegotiation"
_S_SUBNEG_DECIDE = "subnegotiation-decide"
_S_REQUEST = "request"
_S_REPLY = "reply"
_S_DONE = "done"
_S_CLOSED = "closed"


class Socks5Server:
    """Server side. Feed bytes with :meth:`receive`; answer each event with the matching call.

    Greeting -> select_method(); UserPass -> auth_reply(); SubNegotiation -> the caller sends
    its own answer and calls subnegotiation_done() (a method whose data phase starts right
    after the sub-negotiation, like the tunnel's, takes :meth:`trailing` instead); Request ->
    reply(). After a successful reply, :meth:`trailing` holds any bytes the client already
    sent for the data phase.
    """

    def __init__(self, subparsers: Optional[Mapping[int, SubParser]] = None) -> None:
        self._buf = bytearray()
        self._state = _S_GREETING
        self._subparsers = dict(subparsers or {})
        self.method: Optional[int] = None

    @property
    def state(self) -> str:
        return self._state

    def receive(self, data: bytes = b"") -> list[Event]:
        if self._state == _S_CLOSED:
            raise ProtocolError("SOCKS5 negotiation already failed")
        self._buf += data
        events: list[Event] = []
        while True:
            event = self._next()
            if event is None:
                return events
            events.append(event)

    def _next(self) -> Optional[Event]:
        buf = self._buf
        if self._state == _S_GREETING:
            if len(buf) < 2:
                if buf and buf[0] != VERSION:
                    raise Socks5Error(f"not SOCKS5 (version byte 0x{buf[0]:02x})")
                return None
            if buf[0] != VERSION:
                raise Socks5Error(f"not SOCKS5 (version byte 0x{buf[0]:02x})")
            n = buf[1]
            if len(buf) < 2 + n:
                return None
            methods = bytes(buf[2 : 2 + n])
            del buf[: 2 + n]
            self._state = _S_CHOOSE
            return Greeting(methods)
        if self._state == _S_USERPASS:
            if len(buf) < 2:
                return None
            if buf[0] != AUTH_VERSION:
                raise Socks5Error(f"bad username/password version 0x{buf[0]:02x}")
            ulen = buf[1]
            if len(buf) < 3 + ulen:
                return None
            plen = buf[2 + ulen]
            if len(buf) < 3 + ulen + plen:
                return None
            user = bytes(buf[2 : 2 + ulen]).decode("utf-8", "replace")
            password = bytes(buf[3 + ulen : 3 + ulen + plen]).decode("utf-8", "replace")
            del buf[: 3 + ulen + plen]
            self._state = _S_AUTH_DECIDE
            return UserPass(user, password)
        if self._state == _S_SUBNEG:
            assert self.method is not None
            parsed = self._subparsers[self.method](buf)
            if parsed is None:
                return None
            message, used = parsed
            del buf[:used]
            self._state = _S_SUBNEG_DECIDE
            return SubNegotiation(self.method, message)
        if self._state == _S_REQUEST:
            if len(buf) < 4:
                if buf and buf[0] != VERSION:
                    raise Socks5Error(f"request version byte 0x{buf[0]:02x}")
                return None
            if buf[0] != VERSION:
                raise Socks5Error(f"request version byte 0x{buf[0]:02x}")
            try:
                decoded = _decode_address(buf, 3)
            except Socks5Error:
                self._state = _S_REPLY  # a well-formed request with a bad address gets a reply
                raise
            if decoded is None:
                return None
            host, port, atyp, end = decoded
            command = buf[1]
            del buf[:end]
            self._state = _S_REPLY
            return Request(command, host, port, atyp)
        return None

    def select_method(self, method: int) -> bytes:
        if self._state != _S_CHOOSE:
            raise RuntimeError(f"select_method in state {self._state}")
        self.method = method
        if method == NO_ACCEPTABLE:
            self._state = _S_CLOSED
        elif method == USERPASS:
            self._state = _S_USERPASS
        elif method in self._subparsers:
            self._state = _S_SUBNEG
        elif method == NO_AUTH:
            self._state = _S_REQUEST
        else:
            raise ValueError(f"no handler for method 0x{method:02x}")
        return bytes((VERSION, method))

    def auth_reply(self, ok: bool) -> bytes:
        if self._state != _S_AUTH_DECIDE:
            raise RuntimeError(f"auth_reply in state {self._state}")
        self._state = _S_REQUEST if ok else _S_CLOSED
        return bytes((AUTH_VERSION, 0 if ok else 1))

    def subnegotiation_done(self, ok: bool) -> None:
        if self._state != _S_SUBNEG_DECIDE:
            raise RuntimeError(f"subnegotiation_done in state {self._state}")
        self._state = _S_REQUEST if ok else _S_CLOSED

    def reply(self, code: int, host: str = "0.0.0.0", port: int = 0) -> bytes:
        if self._state != _S_REPLY:
            raise RuntimeError(f"reply in state {self._state}")
        self._state = _S_DONE if code == SUCCEEDED else _S_CLOSED
        return bytes((VERSION, code, 0)) + encode_address(host, port)

    def trailing(self) -> bytes:
        """Bytes received beyond the negotiation; they belong to the data phase."""
        data = bytes(self._buf)
        self._buf.clear()
        return data


# Client states
_C_METHOD = "method"
_C_AUTH = "auth"
_C_SUBNEG = "subnegotiation"
_C_REPLY = "reply"
_C_DONE = "done"


class Socks5Client:
    """Client side: build requests with the encode methods, feed the server's bytes in."""

    def __init__(self, subparsers: Optional[Mapping[int, SubParser]] = None) -> None:
        self._buf = bytearray()
        self._state = _C_METHOD
        self._subparsers = dict(subparsers or {})
        self._offered = b""
        self.method: Optional[int] = None

    @property
    def state(self) -> str:
        return self._state

    def greeting(self, methods: bytes) -> bytes:
        if not 1 <= len(methods) <= 255:
            raise ValueError("offer 1..255 methods")
        self._offered = bytes(methods)
        return bytes((VERSION, len(methods))) + self._offered

    @staticmethod
    def userpass(username: str, password: str) -> bytes:
        u = username.encode("utf-8")
        p = password.encode("utf-8")
        if not (1 <= len(u) <= 255 and 1 <= len(p) <= 255):
            raise ValueError("username and password must be 1..255 bytes")
        return bytes((AUTH_VERSION, len(u))) + u + bytes((len(p),)) + p

    @staticmethod
    def request(command: int, host: str, port: int) -> bytes:
        return bytes((VERSION, command, 0)) + encode_address(host, port)

    def receive(self, data: bytes = b"") -> list[Event]:
        self._buf += data
        events: list[Event] = []
        while True:
            event = self._next()
            if event is None:
                return events
            events.append(event)

    def _next(self) -> Optional[Event]:
        buf = self._buf
        if self._state == _C_METHOD:
            if len(buf) < 2:
                return None
            if buf[0] != VERSION:
                raise Socks5Error(f"server is not SOCKS5 (version byte 0x{buf[0]:02x})")
            method = buf[1]
            del buf[:2]
            if method != NO_ACCEPTABLE and method not in self._offered:
                raise Socks5Error(f"server chose method 0x{method:02x} that was not offered")
            self.method = method
            if method == NO_ACCEPTABLE:
                self._state = _C_DONE
            elif method == USERPASS:
                self._state = _C_AUTH
            elif method in self._subparsers:
                self._state = _C_SUBNEG
            else:
                self._state = _C_REPLY
            return MethodSelected(method)
        if self._state == _C_AUTH:
            if len(buf) < 2:
                return None
            ok = buf[1] == 0
            del buf[:2]
            self._state = _C_REPLY if ok else _C_DONE
            return AuthReply(ok)
        if self._state == _C_SUBNEG:
            assert self.method is not None
            parsed = self._subparsers[self.method](buf)
            if parsed is None:
                return None
            message, used = parsed
            del buf[:used]
            self._state = _C_REPLY
            return SubNegotiation(self.method, message)
        if self._state == _C_REPLY:
            if len(buf) < 4:
                return None
            if buf[0] != VERSION:
                raise Socks5Error(f"reply version byte 0x{buf[0]:02x}")
            decoded = _decode_address(buf, 3)
            if decoded is None:
                return None
            host, port, _, end = decoded
            code = buf[1]
            del buf[:end]
            self._state = _C_DONE
            return Reply(code, host, port)
        return None

    def subnegotiation_failed(self) -> None:
        """The caller rejected the sub-negotiation answer; no request reply will follow."""
        self._state = _C_DONE

    def trailing(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        return data
