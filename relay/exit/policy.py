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

from relay.config.values import (
    DOTTED_QUAD_RE,
    MAX_NAME,
    NAT64,
    V4_COMPAT,
    Rule,
    parse_rule,
    valid_port,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

__all__ = ["REASONS", "Decision", "Policy"]

_Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
_Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

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

# Names from clients are matched leniently (underscores, edge hyphens) but must still be plain
# hostnames, so that nothing a resolver might truncate or reinterpret reaches the suffix test.
_NAME_LABEL = re.compile(r"[a-z0-9_-]{1,63}")


@dataclass(frozen=True)
class Decision:
    """The verdict for one connection; reason doubles as a low-cardinality metric label."""

    allowed: bool
    reason: str
    rule: Rule | None


def _denied_range(addr: _Address) -> str | None:
    for name, net in _DENIED:
        if net.version == addr.version and addr in net:
            return name
    return None


def _inside_denied_range(net: _Network) -> bool:
    first, last = net.network_address, net.broadcast_address
    return any(d.version == net.version and first in d and last in d for _, d in _DENIED)


def _unwrap(addr: _Address) -> _Address:
    """The IPv4 address an IPv6 form carries, or "::ffff:127.0.0.1" would slip past the IPv4
    loopback denial."""
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id:
            addr = ipaddress.IPv6Address(int(addr))  # the zone does not change what is reached
        mapped = addr.ipv4_mapped
        if mapped is not None:
            return mapped
        if addr in NAT64 or (addr in V4_COMPAT and int(addr) > 1):
            return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return addr


def _parse_address(address: object) -> _Address | None:
    if isinstance(address, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return _unwrap(address)
    if not isinstance(address, str) or not address.isascii():
        return None
    tail = address.split("%", 1)[0].rsplit(":", 1)[-1]
    if "." in tail and not DOTTED_QUAD_RE.fullmatch(tail):
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
    if not host or len(host) > MAX_NAME:
        return None
    if not all(_NAME_LABEL.fullmatch(label) for label in host.split(".")):
        return None
    return host


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
        if not valid_port(port):
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
        if not valid_port(port):
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
