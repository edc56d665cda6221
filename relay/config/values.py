"""The value types of the configuration and their parsers.

Every parser takes the text an operator wrote and raises ValueError (a rule: PolicyError, which
is one) with the reason; the loader adds which option and which file.  Nothing here reads files
or knows about options, so the daemons and the wrapper can parse addresses the same way.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from dataclasses import dataclass
from typing import NamedTuple, Union

__all__ = [
    "DOTTED_QUAD_RE",
    "MAX_NAME",
    "NAT64",
    "PORT_MAX",
    "PORT_MIN",
    "V4_COMPAT",
    "V4_MAPPED",
    "ForwardTarget",
    "HostPort",
    "LoginTarget",
    "PolicyError",
    "Rule",
    "check_host",
    "parse_fingerprint",
    "parse_forward",
    "parse_hostport",
    "parse_login",
    "parse_rule",
    "parse_size",
    "parse_upstream",
    "toml_type",
    "valid_port",
]


class HostPort(NamedTuple):
    """A ``HOST:PORT`` endpoint; IPv6 hosts are stored without brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        """Format back as the operator would write it, so logs can be pasted into configs."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class LoginTarget(NamedTuple):
    """An SSH login node ``[USER@]HOST[:PORT]``; ``user`` None means ssh's default user."""

    user: str | None
    host: str
    port: int = 22

    def __str__(self) -> str:
        """Format back as ``[USER@]HOST[:PORT]`` for logs."""
        user = f"{self.user}@" if self.user is not None else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = f":{self.port}" if self.port != 22 else ""
        return f"{user}{host}{port}"


class ForwardTarget(NamedTuple):
    """A static forward ``LOCALHOST:PORT=DESTHOST:PORT``."""

    listen: HostPort
    dest: HostPort

    def __str__(self) -> str:
        return f"{self.listen}={self.dest}"


def toml_type(value: object) -> str:
    """TOML's name for a value's type, as the operator sees it in the file."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    return "date/time"


# --------------------------------------------------------------------------- addresses

_HOST_LABEL_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_IPV4ISH_RE = re.compile(r"[0-9.]+")
_SIZE_RE = re.compile(r"([0-9]+)\s*(B|KiB|MiB|GiB|TiB)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_USER_RE = re.compile(r"[^\s@:/\\]{1,255}")


def check_host(host: str) -> str | None:
    """Why ``host`` is not a usable IP address or DNS name, or None if it is."""
    if not host:
        return "empty host"
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return "not an IPv6 address"
        return None
    if _IPV4ISH_RE.fullmatch(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return "not an IPv4 address"
        return None
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not all(_HOST_LABEL_RE.fullmatch(p) for p in name.split(".")):
        return "not a valid host name"
    return None


def _parse_port(text: str, min_port: int) -> int:
    """Digits only: int() would also take signs, spaces and underscores."""
    if not text.isascii() or not text.isdigit():
        raise ValueError("port must be a number")
    port = int(text)
    if not min_port <= port <= 65535:
        raise ValueError(f"port must be {min_port}..65535")
    return port


def _split_host_port(text: str) -> tuple[str, str | None]:
    """Split ``HOST[:PORT]`` / ``[V6][:PORT]``; a bare IPv6 address has no port."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("missing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if ":" not in host:
            raise ValueError("brackets are for IPv6 addresses only")
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise ValueError("expected ':PORT' after ']'")
        return host, rest[1:]
    if text.count(":") > 1:
        return text, None
    host, sep, port = text.partition(":")
    return host, (port if sep else None)


def parse_hostport(text: str, min_port: int = 1) -> HostPort:
    """Parse ``HOST:PORT`` or ``[V6]:PORT``; raise ValueError with the reason."""
    host, port = _split_host_port(text)
    if port is None:
        if ":" in host and not text.startswith("["):
            raise ValueError("IPv6 addresses need brackets: [ADDR]:PORT")
        raise ValueError("expected HOST:PORT")
    problem = check_host(host)
    if problem:
        raise ValueError(problem)
    return HostPort(host, _parse_port(port, min_port))


def parse_forward(text: str) -> ForwardTarget:
    """Parse ``LOCALHOST:PORT=DESTHOST:PORT``; the local side must be a loopback address.

    A static forward has no password, so it must not be reachable from other machines.
    """
    listen_text, sep, dest_text = text.partition("=")
    if not sep or "=" in dest_text:
        raise ValueError("expected LOCALHOST:PORT=DESTHOST:PORT")
    listen = parse_hostport(listen_text)
    if listen.host != "localhost":
        try:
            loopback = ipaddress.ip_address(listen.host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(f"local side {listen} must be a loopback address")
    return ForwardTarget(listen, parse_hostport(dest_text))


def parse_login(text: str) -> LoginTarget:
    """Parse ``[USER@]HOST[:PORT]`` (port 22 by default); the user ends at the last '@'."""
    user: str | None
    user, sep, hostpart = text.rpartition("@")
    if not sep:
        user = None
    elif not _USER_RE.fullmatch(user):
        raise ValueError("bad user name")
    host, port = _split_host_port(hostpart)
    problem = check_host(host)
    if problem:
        raise ValueError(problem)
    return LoginTarget(user, host, 22 if port is None else _parse_port(port, 1))


def parse_size(value: object) -> int:
    """Bytes from an int or a string like ``"512KiB"``; binary units only, to be unambiguous."""
    if isinstance(value, bool):
        raise TypeError("boolean")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("must be a whole number of bytes")
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = _SIZE_RE.fullmatch(value.strip())
        if m is None:
            raise ValueError("expected bytes or a number with KiB, MiB or GiB, e.g. 4MiB")
        return int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()]
    raise TypeError(toml_type(value))


def parse_upstream(text: str) -> HostPort:
    """``socks5://HOST:PORT`` only; never echo the URL if it may carry a password."""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() != "socks5":
        raise ValueError(f"expected socks5://HOST:PORT (got {text!r})")
    if "@" in rest:
        raise ValueError(
            "credentials do not belong in the URL; put USER:PASSWORD in a file for --upstream-auth"
        )
    if rest.endswith("/"):
        rest = rest[:-1]
    if any(c in rest for c in "/?#"):
        raise ValueError(f"expected socks5://HOST:PORT with nothing after the port (got {text!r})")
    try:
        return parse_hostport(rest)
    except ValueError as exc:
        raise ValueError(f"bad address {text!r}: {exc}") from None


# --------------------------------------------------------------------------- fingerprints

_HEX_RE = re.compile(r"[0-9A-Fa-f]{2}(?::?[0-9A-Fa-f]{2}){31}")
_B64_RE = re.compile(r"[A-Za-z0-9+/]{43}=?")


def parse_fingerprint(text: str) -> bytes:
    """The 32 bytes of a SHA-256 certificate fingerprint.

    Accepts hex (``ab12...``, also ``AB:12:...`` as ``openssl x509 -fingerprint -sha256``
    prints it, with or without its ``sha256 Fingerprint=`` prefix) and OpenSSH style
    ``SHA256:base64``. Raises ValueError.
    """
    value = text.strip()
    lowered = value.lower()
    for prefix in ("sha256 fingerprint=", "sha256:"):
        if lowered.startswith(prefix):
            value = value[len(prefix) :]
            break
    if _HEX_RE.fullmatch(value):
        return bytes.fromhex(value.replace(":", ""))
    if _B64_RE.fullmatch(value):
        try:
            return base64.b64decode(value.rstrip("=") + "=", validate=True)
        except binascii.Error:
            pass
    raise ValueError(
        "expected a SHA-256 fingerprint: 64 hex digits (colons allowed) or SHA256:base64"
    )


# --------------------------------------------------------------------------- destination rules

_Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
_Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

PORT_MIN = 1
PORT_MAX = 65535
MAX_NAME = 253
"""Longest DNS name, in a rule's suffix and in a name a client asks for."""

# IPv6 forms that a host or a NAT64 gateway turns into IPv4 connections; the exit judges them as
# the IPv4 address they carry, so a rule written in them could never match.
V4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
V4_COMPAT = ipaddress.IPv6Network("::/96")

# Leading zeros are refused outright: inet_aton reads "0177.0.0.1" as octal 127.0.0.1, while
# the ipaddress module of Python < 3.9.5 read it as decimal 177.0.0.1.
DOTTED_QUAD_RE = re.compile(r"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}")
_PREFIX = re.compile(r"[0-9]{1,3}")
_PORTS = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?")
_RULE_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


class PolicyError(ValueError):
    """A rule an operator wrote is malformed; the message quotes it so it can be found."""


def valid_port(port: object) -> bool:
    """A TCP port a destination may have (bool is an int, but not a port)."""
    return isinstance(port, int) and not isinstance(port, bool) and PORT_MIN <= port <= PORT_MAX


@dataclass(frozen=True)
class Rule:
    """One allowlist entry; exactly one of network and suffix is set."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    suffix: str | None
    port_lo: int
    port_hi: int
    text: str

    def __post_init__(self) -> None:
        if (self.network is None) == (self.suffix is None):
            raise PolicyError(f"rule {self.text!r}: exactly one of network and suffix must be set")
        if not PORT_MIN <= self.port_lo <= self.port_hi <= PORT_MAX:
            raise PolicyError(
                f"rule {self.text!r}: port range {self.port_lo}-{self.port_hi} is not within "
                f"{PORT_MIN}-{PORT_MAX} or is reversed"
            )

    def allows_port(self, port: int) -> bool:
        return valid_port(port) and self.port_lo <= port <= self.port_hi


def _fail(text: str, what: str) -> PolicyError:
    return PolicyError(f"invalid rule {text!r}: {what}")


def _parse_ports(text: str, ports: str | None) -> tuple[int, int]:
    if ports is None or ports == "*":
        return PORT_MIN, PORT_MAX
    if ports == "":
        raise _fail(text, "empty port after ':' (use N, N-M or *)")
    m = _PORTS.fullmatch(ports)
    if m is None:
        raise _fail(text, f"bad port {ports!r} (use N, N-M or *)")
    lo = int(m.group(1))
    hi = int(m.group(2)) if m.group(2) is not None else lo
    for p in (lo, hi):
        if not PORT_MIN <= p <= PORT_MAX:
            raise _fail(text, f"port {p} is outside {PORT_MIN}-{PORT_MAX}")
    if lo > hi:
        raise _fail(text, f"port range {lo}-{hi} is reversed")
    return lo, hi


def _parse_suffix(text: str, body: str) -> str:
    domain = body[1:]
    if domain.endswith("."):
        domain = domain[:-1]  # accept the fully-qualified spelling
    if not domain:
        raise _fail(text, "empty domain suffix (a bare '.' would match every name)")
    if not domain.isascii():
        raise _fail(text, "domain suffix must be ASCII (write IDNs as xn-- punycode)")
    domain = domain.lower()
    if len(domain) > MAX_NAME:
        raise _fail(text, f"domain suffix is longer than {MAX_NAME} characters")
    labels = domain.split(".")
    for label in labels:
        if not _RULE_LABEL.fullmatch(label):
            raise _fail(
                text,
                f"{label!r} is not a DNS label (letters, digits and inner hyphens, 1-63 chars)",
            )
    if labels[-1].isdigit():
        raise _fail(text, "top-level label is all digits; for addresses write a CIDR rule")
    return domain


def _parse_ip(text: str, addr: str) -> _Address:
    if not addr:
        raise _fail(text, "missing address")
    if not addr.isascii() or "%" in addr:
        raise _fail(text, f"{addr!r} is not a plain IP address")
    hint = ""
    if ":" not in addr and any(c.isalpha() for c in addr):
        hint = "; domain suffix rules start with '.'"
    tail = addr.rsplit(":", 1)[-1]
    if "." in tail and not DOTTED_QUAD_RE.fullmatch(tail):
        if not hint and re.fullmatch(r"[0-9.]+", tail):
            hint = " (IPv4 octets must not have leading zeros)"
        raise _fail(text, f"{addr!r} is not an IP address{hint}")
    try:
        return ipaddress.ip_address(addr)
    except ValueError:
        raise _fail(text, f"{addr!r} is not an IP address{hint}") from None


def _parse_network(text: str, addr_text: str, prefix: str | None) -> _Network:
    addr = _parse_ip(text, addr_text)
    if prefix is None:
        return ipaddress.ip_network(addr)
    if not _PREFIX.fullmatch(prefix):
        raise _fail(text, f"bad prefix length {prefix!r}")
    plen = int(prefix)
    if plen > addr.max_prefixlen:
        raise _fail(text, f"prefix /{plen} is too long for IPv{addr.version}")
    try:
        return ipaddress.ip_network((addr, plen))
    except ValueError:
        loose = ipaddress.ip_network((addr, plen), strict=False)
        raise _fail(text, f"host bits set (did you mean {loose}?)") from None


def _split_cidr(text: str, body: str) -> tuple[str, str | None, str | None, bool]:
    """Split into address, prefix, ports and whether the address was bracketed."""
    if body.startswith("["):
        close = body.find("]")
        if close < 0:
            raise _fail(text, "missing ']'")
        inner, rest = body[1:close], body[close + 1 :]
        addr, slash, prefix_in = inner.partition("/")
        prefix: str | None = prefix_in if slash else None
        ports: str | None = None
        if rest.startswith("/"):
            if prefix is not None:
                raise _fail(text, "prefix length given twice")
            prefix, colon, ports_text = rest[1:].partition(":")
            ports = ports_text if colon else None
        elif rest.startswith(":"):
            ports = rest[1:]
        elif rest:
            raise _fail(text, f"unexpected {rest!r} after ']'")
        return addr, prefix, ports, True
    if "/" in body:
        # The prefix ends the address, so unbracketed IPv6 is unambiguous here.
        addr, _, tail = body.partition("/")
        prefix, colon, ports_text = tail.partition(":")
        return addr, prefix, (ports_text if colon else None), False
    if body.count(":") > 1:
        raise _fail(
            text, "IPv6 address without a /prefix must be bracketed, e.g. [2001:db8::1]:443"
        )
    addr, colon, ports_text = body.partition(":")
    return addr, None, (ports_text if colon else None), False


def _only_embedded_v4(net: _Network) -> bool:
    """True for IPv6 rules that could never match, because the exit judges these as IPv4."""
    if not isinstance(net, ipaddress.IPv6Network):
        return False
    if net.subnet_of(V4_MAPPED) or net.subnet_of(NAT64):
        return True
    return net.subnet_of(V4_COMPAT) and int(net.network_address) > 1


def parse_rule(text: str) -> Rule:
    """Parse one rule, refusing anything ambiguous rather than guessing what was meant."""
    if not isinstance(text, str):
        raise PolicyError(f"invalid rule {text!r}: not a string")
    body = text.strip()
    if not body:
        raise _fail(text, "empty rule")
    if body.startswith("."):
        domain, colon, ports_text = body.partition(":")
        suffix = _parse_suffix(text, domain)
        lo, hi = _parse_ports(text, ports_text if colon else None)
        return Rule(network=None, suffix=suffix, port_lo=lo, port_hi=hi, text=text)
    addr, prefix, ports, bracketed = _split_cidr(text, body)
    network = _parse_network(text, addr, prefix)
    if bracketed and network.version != 6:
        raise _fail(text, "brackets are only for IPv6 addresses")
    if _only_embedded_v4(network):
        raise _fail(
            text,
            "IPv4-mapped, IPv4-compatible and NAT64 addresses are checked as IPv4; "
            "write the IPv4 rule instead",
        )
    lo, hi = _parse_ports(text, ports)
    return Rule(network=network, suffix=None, port_lo=lo, port_hi=hi, text=text)
