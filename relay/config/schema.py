"""The option schema: every setting of relay-exit, relay-worker and ``relay check``, once.

The options are plain data (:class:`Option`) so that ``--help``, the configuration reference
(docs/CONFIG.md), the loader and the daemons' settings objects are all generated from them;
each default is written here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.proto.handoff import MAX_PROCESSES

__all__ = [
    "CHECK_OPTIONS",
    "EXIT_OPTIONS",
    "KINDS",
    "KIND_METAVAR",
    "WORKER_OPTIONS",
    "Option",
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


# --------------------------------------------------------------------------- tables

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


_RESUME_TIMEOUT = 600.0  # both ends: the worker waits as long as the exit keeps its session
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
        f" at most {MAX_PROCESSES}",
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
        _RESUME_TIMEOUT,
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
    Option(
        "ssh-connections",
        "int",
        1,
        "SSH connections kept to the login nodes; carrier k of each exit rides connection"
        " k mod N, so with N = --carriers each carrier has its own. Worth raising for bulk"
        " transfer, when one sshd process on the login node (or one ssh here) doing all the"
        " crypto is the limit; many small streams gain nothing. It costs N logins per login"
        " node at start (all within --ssh-connect-rate), N sshd processes on the login node"
        " and N ssh processes on this node (--ssh-client openssh)",
        metavar="N",
        min=1,
    ),
    _seconds(
        "resume-timeout",
        _RESUME_TIMEOUT,
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


CHECK_OPTIONS: tuple[Option, ...] = (
    Option(
        "probe",
        "hostport",
        (),
        "destination to open a stream to through the exit (e.g. the collector); each is"
        " one 'connect' hop, an OPEN on the check's one carrier. Command line only",
        repeatable=True,
    ),
    Option("json", "bool", False, "print one JSON document instead of lines. Command line only"),
)
"""``relay check``'s own flags; every relay-worker option is accepted as well."""
