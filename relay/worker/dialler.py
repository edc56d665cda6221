"""The worker's one way to an exit: a carrier through the login node (a direct-tcpip channel,
or a connection to ssh's forward), TLS inside when configured, or plain TCP; then the HELLO.

The worker's sessions, ``relay check`` and the glidein wrapper's readiness gate all dial here,
so what the check or the gate passes is what the worker does. A failure is classified once,
as the worker counts it in ``relay_carriers_total``: :class:`~relay.errors.DialFailed` (its
``reason`` the result label, its ``__cause__`` the error as the transport, TLS or ssh gave
it) or :class:`~relay.net.carrier.TunnelRefused` from the exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import asyncssh

from relay.errors import ChannelRefused, DialFailed
from relay.metrics import Metrics
from relay.net.addresses import format_hostport
from relay.net.carrier import SshCarrier, TcpCarrier, TunnelRefused, carrier_opener
from relay.net.openssh import OpenSshConnection
from relay.net.sockopts import set_keepalive, set_nodelay, transport_socket
from relay.net.sshhop import Connection, Login, SshHop, SshUnavailable, slot_for
from relay.net.tlslink import TlsError, TlsVerifyError, connect_tls
from relay.proto import ProtocolError
from relay.proto import hello as hl
from relay.proto.opener import Established
from relay.worker.settings import WorkerSettings

log = logging.getLogger("relay.worker")

Carrier = Union[SshCarrier, TcpCarrier]

Session = tuple[bytes, bytes]
"""(session id, session key) of a session a carrier joins."""


@dataclass
class DialTimes:
    """How far a carrier attempt got and how long each stage took, filled in as it goes (a
    failed attempt too), for ``relay check``'s report.

    ``stage`` is ``channel`` while the byte pipe (channel or TCP, and TLS) opens, ``hello``
    while the exit's answer is awaited, ``up`` once it accepted. A channel the login node
    refused after ssh's forward accepted it fails in ``channel``, not ``hello``.
    """

    stage: str = "channel"
    channel_s: Optional[float] = None
    hello_s: Optional[float] = None
    sent_wall: Optional[float] = None
    """Wall clock when the first flight went."""
    answered_wall: Optional[float] = None
    """Wall clock when the exit's answer arrived."""

    def clock_skew(self, est: Established) -> tuple[float, float]:
        """(exit's clock minus ours, the bound of the error) in seconds: the exit's timestamp
        against the middle of the HELLO round trip."""
        assert self.sent_wall is not None and self.answered_wall is not None
        middle = (self.sent_wall + self.answered_wall) / 2
        return est.exit_time_ms / 1000 - middle, (self.answered_wall - self.sent_wall) / 2


def ssh_hop(
    settings: WorkerSettings, metrics: Metrics, logins: Optional[Sequence[Login]] = None
) -> Optional[SshHop]:
    """The SSH hop for the settings' login nodes (or ``logins``); None without any."""
    s = settings
    if logins is None:
        logins = [Login(*target) for target in s.login]
    if not logins:
        return None
    hop = SshHop(
        logins,
        s.ssh_key,
        s.known_hosts,
        metrics,
        keepalive=s.ssh_keepalive,
        connect_timeout=s.connect_timeout,
        connects_per_minute=s.ssh_connect_rate,
        client=s.ssh_client,
        ssh_config=s.ssh_config,
        connections=s.ssh_connections,
    )
    _set_forwards(hop, s)
    return hop


def _set_forwards(hop: SshHop, settings: WorkerSettings) -> None:
    """What an ssh process forwards (--ssh-client openssh): read when it starts."""
    hop.targets = [] if settings.upstream else list(settings.exit)
    hop.tcp_targets = [settings.upstream] if settings.upstream else []


class Dialler:
    """Opens the worker's carriers and runs their HELLO; owns the SSH hop (``ssh``, None
    without login nodes), which every carrier and the upstream forward share.

    Carrier place k of an exit goes through the hop's slot k mod ``--ssh-connections``,
    so an exit's carriers spread over the SSH connections; the upstream forward uses slot 0.
    """

    def __init__(self, settings: WorkerSettings, metrics: Metrics, ssh: Optional[SshHop]) -> None:
        self.settings = settings
        self.metrics = metrics
        self.ssh = ssh
        self._forward: Optional[tuple[Any, Any]] = None

    def slot_up(self, place: int) -> bool:
        """A carrier at ``place`` would ride an SSH connection that is up (or needs none)."""
        if self.ssh is None:
            return True
        return self.ssh.slot_connected(slot_for(place, self.ssh.connections))

    def set_forwards(self) -> None:
        """Re-read what ssh forwards from the settings (taken when an ssh process starts)."""
        if self.ssh is not None:
            _set_forwards(self.ssh, self.settings)

    async def close(self) -> None:
        if self.ssh is not None:
            # A login node that no longer answers must not keep the worker from stopping.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.ssh.close(), 5)

    # -- carriers ----------------------------------------------------------------------------
    async def connect(
        self,
        exit_addr: tuple[str, int],
        session: Optional[Session] = None,
        times: Optional[DialTimes] = None,
        place: int = 0,
    ) -> tuple[Carrier, Established]:
        """The exit's carrier at ``place`` in ``session`` (a new one when None), bounded as the
        worker bounds it: --connect-timeout (and 5 s for an SSH login) to open,
        --connect-timeout for the HELLO. Raises what :meth:`open` and :meth:`hello` raise."""
        s = self.settings
        opening = self.open(exit_addr, times=times, place=place)
        carrier = await asyncio.wait_for(opening, s.connect_timeout + 5)
        est = await self.hello(carrier, session, s.connect_timeout, times)
        return carrier, est

    async def open(
        self,
        exit_addr: tuple[str, int],
        via: Optional[Connection] = None,
        timeout: Optional[float] = None,
        times: Optional[DialTimes] = None,
        place: int = 0,
    ) -> Carrier:
        """A carrier to the exit, TLS verified when configured, HELLO not yet sent.

        Through ``via`` (a login connection of the caller's), else the SSH hop's slot for
        carrier ``place`` (:func:`~relay.net.sshhop.slot_for`), else TCP.
        ``timeout`` bounds opening the channel (TLS has --connect-timeout for its handshake).
        Raises :class:`DialFailed`, counted in relay_carriers_total.
        """
        times = times if times is not None else DialTimes()
        times.stage = "channel"
        started = time.monotonic()
        conn = via
        try:
            try:
                if conn is None and self.ssh is not None:
                    conn = await self.ssh.connection(slot_for(place, self.ssh.connections))
                carrier = await self._carrier(exit_addr, conn, timeout)
            finally:
                times.channel_s = time.monotonic() - started
        except SshUnavailable as exc:
            self.metrics.carriers.labels(exc.reason).inc()
            raise DialFailed(f"no login node: {exc}", exc.reason) from exc
        except (OSError, asyncssh.Error, asyncio.TimeoutError) as exc:
            refused = None
            if isinstance(conn, OpenSshConnection) and not isinstance(exc, TlsVerifyError):
                refused = await refused_channel(conn, started)
            failed = self._dial_failed(exit_addr, exc, refused)
            self.metrics.carriers.labels(failed.reason).inc()
            raise failed from refused or exc
        return carrier

    async def _carrier(
        self, exit_addr: tuple[str, int], conn: Optional[Connection], timeout: Optional[float]
    ) -> Carrier:
        host, port = exit_addr
        tls = self.settings.exit_tls
        carrier: Carrier
        if tls is not None:
            opener: Any = conn if conn is not None else asyncio.get_running_loop()
            link, inner = await connect_tls(
                lambda factory: opener.create_connection(factory, host, port),
                TcpCarrier,
                tls,
                host,
                self.settings.connect_timeout,
            )
            assert isinstance(inner, TcpCarrier)
            carrier = inner
            transport = link.raw
        else:
            transport, carrier = await self._pipe(conn, exit_addr, SshCarrier, TcpCarrier, timeout)
        if conn is None:
            sock = transport_socket(transport)
            set_keepalive(sock, self.settings.tcp_keepalive)
            set_nodelay(sock)
        elif isinstance(conn, OpenSshConnection):
            carrier.via = conn
        return carrier

    async def _pipe(
        self,
        conn: Optional[Connection],
        target: tuple[str, int],
        ssh_factory: Callable[[], Any],
        tcp_factory: Callable[[], Any],
        timeout: Optional[float],
    ) -> tuple[Any, Any]:
        """(transport, protocol) of a byte pipe to ``target``: an SSH channel (asyncssh),
        a connection to ssh's forward (openssh) or TCP."""
        host, port = target
        opening: Any
        if isinstance(conn, OpenSshConnection):
            opening = conn.create_connection(tcp_factory, host, port)
        elif conn is not None:
            opening = conn.create_connection(ssh_factory, host, port)
        else:
            opening = asyncio.get_running_loop().create_connection(tcp_factory, host, port)
        return await asyncio.wait_for(opening, timeout)

    async def reach(
        self,
        target: tuple[str, int],
        via: Optional[Connection] = None,
        timeout: Optional[float] = None,
    ) -> None:
        """Open a byte pipe to ``target`` through ``via`` (or TCP) and close it again: the
        path is there. Errors are raised as the transport or asyncssh gave them."""
        transport, _ = await self._pipe(
            via, target, asyncssh.SSHTCPSession, asyncio.Protocol, timeout
        )
        transport.close()

    def _dial_failed(
        self, exit_addr: tuple[str, int], exc: BaseException, refused: Optional[ChannelRefused]
    ) -> DialFailed:
        """The worker's words for a carrier that did not open (and the TLS failures' log
        line and auth-failure count)."""
        host, port = exit_addr
        where = format_hostport(host, port)
        if refused is not None:
            return DialFailed(
                f"login node cannot reach exit {where}: {refused.why}", refused.reason
            )
        if isinstance(exc, asyncssh.ChannelOpenError):
            return DialFailed(
                f"login node cannot reach exit {host}:{port}: {exc.reason}", "exit-unreachable"
            )
        if isinstance(exc, TlsVerifyError):
            self.metrics.auth_failures.labels(exc.reason).inc()
            log.warning(
                "exit refused: its TLS certificate is not the one configured",
                extra={"fields": {"exit": where, "why": str(exc)}},
            )
            return DialFailed(
                f"exit {where} refused: {exc} (check --exit-ca / --exit-fingerprint)",
                "tls-failed",
            )
        if isinstance(exc, TlsError):
            return DialFailed(
                f"TLS with exit {where} failed: {exc} (does the exit have --tls-cert?)",
                exc.reason,
            )
        said = "timed out" if isinstance(exc, asyncio.TimeoutError) and not str(exc) else exc
        return DialFailed(f"cannot reach exit {host}:{port}: {said}", "exit-unreachable")

    # -- the HELLO ---------------------------------------------------------------------------
    async def hello(
        self,
        carrier: Carrier,
        session: Optional[Session] = None,
        timeout: Optional[float] = None,
        times: Optional[DialTimes] = None,
    ) -> Established:
        """The carrier's HELLO: a new session (the key's secret) or a join of ``session``
        (its key); the exit's answer within ``timeout``.

        Raises :class:`TunnelRefused` when the exit refused it, :class:`DialFailed` when
        the carrier broke (``exit-unreachable``: the login node refused its channel), and
        asyncio.TimeoutError (not counted). The carrier is closed on any failure.
        """
        s = self.settings
        session_id, key = session if session is not None else (hl.NEW_SESSION, s.secret)
        times = times if times is not None else DialTimes()
        times.stage = "hello"
        established = carrier.established
        established.add_done_callback(_retrieve)
        sent = time.monotonic()
        times.sent_wall = time.time()
        carrier.start(carrier_opener(key, s.key_id or "", s.heartbeat, session_id))
        try:
            try:
                est = await asyncio.wait_for(asyncio.shield(established), timeout)
            finally:
                times.hello_s = time.monotonic() - sent
        except TunnelRefused as exc:
            carrier.close()
            self.metrics.carriers.labels("refused").inc()
            self.metrics.auth_failures.labels(exc.reason).inc()
            raise
        except (ProtocolError, ConnectionError) as exc:
            carrier.close()
            refused = await carrier.channel_failure()
            if refused is not None:
                # The HELLO never reached the exit: the channel is what failed.
                times.stage = "channel"
                times.channel_s = (times.channel_s or 0.0) + (time.monotonic() - sent)
                times.hello_s = None
                self.metrics.carriers.labels(refused.reason).inc()
                login = carrier.via.get_extra_info("login") if carrier.via else None
                raise DialFailed(
                    f"login node {login.host if login else ''} cannot reach the exit:"
                    f" {refused.why}",
                    refused.reason,
                ) from refused
            self.metrics.carriers.labels("failed").inc()
            raise DialFailed(f"tunnel handshake: {exc}", "failed") from exc
        except BaseException:
            carrier.close()
            raise
        times.answered_wall = time.time()
        times.stage = "up"
        self.metrics.carriers.labels("ok").inc()
        self.metrics.carrier_handshake.observe(time.monotonic() - sent)
        return est

    # -- the upstream (--upstream mode) ------------------------------------------------------
    async def upstream_address(self) -> tuple[str, int]:
        """Where to reach the plain SOCKS5 upstream: itself, or a loopback port forwarded
        over the SSH hop's first slot (like ``ssh -L``). Raises :class:`DialFailed` without a
        login."""
        upstream = self.settings.upstream
        assert upstream is not None
        if self.ssh is None:
            return upstream
        try:
            conn = await self.ssh.connection()
        except SshUnavailable as exc:
            raise DialFailed(f"no login node: {exc}", exc.reason) from exc
        if isinstance(conn, OpenSshConnection):
            return "127.0.0.1", conn.local_port(*upstream)
        if self._forward is None or self._forward[0] is not conn:
            listener = await conn.forward_local_port("127.0.0.1", 0, *upstream)
            self._forward = (conn, listener)
        return "127.0.0.1", int(self._forward[1].get_port())


async def refused_channel(conn: OpenSshConnection, since: float) -> Optional[ChannelRefused]:
    """The refusal ssh logged for a channel opened after ``since``, if any."""
    why = await conn.channel_failure(since)
    return ChannelRefused(why) if why is not None else None


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a HELLO's failure as seen (it is raised from the wait, or not at all)."""
    if not future.cancelled():
        future.exception()
