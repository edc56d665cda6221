"""The readiness gate: is the chain up, hop by hop, before COMMAND starts?

In-process (the worker runs in the wrapper): SSH to a login node, then for every ``--probe``
a tunnel carrier opened exactly as the worker opens one for a stream (HELLO with the exit and
a CONNECT to the probe), closed again at once with a reset. Without probes, a HELLO alone with
every configured exit. Attached to a running worker: a SOCKS5 handshake with its listener and
a CONNECT through it to every probe.

A failed attempt raises :class:`NotReady` naming the hop: ``ssh`` (login node), ``exit``
(the login node cannot reach the exit, or the exit refuses our HELLO), ``probe`` (the exit
cannot or will not connect to the probe), ``upstream`` (``--upstream`` mode), ``relay`` (the
attached worker's listener) or ``chain`` (the attached worker failed somewhere behind it).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Sequence
from typing import Any, Callable, Optional

import asyncssh

from relay.addresses import format_hostport
from relay.config import HostPort
from relay.proto import ProtocolError
from relay.proto import frames as fr
from relay.proto import hello as hl
from relay.proto import socks5 as s5
from relay.sshhop import SshUnavailable
from relay.tlslink import connect_tls
from relay.worker import OpenFailed, RelayWorker

log = logging.getLogger("glidein_wrapper")

#: SOCKS5 replies that mean "the far end answered, and said no" rather than "a hop is down".
REFUSALS = frozenset(
    (
        s5.NOT_ALLOWED,
        s5.NETWORK_UNREACHABLE,
        s5.HOST_UNREACHABLE,
        s5.CONNECTION_REFUSED,
        s5.TTL_EXPIRED,
        s5.COMMAND_NOT_SUPPORTED,
        s5.ADDRESS_TYPE_NOT_SUPPORTED,
    )
)


class NotReady(Exception):
    """One hop of the chain is not usable (yet)."""

    def __init__(self, hop: str, why: str) -> None:
        super().__init__(f"{hop}: {why}")
        self.hop = hop
        self.why = why


class Check(abc.ABC):
    """One readiness attempt; ``hop`` says which hop it is working on (for a timeout)."""

    hop = "relay"

    @abc.abstractmethod
    async def __call__(self) -> None:
        """Walk the chain once; raise :class:`NotReady` naming the hop that failed."""

    def silence(self, timeout: float) -> str:
        """Why, when the attempt on ``self.hop`` was still waiting at the deadline."""
        return f"no answer within the {timeout:g} s ready timeout"


async def wait_ready(
    check: Check, timeout: float, clock: Callable[[], float] = time.monotonic
) -> float:
    """Repeat ``check`` until it passes or ``timeout`` seconds are up; return the time taken.

    Attempts back off from 1 s to 15 s, so a login node that is down is not hammered (JSC
    treats bursts of ssh logins as an intrusion). Raises the last :class:`NotReady`.
    """
    started = clock()
    deadline = started + timeout
    delay = 1.0
    last: Optional[NotReady] = None
    while True:
        remaining = deadline - clock()
        try:
            await asyncio.wait_for(check(), max(remaining, 0.001))
            return clock() - started
        except NotReady as exc:
            last = exc
        except asyncio.TimeoutError:
            # An attempt cut short says less than the failure before it, if there was one.
            if last is None:
                last = NotReady(check.hop, check.silence(timeout))
        remaining = deadline - clock()
        if remaining <= 0:
            raise last
        log.warning(
            "chain not ready yet",
            extra={"fields": {"hop": last.hop, "why": last.why, "retry_in": min(delay, remaining)}},
        )
        await asyncio.sleep(min(delay, remaining))
        delay = min(delay * 2, 15.0)


class InProcessCheck(Check):
    """Readiness of the worker running in this process, through its own SSH hop and carriers."""

    def __init__(self, worker: RelayWorker, probes: Sequence[HostPort]) -> None:
        self.worker = worker
        self.probes = list(probes)
        self.hop = "ssh" if worker.ssh is not None else "exit"
        self._current: Optional[HostPort] = None

    async def __call__(self) -> None:
        worker = self.worker
        if worker.ssh is not None:
            self.hop = "ssh"
            try:
                await worker.ssh.connection()
            except SshUnavailable as exc:
                raise NotReady("ssh", str(exc)) from None
        if worker.settings.upstream is not None:
            await self._upstream()
        elif self.probes:
            for probe in self.probes:
                await self._probe(probe)
        else:
            for exit_host, exit_port in worker.settings.exits:
                self.hop = "exit"
                await hello_check(worker, exit_host, exit_port)

    def silence(self, timeout: float) -> str:
        if self.hop == "exit" and self._current is not None:
            return (
                f"no answer through the exit for {self._current} within the {timeout:g} s ready"
                " timeout (the exit, or the probe behind it, does not answer)"
            )
        return super().silence(timeout)

    async def _probe(self, probe: HostPort) -> None:
        worker = self.worker
        self.hop = "exit"
        self._current = probe
        try:
            carrier, opened, _ = await worker.open_carrier(probe.host, probe.port)
        except OpenFailed as exc:
            lost_ssh = worker.ssh is not None and not worker.ssh.connected
            raise NotReady("ssh" if lost_ssh else "exit", str(exc)) from None
        self.hop = "probe"
        code = opened.connected.code if opened.connected is not None else s5.GENERAL_FAILURE
        _reset_carrier(carrier)
        if code != s5.SUCCEEDED:
            answer = s5.REPLY_NAMES.get(code, f"reply {code}")
            raise NotReady("probe", f"{probe}: the exit answered: {answer}")

    async def _upstream(self) -> None:
        for probe in self.probes:
            self.hop = "upstream"
            try:
                sock = await self.worker.open_upstream(probe.host, probe.port)
            except OpenFailed as exc:
                hop = "probe" if exc.code in REFUSALS else "upstream"
                raise NotReady(hop, f"{probe}: {exc}") from None
            sock.close()


def _reset_carrier(carrier: Any) -> None:
    """End a probe's stream for good: the exit resets the probe connection and forgets it."""
    with contextlib.suppress(OSError, RuntimeError, asyncssh.Error):
        carrier.link.write(fr.encode_reset(fr.RST_SHUTDOWN, "readiness probe"))
    carrier.link.close()


# --------------------------------------------------------------------------- HELLO only


class _HelloExchange:
    """Greeting and HELLO with an exit; ``result`` resolves when it accepted us (or not)."""

    def __init__(self, secret: bytes, key_id: str, heartbeat: float) -> None:
        self.result: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._secret = secret
        self._client = s5.Socks5Client({hl.METHOD_TUNNEL: hl.decode_reply})
        self._hello = hl.encode_hello(
            secret,
            key_id,
            int(time.time() * 1000),
            os.urandom(hl.NONCE_SIZE),
            hl.NEW_SESSION,
            0,
            int(heartbeat * 1000),
        )

    def first_flight(self) -> bytes:
        return self._client.greeting(bytes((hl.METHOD_TUNNEL,))) + self._hello

    def feed(self, data: bytes) -> None:
        if self.result.done():
            return
        try:
            events = self._client.receive(data)
        except ProtocolError as exc:
            self._fail(f"bad answer from the exit: {exc}")
            return
        for event in events:
            if isinstance(event, s5.MethodSelected) and event.method != hl.METHOD_TUNNEL:
                self._fail("the exit refused the tunnel method (is it a relay-exit?)")
                return
            if isinstance(event, s5.SubNegotiation):
                reply = event.message
                assert isinstance(reply, hl.HelloReply)
                if reply.status != hl.OK:
                    status = hl.STATUS_NAMES.get(reply.status, str(reply.status))
                    self._fail(f"the exit refused our HELLO: {status}")
                elif not hl.verify_reply(reply, self._secret, self._hello[-hl.MAC_SIZE :]):
                    self._fail("the exit's HELLO reply failed authentication (wrong secret?)")
                else:
                    self.result.set_result(None)
                return

    def closed(self, why: str) -> None:
        self._fail(f"the exit closed the connection during HELLO ({why})")

    def _fail(self, why: str) -> None:
        if not self.result.done():
            self.result.set_exception(NotReady("exit", why))


class _SshHelloSession(asyncssh.SSHTCPSession[bytes]):
    def __init__(self, exchange: _HelloExchange) -> None:
        self.exchange = exchange

    def connection_made(self, chan: Any) -> None:
        chan.write(self.exchange.first_flight())

    def data_received(self, data: bytes, datatype: Any) -> None:
        self.exchange.feed(data)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.exchange.closed(str(exc) if exc else "closed")


class _TcpHelloProtocol(asyncio.Protocol):
    def __init__(self, exchange: _HelloExchange) -> None:
        self.exchange = exchange

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.exchange.first_flight())  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.exchange.feed(data)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.exchange.closed(str(exc) if exc else "closed")


async def hello_check(worker: RelayWorker, exit_host: str, exit_port: int) -> None:
    """HELLO with one exit, through the login node like a carrier, then close.

    The exit logs it as a handshake that ended before a CONNECT; give ``--probe`` to check a
    real destination instead.
    """
    settings = worker.settings
    exchange = _HelloExchange(settings.secret, settings.key_id, settings.heartbeat)
    where = format_hostport(exit_host, exit_port)
    link: Any
    try:
        if settings.exit_tls is not None:  # TLS inside the channel, as the carriers do it
            raw: Any = await worker.ssh.connection() if worker.ssh else asyncio.get_running_loop()
            link, _ = await connect_tls(
                lambda factory: raw.create_connection(factory, exit_host, exit_port),
                lambda: _TcpHelloProtocol(exchange), settings.exit_tls, exit_host,
                settings.connect_timeout,
            )  # fmt: skip
        elif worker.ssh is not None:
            conn = await worker.ssh.connection()
            link, _ = await conn.create_connection(
                lambda: _SshHelloSession(exchange), exit_host, exit_port
            )
        else:
            loop = asyncio.get_running_loop()
            link, _ = await loop.create_connection(
                lambda: _TcpHelloProtocol(exchange), exit_host, exit_port
            )
    except SshUnavailable as exc:
        raise NotReady("ssh", str(exc)) from None
    except asyncssh.ChannelOpenError as exc:
        raise NotReady("exit", f"login node cannot reach exit {where}: {exc.reason}") from None
    except OSError as exc:
        raise NotReady("exit", f"cannot reach exit {where}: {exc}") from None
    try:
        await exchange.result
    finally:
        link.close()


# --------------------------------------------------------------------------- attached worker


VERDICT_WAIT = 10.0
"""Seconds an attached probe waits for the exit's answer behind an optimistic reply."""


class AttachedCheck(Check):
    """Readiness through a running worker's SOCKS5 listener (``--attach``)."""

    def __init__(
        self,
        listener: HostPort,
        credentials: tuple[str, str],
        probes: Sequence[HostPort],
        connect_timeout: float = 30.0,
    ) -> None:
        self.listener = listener
        self.credentials = credentials
        self.probes = list(probes)
        self.connect_timeout = connect_timeout

    async def __call__(self) -> None:
        if not self.probes:
            await self._socks(None)
        for probe in self.probes:
            await self._socks(probe)

    async def _socks(self, probe: Optional[HostPort]) -> None:
        """Greeting and password with the listener, then CONNECT to ``probe`` if given."""
        self.hop = "relay"
        where = str(self.listener)
        try:
            reader, writer = await asyncio.open_connection(self.listener.host, self.listener.port)
        except OSError as exc:
            raise NotReady("relay", f"cannot reach the relay at {where}: {exc}") from None
        try:
            client = s5.Socks5Client()
            writer.write(client.greeting(bytes((s5.USERPASS,))))
            user, password = self.credentials
            async for event in _events(client, reader):
                if isinstance(event, s5.MethodSelected):
                    if event.method != s5.USERPASS:
                        raise NotReady("relay", f"{where} refused user/password authentication")
                    writer.write(client.userpass(user, password))
                elif isinstance(event, s5.AuthReply):
                    if not event.ok:
                        raise NotReady("relay", f"{where} refused the --attach-auth credentials")
                    if probe is None:
                        return
                    self.hop = "chain"
                    writer.write(client.request(s5.CMD_CONNECT, probe.host, probe.port))
                elif isinstance(event, s5.Reply):
                    if event.code == s5.SUCCEEDED:
                        if event.port == 0:  # answered before the exit: optimistic data
                            assert probe is not None
                            await self._verdict(probe, reader, writer)
                        return
                    answer = s5.REPLY_NAMES.get(event.code, f"reply {event.code}")
                    hop = "probe" if event.code in REFUSALS else "chain"
                    raise NotReady(hop, f"{probe}: the relay answered: {answer}")
            raise NotReady(self.hop, f"{where} closed the connection")
        except (OSError, ProtocolError) as exc:
            raise NotReady(self.hop, f"{where}: {exc}") from None
        finally:
            writer.close()

    async def _verdict(
        self, probe: HostPort, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """The worker answered before the exit did; learn the exit's answer from the stream.

        Half-closing makes a destination that accepted close too (a clean end of stream); a
        stream the exit refused is reset. A destination that stays open is taken as ready.
        """
        writer.write_eof()
        try:
            await asyncio.wait_for(reader.read(), VERDICT_WAIT)
        except asyncio.TimeoutError:
            return
        except ConnectionResetError:
            raise NotReady(
                "probe", f"{probe}: the exit refused the stream (reset; the worker's log says why)"
            ) from None


async def _events(client: s5.Socks5Client, reader: asyncio.StreamReader) -> Any:
    """SOCKS5 client events as the listener's answers arrive, until it closes."""
    while True:
        data = await reader.read(65536)
        if not data:
            return
        for event in client.receive(data):
            yield event
