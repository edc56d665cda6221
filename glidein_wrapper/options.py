"""The wrapper's command line: ``glidein-wrapper [OPTIONS] -- COMMAND [ARGS...]``."""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, Optional, Union

from relay.config.values import HostPort, parse_hostport

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

TARDIS_VARIABLE = "TardisDroneUuid"

#: What a TardisDroneUuid may look like: it goes into an HTCondor config value in quotes.
DRONE_UUID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


class UsageError(Exception):
    """A bad command line; the message is one line naming the option."""


@dataclass
class WrapperOptions:
    command: list[str]
    config: Optional[Path] = None
    drone_uuid: Optional[str] = None
    probes: list[HostPort] = field(default_factory=list)
    direct: list[Network] = field(default_factory=list)
    remote_dns: bool = True
    preload: Optional[Path] = None
    container_env: bool = False
    proxy_env: bool = True
    http: bool = True
    ready_timeout: float = 120.0
    drain_timeout: float = 10.0
    status_interval: float = 300.0
    attach: Optional[HostPort] = None
    attach_auth: Optional[Path] = None
    run_dir: Optional[Path] = None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="glidein-wrapper",
        usage="glidein-wrapper --config WORKER.toml [OPTIONS] -- COMMAND [ARGS...]",
        allow_abbrev=False,
        description="Run COMMAND (e.g. a glidein) behind the relay: start the relay worker in"
        " this process (or attach to a running one), wait until the chain is ready, make"
        " COMMAND and its children use the relay through proxychains-ng, forward signals, and"
        " exit with COMMAND's status. Exit codes: COMMAND's (128+N if killed by signal N),"
        " 75 chain not ready in time (COMMAND not started), 2 usage or configuration error,"
        " 1 cannot start.",
    )
    add = parser.add_argument
    add("--config", metavar="FILE", help="relay-worker TOML file ([worker] table)")
    add(
        "--drone-uuid",
        metavar="UUID",
        help="TardisDroneUuid to advertise in the startd ClassAd (default: the TardisDroneUuid"
        " environment variable, if set)",
    )
    add(
        "--probe",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="destination that must be reachable through the chain before COMMAND starts,"
        " e.g. the collector (repeatable)",
    )
    add(
        "--direct",
        action="append",
        default=[],
        metavar="CIDR",
        help="network COMMAND reaches directly, not through the relay, e.g. the login nodes'"
        " squid (repeatable)",
    )
    dns = parser.add_mutually_exclusive_group()
    dns.add_argument(
        "--remote-dns",
        dest="remote_dns",
        action="store_true",
        default=True,
        help="resolve names at the exit, not on the node (default)",
    )
    dns.add_argument(
        "--no-remote-dns",
        dest="remote_dns",
        action="store_false",
        help="resolve names on the node (needed when --direct hosts are given by name)",
    )
    add("--preload", metavar="PATH", help="the proxychains-ng library (default: searched)")
    add(
        "--container-env",
        action="store_true",
        help="also export every setting as SINGULARITYENV_* and APPTAINERENV_*",
    )
    add(
        "--no-proxy-env",
        dest="proxy_env",
        action="store_false",
        help="do not set ALL_PROXY/https_proxy/NO_PROXY; leave everything to the interposer",
    )
    add(
        "--no-http",
        dest="http",
        action="store_false",
        help="do not start an HTTP CONNECT listener when the worker config has none",
    )
    add(
        "--ready-timeout",
        type=_seconds,
        default=WrapperOptions.ready_timeout,
        metavar="SECONDS",
        help=f"(default {WrapperOptions.ready_timeout:g})",
    )
    add(
        "--drain-timeout",
        type=_seconds,
        default=WrapperOptions.drain_timeout,
        metavar="SECONDS",
        help="after COMMAND exits, how long open streams may finish"
        f" (default {WrapperOptions.drain_timeout:g})",
    )
    add(
        "--status-interval",
        type=_seconds,
        default=WrapperOptions.status_interval,
        metavar="SECONDS",
        help=f"seconds between one-line status logs (default {WrapperOptions.status_interval:g})",
    )
    add("--attach", metavar="HOST:PORT", help="use a running relay-worker's SOCKS5 listener")
    add("--attach-auth", metavar="FILE", help="USER:PASSWORD file of the --attach listener")
    add(
        "--run-dir",
        metavar="DIR",
        help="where the private per-run directory is made (default: $TMPDIR or /tmp)",
    )
    return parser


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def parse_args(argv: Sequence[str]) -> WrapperOptions:
    """Parse ``OPTIONS -- COMMAND [ARGS...]``; raise UsageError with a one-line reason."""
    args = list(argv)
    if "--" in args:
        cut = args.index("--")
        options, command = args[:cut], args[cut + 1 :]
    else:
        options, command = args, []
    ns = build_parser().parse_args(options)
    if not command:
        raise UsageError("missing COMMAND: glidein-wrapper [OPTIONS] -- COMMAND [ARGS...]")
    opts = WrapperOptions(
        command=command,
        remote_dns=ns.remote_dns,
        container_env=ns.container_env,
        proxy_env=ns.proxy_env,
        http=ns.http,
        ready_timeout=ns.ready_timeout,
        drain_timeout=ns.drain_timeout,
        status_interval=ns.status_interval,
    )
    if ns.attach is not None:
        if ns.config is not None:
            raise UsageError("--attach and --config exclude each other")
        if ns.attach_auth is None:
            raise UsageError("--attach needs --attach-auth FILE (USER:PASSWORD)")
        opts.attach = _hostport("--attach", ns.attach)
        opts.attach_auth = Path(ns.attach_auth).expanduser()
    elif ns.attach_auth is not None:
        raise UsageError("--attach-auth is only for --attach")
    elif ns.config is None:
        raise UsageError("missing --config WORKER.toml (or --attach HOST:PORT)")
    else:
        opts.config = Path(ns.config).expanduser()
    # TARDIS spells the variable this way; HTCondor's drone config reads it as is.
    uuid = ns.drone_uuid if ns.drone_uuid is not None else os.environ.get(TARDIS_VARIABLE)
    if uuid:
        if not DRONE_UUID_RE.fullmatch(uuid):
            where = "--drone-uuid" if ns.drone_uuid is not None else "$TardisDroneUuid"
            raise UsageError(f"{where}: not a drone uuid (letters, digits, '.', '_', ':', '-')")
        opts.drone_uuid = uuid
    opts.probes = [_hostport("--probe", text) for text in ns.probe]
    opts.direct = [_network(text) for text in ns.direct]
    if ns.preload is not None:
        opts.preload = Path(ns.preload).expanduser()
    if ns.run_dir is not None:
        opts.run_dir = Path(ns.run_dir).expanduser()
    return opts


def _hostport(flag: str, text: str) -> HostPort:
    try:
        return parse_hostport(text)
    except ValueError as exc:
        raise UsageError(f"{flag}: bad address {text!r}: {exc}") from None


def _network(text: str) -> Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise UsageError(f"--direct: not an address or CIDR network: {text!r}") from None
