"""Destination allowlist for the exit, which must never become an open proxy.

Everything is denied unless a rule allows it, and the address ranges that reach the exit's own
host or its site network stay denied even under a catch-all rule: only a rule written for a
part of such a range opens that part.  The module is pure so it can be tested exhaustively.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

__all__ = ["REASONS", "Decision", "Policy", "PolicyError", "Rule", "parse_rule"]

_Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
_Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

PORT_MIN = 1
PORT_MAX = 65535

# Ranges that must not be reachable through a broad rule: they lead back to the exit host, to
# its site network, or nowhere sensible.  Documentation ranges are deliberately absent because
# the test labs use them as stand-ins for the public internet.
_DENIED_TEXT: tuple[tuple[str, str], ...] = (
    ("unspecified", "0.0.0.0/8"),
    ("unspecified", "::/128"),
    ("loopback", "127.0.0.0/8"),
    ("loopback", "::1/128"),
    ("private", "10.0.0.0/8"),
    ("private", "172.16.0.0/12"),
    ("private", "192.168.0.0/16"),
    ("link_local", "169.254.0.0/16"),
    ("link_local", "fe80::/10"),
    ("cgnat", "100.64.0.0/10"),
    ("multicast", "224.0.0.0/4"),
    ("multicast", "ff00::/8"),
    ("ula", "fc00::/7"),
    ("reserved", "240.0.0.0/4"),
    ("reserved", "255.255.255.255/32"),
    ("reserved", "192.0.0.0/24"),
    ("reserved", "198.18.0.0/15"),
    ("site_local", "fec0::/10"),
)
_DENIED: tuple[tuple[str, _Network], ...] = tuple(
    (name, ipaddress.ip_network(net)) for name, net in _DENIED_TEXT
)

REASONS: tuple[str, ...] = (
    "allowed",
    "no_rule",
    "port",
    "invalid",
    *dict.fromkeys(name for name, _ in _DENIED_TEXT),
)
"""Every value Decision.reason can take, so metric label sets can be created up front."""

# IPv6 forms that a host or a NAT64 gateway turns into IPv4 connections; they are judged as the
# IPv4 address they carry, or "::ffff:127.0.0.1" would slip past the IPv4 loopback denial.
_V4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_V4_COMPAT = ipaddress.IPv6Network("::/96")

# Leading zeros are refused outright: inet_aton reads "0177.0.0.1" as octal 127.0.0.1, while
# the ipaddress module of Python < 3.9.5 read it as decimal 177.0.0.1.
_DOTTED_QUAD = re.compile(r"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}")
_PREFIX = re.compile(r"[0-9]{1,3}")
_PORTS = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?")
_RULE_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# Names from clients are matched leniently (underscores, edge hyphens) but must still be plain
# hostnames, so that nothing a resolver might truncate or reinterpret reaches the suffix test.
_NAME_LABEL = re.compile(r"[a-z0-9_-]{1,63}")
_MAX_NAME = 253


class PolicyError(ValueError):
    """A rule an operator wrote is malformed; the message quotes it so it can be found."""


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
        return _valid_port(port) and self.port_lo <= port <= self.port_hi


@dataclass(frozen=True)
class Decision:
    """The verdict for one connection; reason doubles as a low-cardinality metric label."""

    allowed: bool
    reason: str
    rule: Rule | None


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
    if len(domain) > _MAX_NAME:
        raise _fail(text, f"domain suffix is longer than {_MAX_NAME} characters")
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
    if "." in tail and not _DOTTED_QUAD.fullmatch(tail):
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
    """True for IPv6 rules that could never match, because check() judges these as IPv4."""
    if not isinstance(net, ipaddress.IPv6Network):
        return False
    if net.subnet_of(_V4_MAPPED) or net.subnet_of(_NAT64):
        return True
    return net.subnet_of(_V4_COMPAT) and int(net.network_address) > 1


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


def _denied_range(addr: _Address) -> str | None:
    for name, net in _DENIED:
        if net.version == addr.version and addr in net:
            return name
    return None


def _inside_denied_range(net: _Network) -> bool:
    first, last = net.network_address, net.broadcast_address
    return any(d.version == net.version and first in d and last in d for _, d in _DENIED)


def _unwrap(addr: _Address) -> _Address:
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id:
            addr = ipaddress.IPv6Address(int(addr))  # the zone does not change what is reached
        mapped = addr.ipv4_mapped
        if mapped is not None:
            return mapped
        if addr in _NAT64 or (addr in _V4_COMPAT and int(addr) > 1):
            return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return addr


def _parse_address(address: object) -> _Address | None:
    if isinstance(address, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return _unwrap(address)
    if not isinstance(address, str) or not address.isascii():
        return None
    tail = address.split("%", 1)[0].rsplit(":", 1)[-1]
    if "." in tail and not _DOTTED_QUAD.fullmatch(tail):
        return None
    try:
        return _unwrap(ipaddress.ip_address(address))
    except ValueError:
        return None


def _normalise_name(name: object) -> str | None:
    if not isinstance(name, str) or not name.isascii():
        return None
    host = name[:-1] if name.endswith(".") else name
    host = host.lower()
    if not host or len(host) > _MAX_NAME:
        return None
    if not all(_NAME_LABEL.fullmatch(label) for label in host.split(".")):
        return None
    return host


def _valid_port(port: object) -> bool:
    return isinstance(port, int) and not isinstance(port, bool) and PORT_MIN <= port <= PORT_MAX


def _name_matches(host: str, suffix: str) -> bool:
    return host == suffix or host.endswith("." + suffix)


class Policy:
    """An ordered rule set; the first rule that allows a connection is reported."""

    rules: tuple[Rule, ...]

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(rules)
        for rule in self.rules:
            if not isinstance(rule, Rule):
                raise TypeError(f"expected Rule, got {type(rule).__name__}")
        # Only rules drawn entirely inside a denied range may open it, so a catch-all written
        # for the internet cannot also reach the exit's own network.
        self._openers: tuple[Rule, ...] = tuple(
            r for r in self.rules if r.network is not None and _inside_denied_range(r.network)
        )

    @classmethod
    def from_strings(cls, texts: Iterable[str]) -> Policy:
        if isinstance(texts, str):
            raise TypeError("from_strings takes a list of rules, not a single string")
        return cls([parse_rule(t) for t in texts])

    def __repr__(self) -> str:
        return f"Policy({[r.text for r in self.rules]!r})"

    def may_allow_name(self, name: str, port: int) -> bool:
        """Lets the exit refuse before resolving, so denied names cost no DNS lookup."""
        if not _valid_port(port):
            return False
        host = _normalise_name(name)
        for rule in self.rules:
            if not rule.allows_port(port):
                continue
            if rule.network is not None:
                return True
            if host is not None and rule.suffix is not None and _name_matches(host, rule.suffix):
                return True
        return False

    def check(
        self,
        address: str | ipaddress.IPv4Address | ipaddress.IPv6Address,
        port: int,
        name: str | None = None,
    ) -> Decision:
        """Judge the address that will really be dialled; name only widens via domain rules."""
        addr = _parse_address(address)
        if addr is None:
            return Decision(False, "invalid", None)
        if not _valid_port(port):
            return Decision(False, "port", None)

        denied = _denied_range(addr)
        if denied is not None:
            port_miss = False
            for rule in self._openers:
                net = rule.network
                if net is not None and net.version == addr.version and addr in net:
                    if rule.allows_port(port):
                        return Decision(True, "allowed", rule)
                    port_miss = True
            # A narrow rule opened this address, just not this port: say so.
            return Decision(False, "port" if port_miss else denied, None)

        host = _normalise_name(name) if name is not None else None
        port_miss = False
        for rule in self.rules:
            if rule.network is not None:
                hit = rule.network.version == addr.version and addr in rule.network
            else:
                hit = (
                    host is not None
                    and rule.suffix is not None
                    and _name_matches(host, rule.suffix)
                )
            if hit:
                if rule.allows_port(port):
                    return Decision(True, "allowed", rule)
                port_miss = True
        return Decision(False, "port" if port_miss else "no_rule", None)
