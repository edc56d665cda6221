"""One configuration schema, two front ends: a TOML file and command-line flags.

The options are plain data (:class:`Option`) so that ``--help`` and a
configuration reference can both be generated from them.  Precedence is
defaults < ``--config`` file < flags; a repeatable flag given on the command
line replaces the file's list.  Every problem becomes a one-line
:class:`~relay.errors.ConfigError` naming the option as the operator wrote it
(``--heartbeat`` for a flag, ``heartbeat in /etc/relay/exit.toml`` for the
file), because a daemon on a batch node has nobody to ask what went wrong.
Relative file names in the TOML file are taken relative to that file's
directory (daemons are often started from ``/``); on the command line, relative
to the working directory, as a shell user expects.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

from relay.errors import ConfigError
from relay.exit.policy import PolicyError, Rule, parse_rule
from relay.net.tlslink import parse_fingerprint
from relay.proto.handoff import MAX_WORKERS
from relay.secrets import KEY_ID_RE, check_private

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on old interpreters only
    import tomli as tomllib

__all__ = [
    "EXIT_OPTIONS",
    "KINDS",
    "WORKER_OPTIONS",
    "ExitConfig",
    "ForwardTarget",
    "HostPort",
    "LoginTarget",
    "Option",
    "WorkerConfig",
    "build_parser",
    "load_exit_config",
    "load_worker_config",
    "parse_forward",
    "parse_hostport",
    "parse_login",
    "parse_size",
]

#: Every value kind an :class:`Option` may have; a reference generator can rely on this set.
KINDS = frozenset(
    (
        "str",
        "int",
        "float",
        "bool",
        "hostport",
        "path",
        "secret-path",
        "rule",
        "login",
        "choice",
        "size",
    )
)


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


@dataclass(frozen=True)
class Option:
    """One setting, the same for the flag ``--NAME`` and the TOML key ``KEY``.

    ``min`` is the inclusive lower bound of a number or size (exclusive when
    ``min_exclusive``); for ``hostport`` it is the lowest port accepted (None = 1,
    0 only where picking a free port makes sense).  ``default`` is written the way
    an operator would write it (``"4MiB"``, ``"0.0.0.0:80"``) so a reference can
    show it verbatim; it is parsed like any other value.
    """

    name: str
    kind: str
    default: object
    help: str
    metavar: str | None = None
    repeatable: bool = False
    choices: tuple[str, ...] = ()
    min: float | None = None
    min_exclusive: bool = False

    @property
    def key(self) -> str:
        """The TOML key: TOML bare keys read better with underscores."""
        return self.name.replace("-", "_")

    @property
    def flag(self) -> str:
        """The command-line flag, ``--NAME``."""
        return f"--{self.name}"


# --------------------------------------------------------------------------- schema

_HEARTBEAT_HELP = (
    "longest a carrier stays silent (seconds): the worker sends a PING on a carrier before it"
    " has sent nothing for that long; the exit pings only a carrier it left silent for 1.5"
    " times that (its answers to the worker's PINGs normally prevent it); the agreed interval"
    " is the smaller of worker's and exit's"
)


def _config_option(table: str) -> Option:
    """``--config`` is the one option that cannot appear in the file it names."""
    return Option(
        "config",
        "path",
        None,
        f"TOML file whose [{table}] table holds these options (key = flag name with '_' for"
        " '-'); flags override it. Command line only",
        metavar="FILE",
    )


def _seconds(name: str, default: float, help: str) -> Option:
    """A positive duration in seconds: zero would mean 'never' or 'at once', both wrong."""
    return Option(name, "float", default, help, metavar="SECONDS", min=0, min_exclusive=True)


_HEARTBEAT = _seconds("heartbeat", 25.0, _HEARTBEAT_HELP)
_HEARTBEAT_MISSES = Option(
    "heartbeat-misses",
    "int",
    3,
    "heartbeat intervals without any frame from the peer before a carrier is given up (its"
    " streams move to the other carriers, or wait for a new one)",
    metavar="N",
    min=1,
)


def _tcp_keepalive(owner: str) -> Option:
    """Same setting on both ends; the help says whose sockets it governs."""
    return _seconds(
        "tcp-keepalive",
        60.0,
        f"idle seconds before TCP keepalive probes on sockets the {owner} owns (interval"
        " idle/4, 4 probes; TCP_USER_TIMEOUT matches)",
    )


_REPLAY_BUFFER = Option(
    "replay-buffer",
    "size",
    "4MiB",
    "unacknowledged bytes kept per stream so it survives a lost carrier; also the stream's"
    " flow-control window, how far its sender may run ahead of the peer's acknowledgements"
    " (bytes, or a number with KiB, MiB or GiB)",
    metavar="SIZE",
    min=1,
)
_METRICS = Option(
    "metrics", "hostport", None, "HOST:PORT to serve Prometheus metrics on (default: off)"
)
_LOG_FORMAT = Option("log-format", "choice", "text", "log line format", choices=("text", "json"))
_LOG_LEVEL = Option(
    "log-level",
    "choice",
    "info",
    "lowest level logged",
    choices=("debug", "info", "warning", "error"),
)
_NO_UVLOOP = Option(
    "no-uvloop", "bool", False, "use the stock asyncio event loop even when uvloop is installed"
)

EXIT_OPTIONS: tuple[Option, ...] = (
    _config_option("exit"),
    Option("listen", "hostport", "0.0.0.0:80", "HOST:PORT to accept SOCKS5 connections on"),
    Option(
        "workers",
        "int",
        1,
        "processes accepting on the listen port (SO_REUSEPORT, Linux); above 1 a supervisor"
        " runs them, each with its share of the limits below (see docs/OPERATIONS.md);"
        f" at most {MAX_WORKERS}",
        metavar="N",
        min=1,
    ),
    Option(
        "keys",
        "secret-path",
        None,
        "file of lines KEY_ID SECRET (required; must not be accessible by group/others)",
    ),
    Option(
        "allow",
        "rule",
        (),
        "allowed destinations CIDR[:PORTS] or .domain.suffix[:PORTS]; none = nothing allowed",
        metavar="RULE",
        repeatable=True,
    ),
    Option(
        "allow-plain",
        "bool",
        False,
        "also accept plain SOCKS5 clients with RFC 1929 user=KEY_ID password=SECRET",
    ),
    Option(
        "tls-cert",
        "path",
        None,
        "PEM certificate (chain) to present: with --tls-key, every connection is TLS 1.2+"
        " (typically on port 443; workers verify it with --exit-ca or --exit-fingerprint)",
    ),
    Option(
        "tls-key",
        "secret-path",
        None,
        "PEM private key of --tls-cert, without passphrase (must not be accessible by"
        " group/others)",
    ),
    _METRICS,
    _HEARTBEAT,
    _HEARTBEAT_MISSES,
    _seconds(
        "handshake-timeout",
        10.0,
        "seconds a new connection may take for its handshake (TLS, SOCKS5 greeting and HELLO;"
        " a plain SOCKS5 client: up to its request)",
    ),
    _seconds("connect-timeout", 10.0, "seconds to wait for a destination to accept TCP"),
    Option("max-streams", "int", 50000, "most streams open at once", metavar="N", min=1),
    Option(
        "max-streams-per-key",
        "int",
        20000,
        "most streams open at once for one KEY_ID",
        metavar="N",
        min=1,
    ),
    Option(
        "max-handshakes",
        "int",
        1000,
        "most handshakes (TLS and SOCKS5) in progress at once; when full, a new connection"
        " closes the oldest one that has not authenticated yet",
        metavar="N",
        min=1,
    ),
    Option(
        "max-carriers",
        "int",
        2000,
        "most carriers (authenticated connections from workers, each carrying many streams)"
        " at once; beyond it a new carrier's HELLO is refused as busy",
        metavar="N",
        min=1,
    ),
    Option(
        "max-carriers-per-key",
        "int",
        200,
        "most carriers at once for one KEY_ID: each worker keeps --carriers (2) per exit,"
        " so this caps the workers sharing a key at this / --carriers",
        metavar="N",
        min=1,
    ),
    Option(
        "max-buffered",
        "size",
        "1GiB",
        "most unacknowledged bytes held for all streams together; above it no stream reads"
        " from its destination until workers acknowledge (memory bound of the exit)",
        metavar="SIZE",
        min=1,
    ),
    _tcp_keepalive("exit"),
    _REPLAY_BUFFER,
    _seconds(
        "resume-timeout",
        600.0,
        "seconds a worker's session whose carriers were all lost is parked, its streams'"
        " destination connections open, waiting for the worker to resume it",
    ),
    Option(
        "max-parked",
        "int",
        10000,
        "most parked sessions kept for resumption (0 = never park)",
        metavar="N",
        min=0,
    ),
    _LOG_FORMAT,
    _LOG_LEVEL,
    _NO_UVLOOP,
)

WORKER_OPTIONS: tuple[Option, ...] = (
    _config_option("worker"),
    Option(
        "socks",
        "hostport",
        "127.0.0.1:1080",
        "HOST:PORT of the local SOCKS5 server for the glidein; port 0 picks a free port",
        min=0,
    ),
    Option(
        "socks-auth",
        "secret-path",
        None,
        "file with USER:PASSWORD the local SOCKS5 clients must present"
        " (this or --no-socks-auth is required)",
    ),
    Option(
        "no-socks-auth",
        "bool",
        False,
        "let local SOCKS5 clients in without a password (instead of --socks-auth)",
    ),
    Option(
        "http",
        "hostport",
        None,
        "HOST:PORT of a local HTTP CONNECT proxy listener, with Basic proxy authentication by"
        " the --socks-auth credentials; port 0 picks a free port (default: off)",
        min=0,
    ),
    Option(
        "forward",
        "str",
        (),
        "static forward LOCALHOST:PORT=DESTHOST:PORT: connections to the local (loopback)"
        " port are carried to the destination, for programs that cannot use a proxy",
        metavar="LOCAL:PORT=DEST:PORT",
        repeatable=True,
    ),
    Option(
        "login",
        "login",
        (),
        "[USER@]HOST[:PORT] of login nodes, in failover order",
        metavar="USER@HOST:PORT",
        repeatable=True,
    ),
    Option(
        "ssh-client",
        "choice",
        "openssh",
        "SSH client for the login hop: openssh runs the node's own ssh (crypto in C; honours"
        " ~/.ssh/config: ProxyJump, certificates, GSSAPI); asyncssh is built in, for nodes"
        " without ssh",
        choices=("openssh", "asyncssh"),
    ),
    Option(
        "ssh-config",
        "path",
        None,
        "ssh_config file for --ssh-client openssh instead of ~/.ssh/config (ssh -F)",
    ),
    Option(
        "ssh-key",
        "secret-path",
        None,
        "SSH private key for the login nodes (required with --ssh-client asyncssh; with"
        " openssh, ssh's own configuration may name the key instead)",
    ),
    Option(
        "known-hosts",
        "path",
        None,
        "known_hosts file holding the login nodes' host keys",
    ),
    Option(
        "exit",
        "hostport",
        (),
        "exit address as dialled from the login node",
        repeatable=True,
    ),
    Option(
        "exit-ca",
        "path",
        None,
        "PEM CA certificate(s) (or the exit's self-signed certificate) to verify a TLS exit"
        " with, including its name (--exit host or --exit-server-name); turns TLS on",
    ),
    Option(
        "exit-fingerprint",
        "str",
        (),
        "SHA-256 fingerprint of the TLS exit's certificate (hex, or SHA256:base64 as"
        " relay-exit logs it): accept that certificate only; turns TLS on. Repeat to"
        " accept an old and a new certificate during a change",
        metavar="SHA256",
        repeatable=True,
    ),
    Option(
        "exit-server-name",
        "str",
        None,
        "name the TLS exit's certificate must carry when --exit is an address or another"
        " name (with --exit-ca)",
        metavar="NAME",
    ),
    Option(
        "key-id",
        "str",
        None,
        "KEY_ID of this worker in the exit's --keys file",
        metavar="KEY_ID",
    ),
    Option(
        "secret-file",
        "secret-path",
        None,
        "file holding the SECRET that goes with --key-id",
    ),
    Option(
        "upstream",
        "str",
        None,
        "socks5://HOST:PORT: relay through a plain SOCKS5 server (e.g. an existing dante)"
        " instead of relay-exit; dialled through the login node, or directly without --login"
        " (parsed into HOST:PORT; credentials go in --upstream-auth, not the URL)",
        metavar="socks5://HOST:PORT",
    ),
    Option(
        "upstream-auth",
        "secret-path",
        None,
        "file with USER:PASSWORD for the --upstream SOCKS5 server",
    ),
    _HEARTBEAT,
    _HEARTBEAT_MISSES,
    _seconds("ssh-keepalive", 15.0, "seconds between SSH keepalive requests to the login node"),
    _seconds(
        "connect-timeout",
        15.0,
        "seconds to wait for an SSH login or a connection to the exit or upstream; a new"
        " stream waits this long for a carrier, but fails at once when every exit's last"
        " attempt failed and it has no session to resume",
    ),
    _seconds(
        "reconnect-max",
        30.0,
        "longest wait between attempts to get a lost carrier back (exponential backoff with"
        " jitter, starting at 0.25 s); while none is up, a client asking for a stream cuts"
        " the wait short, at most once a second, unless the exit refused the last HELLO",
    ),
    Option(
        "no-optimistic",
        "bool",
        False,
        "wait for the exit to confirm a stream before answering the local client (a refusal"
        " then is a SOCKS5 / HTTP error reply instead of a reset, at one more round trip)",
    ),
    Option(
        "ssh-connect-rate",
        "float",
        4.0,
        "most new SSH connections per minute to each login node (sites block bursts of logins)",
        metavar="PER_MINUTE",
        min=0,
        min_exclusive=True,
    ),
    _seconds(
        "resume-timeout",
        600.0,
        "seconds streams wait for a carrier when all carriers to their exit are lost, before"
        " the applications' connections are reset (match relay-exit's --resume-timeout)",
    ),
    Option(
        "carriers",
        "int",
        2,
        "carriers kept open to each exit; every stream of the worker is multiplexed on them,"
        " so the login node and the site firewall see this many connections per exit",
        metavar="N",
        min=1,
    ),
    _tcp_keepalive("worker"),
    _REPLAY_BUFFER,
    _METRICS,
    _LOG_FORMAT,
    _LOG_LEVEL,
    _NO_UVLOOP,
)


@dataclass(frozen=True)
class ExitConfig:
    """relay-exit settings after parsing; one field per :data:`EXIT_OPTIONS` key."""

    config_file: Path | None
    listen: HostPort
    workers: int
    keys: Path
    allow: tuple[Rule, ...]
    allow_plain: bool
    tls_cert: Path | None
    tls_key: Path | None
    metrics: HostPort | None
    heartbeat: float
    heartbeat_misses: int
    handshake_timeout: float
    connect_timeout: float
    max_streams: int
    max_streams_per_key: int
    max_handshakes: int
    max_carriers: int
    max_carriers_per_key: int
    max_buffered: int
    tcp_keepalive: float
    replay_buffer: int
    resume_timeout: float
    max_parked: int
    log_format: str
    log_level: str
    no_uvloop: bool


@dataclass(frozen=True)
class WorkerConfig:
    """relay-worker settings after parsing; one field per :data:`WORKER_OPTIONS` key."""

    config_file: Path | None
    socks: HostPort
    socks_auth: Path | None
    no_socks_auth: bool
    http: HostPort | None
    forward: tuple[ForwardTarget, ...]
    login: tuple[LoginTarget, ...]
    ssh_client: str
    ssh_config: Path | None
    ssh_key: Path | None
    known_hosts: Path | None
    exit: tuple[HostPort, ...]
    exit_ca: Path | None
    exit_fingerprint: tuple[bytes, ...]
    exit_server_name: str | None
    key_id: str | None
    secret_file: Path | None
    upstream: HostPort | None
    upstream_auth: Path | None
    heartbeat: float
    heartbeat_misses: int
    ssh_keepalive: float
    connect_timeout: float
    reconnect_max: float
    no_optimistic: bool
    ssh_connect_rate: float
    resume_timeout: float
    carriers: int
    tcp_keepalive: float
    replay_buffer: int
    metrics: HostPort | None
    log_format: str
    log_level: str
    no_uvloop: bool


# --------------------------------------------------------------------------- value parsers

_HOST_LABEL_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_IPV4ISH_RE = re.compile(r"[0-9.]+")
_SIZE_RE = re.compile(r"([0-9]+)\s*(B|KiB|MiB|GiB|TiB)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_USER_RE = re.compile(r"[^\s@:/\\]{1,255}")


def _check_host(host: str) -> str | None:
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
    problem = _check_host(host)
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
    problem = _check_host(host)
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
    raise TypeError(_toml_type(value))


def _parse_upstream(text: str) -> HostPort:
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


# --------------------------------------------------------------------------- conversion


def _toml_type(value: object) -> str:
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


def _err(text: str) -> ConfigError:
    """ConfigError messages are one line: operators grep logs for them."""
    return ConfigError(" ".join(text.splitlines()))


@dataclass(frozen=True)
class _Source:
    """Where a value came from: decides how errors name it and where relative paths start."""

    label: str  # "--heartbeat" / "heartbeat in /etc/relay/exit.toml" / "default of --x"
    base: Path | None = None  # directory for relative paths (the config file's)
    flag: bool = False  # flag values are text; TOML values must already have the right type


_EXPECTED = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "hostport": "a string HOST:PORT",
    "path": "a string (file name)",
    "secret-path": "a string (file name)",
    "rule": "a string (rule)",
    "login": "a string [USER@]HOST[:PORT]",
    "choice": "a string",
    "size": "an integer or a string like '4MiB'",
}


def _bad_type(opt: Option, value: object, src: _Source) -> ConfigError:
    """A value of the wrong TOML type; the value is not echoed (it might be a secret)."""
    return _err(f"{src.label}: expected {_EXPECTED[opt.kind]}, got {_toml_type(value)}")


def _check_min(opt: Option, number: float, raw: object, src: _Source) -> None:
    """Apply the schema's lower bound, quoting the value as the operator wrote it."""
    if opt.min is None:
        return
    if number < opt.min or (opt.min_exclusive and number == opt.min):
        op = ">" if opt.min_exclusive else ">="
        raise _err(f"{src.label}: must be {op} {opt.min:g} (got {raw})")


def _to_number(opt: Option, raw: object, src: _Source) -> int | float:
    """int/float options: TOML numbers or flag text; an int option takes 2.0 but not 2.5."""
    number: int | float
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise _bad_type(opt, raw, src)
    if isinstance(raw, str) and not src.flag:
        raise _bad_type(opt, raw, src)  # not echoed: the value might be a misplaced secret
    if isinstance(raw, str):
        try:
            number = int(raw)
        except ValueError:
            try:
                number = float(raw)
            except ValueError:
                raise _err(f"{src.label}: expected {_EXPECTED[opt.kind]} (got {raw!r})") from None
    else:
        number = raw
    if isinstance(number, float) and not math.isfinite(number):
        raise _err(f"{src.label}: must be a finite number (got {raw})")
    if opt.kind == "int":
        if isinstance(number, float):
            if not number.is_integer():
                raise _err(f"{src.label}: must be a whole number (got {raw})")
            number = int(number)
    else:
        number = float(number)
    _check_min(opt, number, raw, src)
    return number


def _to_path(opt: Option, text: str, src: _Source) -> Path:
    """Resolve a file name (``~`` expanded, file-relative from the file) and check it now.

    Checking at load time turns a typo into a start-up error instead of a failure
    hours later when the first reconnect needs the file.
    """
    if not text or "\0" in text:
        raise _err(f"{src.label}: expected a file name (got {text!r})")
    try:
        path = Path(text).expanduser()
    except RuntimeError:
        raise _err(f"{src.label}: cannot expand ~ in {text!r}") from None
    if src.base is not None and not path.is_absolute():
        path = src.base / path
    if opt.kind == "secret-path":
        check_private(path, src.label)
        return path
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise _err(f"{src.label}: cannot read {path}: {exc.strerror or exc}") from None
    return path


def _convert_one(opt: Option, raw: object, src: _Source) -> object:
    """Turn one flag string or TOML value into the option's Python type, or raise."""
    kind = opt.kind
    if kind in ("int", "float"):
        return _to_number(opt, raw, src)
    if kind == "bool":
        if not isinstance(raw, bool):
            raise _bad_type(opt, raw, src)
        return raw
    if kind == "size":
        try:
            size = parse_size(raw)
        except TypeError:
            raise _bad_type(opt, raw, src) from None
        except ValueError as exc:
            raise _err(f"{src.label}: {exc} (got {raw!r})") from None
        _check_min(opt, size, repr(raw), src)
        return size
    if not isinstance(raw, str):
        raise _bad_type(opt, raw, src)
    if kind in ("path", "secret-path"):
        return _to_path(opt, raw, src)
    if kind == "str":
        return _convert_str(opt, raw, src)
    if kind == "choice":
        if raw not in opt.choices:
            raise _err(f"{src.label}: must be one of {', '.join(opt.choices)} (got {raw!r})")
        return raw
    if kind == "hostport":
        try:
            return parse_hostport(raw, 1 if opt.min is None else int(opt.min))
        except ValueError as exc:
            raise _err(f"{src.label}: bad address {raw!r}: {exc}") from None
    if kind == "login":
        try:
            return parse_login(raw)
        except ValueError as exc:
            raise _err(f"{src.label}: bad login {raw!r}: {exc}") from None
    if kind == "rule":
        try:
            return parse_rule(raw)
        except (PolicyError, ValueError) as exc:
            reason = str(exc).removeprefix(f"invalid rule {raw!r}: ")  # policy quotes it too
            raise _err(f"{src.label}: bad rule {raw!r}: {reason}") from None
    raise AssertionError(f"option {opt.name} has unknown kind {kind!r}")


def _convert_str(opt: Option, raw: str, src: _Source) -> object:
    """Free-text options, with the few that have a shape of their own checked here."""
    if opt.name == "upstream":
        try:
            return _parse_upstream(raw)
        except ValueError as exc:
            raise _err(f"{src.label}: {exc}") from None
    if opt.name == "forward":
        try:
            return parse_forward(raw)
        except ValueError as exc:
            raise _err(f"{src.label}: bad forward {raw!r}: {exc}") from None
    if opt.name == "exit-fingerprint":
        try:
            return parse_fingerprint(raw)
        except ValueError as exc:
            raise _err(f"{src.label}: {exc} (got {raw!r})") from None
    if opt.name == "exit-server-name":
        problem = _check_host(raw)
        if problem:
            raise _err(f"{src.label}: {problem} (got {raw!r})")
        return raw
    if opt.name == "key-id":
        # Not echoed: a secret pasted into the wrong field must not reach the logs.
        if not KEY_ID_RE.fullmatch(raw):
            raise _err(f"{src.label}: key id must be 1-64 characters from A-Z a-z 0-9 . _ -")
        return raw
    if not raw:
        raise _err(f"{src.label}: must not be empty")
    return raw


def _convert(opt: Option, raw: object, src: _Source) -> object:
    """Convert a whole value; repeatable options become tuples (configs are immutable).

    A repeatable key given one string (``exit = "exit.example.org:80"``) means that one
    entry, as the flag given once does."""
    if raw is None:
        return None
    if not opt.repeatable:
        return _convert_one(opt, raw, src)
    if isinstance(raw, tuple):  # a schema default
        raw = list(raw)
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        raise _err(
            f"{src.label}: expected an array (one entry per {opt.flag}) or one string, "
            f"got {_toml_type(raw)}"
        )
    return tuple(_convert_one(opt, item, src) for item in raw)


# --------------------------------------------------------------------------- front ends


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors raise ConfigError, so the CLI reports them like file errors."""

    def error(self, message: str) -> NoReturn:
        """Raise instead of printing usage and exiting 2."""
        raise _err(message)


KIND_METAVAR = {
    # the placeholder a flag of each kind shows in --help and in docs/CONFIG.md
    "str": "TEXT",
    "int": "N",
    "float": "NUMBER",
    "hostport": "HOST:PORT",
    "path": "FILE",
    "secret-path": "FILE",
    "rule": "RULE",
    "login": "USER@HOST:PORT",
    "size": "SIZE",
}


def _help_text(opt: Option) -> str:
    """Option help plus its default and repeatability, escaped for argparse's % formatting."""
    text = opt.help
    if opt.repeatable:
        text += f" (repeatable; TOML: {opt.key} = [...])"
    if opt.default not in (None, False, ()):
        shown = f"{opt.default:g}" if isinstance(opt.default, float) else opt.default
        text += f" (default: {shown})"
    return text.replace("%", "%%")


def build_parser(prog: str, options: Sequence[Option]) -> argparse.ArgumentParser:
    """The flag front end of the schema; values stay raw strings and are parsed by the loader.

    Defaults are suppressed so the loader can tell a flag that was given from one
    that was not, which the file-then-flags precedence needs.  Abbreviations are
    off: ``--heart`` silently meaning ``--heartbeat`` is a trap in job scripts.
    """
    parser = _Parser(
        prog=prog,
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,
        epilog="Every option but --config can also be set in the --config TOML file, with the"
        " flag name as key ('_' for '-'); repeatable options are arrays there (or one"
        " string for one entry). Flags override the file.",
    )
    for opt in options:
        if opt.kind == "bool":
            parser.add_argument(opt.flag, dest=opt.key, action="store_true", help=_help_text(opt))
            continue
        metavar = opt.metavar
        if metavar is None:
            metavar = "{" + ",".join(opt.choices) + "}" if opt.choices else KIND_METAVAR[opt.kind]
        parser.add_argument(
            opt.flag,
            dest=opt.key,
            action="append" if opt.repeatable else "store",
            metavar=metavar,
            help=_help_text(opt),
        )
    return parser


def _suggest(key: str, known: Sequence[str]) -> str:
    """A 'did you mean' hint: most unknown keys are typos or dashes for underscores."""
    if key.replace("-", "_") in known:
        return f"; TOML keys use '_': {key.replace('-', '_')}"
    close = difflib.get_close_matches(key, known, n=1)
    return f"; did you mean {close[0]}?" if close else ""


def _show_key(key: str) -> str:
    """Key as written, quoted when it has characters that would break the one-line message."""
    return key if re.fullmatch(r"[A-Za-z0-9_.-]+", key) else repr(key)


def _read_table(path: Path, table: str, other: str, options: Sequence[Option]) -> dict[str, object]:
    """Read the ``[table]`` of a TOML file, rejecting anything the schema does not know.

    The other daemon's table is tolerated so that one file may configure both ends,
    but a file with only the other daemon's table is refused: it is the wrong file.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _err(f"--config: cannot read {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise _err(f"{path}: not valid UTF-8 (line {line})") from None
    try:
        doc = tomllib.loads(text)
    except (ValueError, RecursionError) as exc:  # TOMLDecodeError is a ValueError
        raise _err(f"{path}: invalid TOML: {exc}") from None
    for name, value in doc.items():
        if name in (table, other):
            if not isinstance(value, dict):
                raise _err(f"{name} in {path}: must be a table [{name}]")
        elif isinstance(value, dict):
            raise _err(f"{path}: unknown table [{_show_key(name)}] (expected [{table}])")
        else:
            raise _err(f"{_show_key(name)} in {path}: keys belong in the [{table}] table")
    if table not in doc and other in doc:
        raise _err(f"{path}: no [{table}] table (its [{other}] table is for relay-{other})")
    section: dict[str, object] = doc.get(table, {})
    known = [o.key for o in options if o.name != "config"]
    for key in section:
        if key == "config":
            raise _err(f"config in {path}: --config can only be given on the command line")
        if key not in known:
            raise _err(
                f"{_show_key(key)} in {path}: unknown key in [{table}]{_suggest(key, known)}"
            )
    return section


@dataclass
class _Loaded:
    """Converted values plus where each came from, for cross-field error messages."""

    values: dict[str, Any]
    labels: dict[str, str]  # key -> label, only for values that were given
    levels: dict[str, int]  # key -> 0 default, 1 file, 2 flag
    config_file: Path | None

    def name(self, opt: Option) -> str:
        """Name an option in a cross-field error: as given, or as flag and key if unset."""
        if opt.key in self.labels:
            return self.labels[opt.key]
        where = f"{opt.key} in {self.config_file}" if self.config_file else f"TOML {opt.key}"
        return f"{opt.flag} ({where})"


def _load(
    prog: str, table: str, other: str, options: Sequence[Option], argv: Sequence[str]
) -> _Loaded:
    """Merge defaults < file < flags and convert every option."""
    flags = vars(build_parser(prog, options).parse_args(list(argv)))
    config_file: Path | None = None
    section: dict[str, object] = {}
    if "config" in flags:
        config_file = Path(flags["config"]).expanduser()
        section = _read_table(config_file, table, other, options)
    loaded = _Loaded({}, {}, {}, config_file)
    for opt in options:
        if opt.name == "config":
            continue
        if opt.key in flags:
            raw, src, level = flags[opt.key], _Source(opt.flag, flag=True), 2
        elif opt.key in section and config_file is not None:
            raw, level = section[opt.key], 1
            src = _Source(f"{opt.key} in {config_file}", config_file.parent)
        else:
            raw, src, level = opt.default, _Source(f"default of {opt.flag}"), 0
        loaded.values[opt.key] = _convert(opt, raw, src)
        loaded.levels[opt.key] = level
        if level:
            loaded.labels[opt.key] = src.label
    return loaded


def _option(options: Sequence[Option], name: str) -> Option:
    """Look an option up by flag name (cross-field checks refer to them by name)."""
    return next(o for o in options if o.name == name)


def load_exit_config(argv: Sequence[str]) -> ExitConfig:
    """Parse relay-exit's flags and ``--config`` file into an :class:`ExitConfig`."""
    loaded = _load("relay-exit", "exit", "worker", EXIT_OPTIONS, argv)
    v = loaded.values
    if v["keys"] is None:
        keys = _option(EXIT_OPTIONS, "keys")
        raise _err(f"missing {loaded.name(keys)}: {keys.help}")
    cert, key = _option(EXIT_OPTIONS, "tls-cert"), _option(EXIT_OPTIONS, "tls-key")
    if (v[cert.key] is None) != (v[key.key] is None):
        given, other = (cert, key) if v[key.key] is None else (key, cert)
        raise _err(f"{loaded.name(given)} needs {loaded.name(other)}: TLS needs both")
    workers = _option(EXIT_OPTIONS, "workers")
    if v["workers"] > MAX_WORKERS:
        raise _err(f"{loaded.name(workers)} is {v['workers']}: at most {MAX_WORKERS}")
    if v["workers"] > 1 and not sys.platform.startswith("linux"):
        raise _err(f"{loaded.name(workers)} above 1 needs Linux (SO_REUSEPORT)")
    return ExitConfig(config_file=loaded.config_file, **v)


def load_worker_config(argv: Sequence[str]) -> WorkerConfig:
    """Parse relay-worker's flags and ``--config`` file into a :class:`WorkerConfig`.

    Cross-field rules: exactly one of --socks-auth / --no-socks-auth (a flag beats
    the file's choice of the other); without --upstream, --exit, --key-id and
    --secret-file; --ssh-key whenever --login with --ssh-client asyncssh. Without --login the
    exit (or upstream) is dialled directly.
    """
    loaded = _load("relay-worker", "worker", "exit", WORKER_OPTIONS, argv)
    v = loaded.values

    def opt(name: str) -> Option:
        return _option(WORKER_OPTIONS, name)

    def missing(name: str, why: str) -> ConfigError:
        return _err(f"missing {loaded.name(opt(name))}: {why}")

    auth, no_auth = opt("socks-auth"), opt("no-socks-auth")
    if v[auth.key] is not None and v[no_auth.key]:
        auth_level, no_auth_level = loaded.levels[auth.key], loaded.levels[no_auth.key]
        if auth_level > no_auth_level:
            v[no_auth.key] = False
        elif no_auth_level > auth_level:
            v[auth.key] = None
        else:
            raise _err(
                f"{loaded.name(auth)} and {loaded.name(no_auth)} are both set: give exactly one"
            )
    elif v[auth.key] is None and not v[no_auth.key]:
        raise _err(
            f"missing {loaded.name(auth)} or {loaded.name(no_auth)}: local SOCKS5 clients need"
            " a password file, or the explicit choice to go without"
        )
    if v["upstream"] is None:
        if not v["exit"]:
            raise missing("exit", "at least one exit address is needed unless --upstream")
        if v["key_id"] is None:
            raise missing("key-id", "the exit needs it to look up this worker's secret")
        if v["secret_file"] is None:
            raise missing("secret-file", "the exit needs proof of the key id")
    if v["login"] and v["ssh_key"] is None and v["ssh_client"] == "asyncssh":
        raise missing("ssh-key", "--ssh-client asyncssh needs it to log in to the --login nodes")
    tls_given = [o for o in ("exit-ca", "exit-fingerprint", "exit-server-name") if v[opt(o).key]]
    if tls_given and v["upstream"] is not None:
        raise _err(
            f"{loaded.name(opt(tls_given[0]))} is for a TLS relay-exit, not --upstream"
            " (a plain SOCKS5 server)"
        )
    if v["exit_server_name"] is not None and v["exit_ca"] is None:
        raise missing("exit-ca", "--exit-server-name names what the CA-signed certificate"
                      " must say; a pinned fingerprint needs no name")  # fmt: skip
    return WorkerConfig(config_file=loaded.config_file, **v)
