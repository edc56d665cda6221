"""The readiness gate: is the chain up, hop by hop, before COMMAND starts?

In-process (the worker runs in the wrapper): SSH to a login node, then for every ``--probe``
a stream on the worker's own session with an exit (an OPEN on one of its carriers), reset
again as soon as the exit answered. Without probes, the worker's session with every configured
exit must have a carrier up (its HELLO accepted). Attached to a running worker: a SOCKS5
handshake with its listener and a CONNECT through it to every probe.

A failed attempt raises :class:`NotReady` naming the hop: ``ssh`` (login node), ``exit``
(the login node cannot reach the exit, or the exit refuses our HELLO), ``probe`` (the exit
cannot or will not connect to the probe), ``upstream`` (``--upstream`` mode), ``relay`` (the
attached worker's listener) or ``chain`` (the attached worker failed somewhere behind it).
"""

from __future__ import annotations

import abc
import asyncio
import logging
import os
import time
from collections.abc import Sequence
from typing import Any, Callable, Optional

from relay.config.values import HostPort
from relay.errors import DialFailed, OpenFailed
from relay.net.addresses import format_hostport
from relay.net.backoff import Backoff
from relay.net.carrier import TunnelRefused
from relay.net.pump import SHUTDOWN, StreamInfo
from relay.net.sshhop import SshUnavailable
from relay.proto import ProtocolError, mux
from relay.proto import hello as hl
from relay.proto import socks5 as s5
from relay.proto.errors import RelayError
from relay.worker.daemon import RelayWorker
from relay.worker.dialler import DialTimes

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

#: HELLO refusals that no wait fixes within a job's start-up: our key or protocol version.
#: (A clock skew or a busy exit may pass; those wait for the ready timeout.)
FINAL_REFUSALS = frozenset((hl.BAD_AUTH, hl.BAD_VERSION))

SESSION_POLL = 0.05
"""Seconds between looks at the worker's sessions while the gate waits for one."""


class NotReady(RelayError):
    """One hop of the chain is not usable (yet); ``final`` when waiting cannot change that
    (the login nodes or the exits refused our key), so the gate gives up at once instead of
    at its timeout. ``reason`` is the hop, as the wrapper logs it."""

    def __init__(self, hop: str, why: str, final: bool = False) -> None:
        super().__init__(f"{hop}: {why}", reason=hop)
        self.hop = hop
        self.why = why
        self.final = final


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
    backoff = Backoff(1.0, 2.0, 15.0)
    last: Optional[NotReady] = None
    while True:
        remaining = deadline - clock()
        try:
            await asyncio.wait_for(check(), max(remaining, 0.001))
            return clock() - started
        except NotReady as exc:
            if exc.final:
                raise
            last = exc
        except asyncio.TimeoutError:
            # An attempt cut short says less than the failure before it, if there was one.
            if last is None:
                last = NotReady(check.hop, check.silence(timeout))
        remaining = deadline - clock()
        if remaining <= 0:
            raise last
        delay = backoff.next()
        log.warning(
            "chain not ready yet",
            extra={"fields": {"hop": last.hop, "why": last.why, "retry_in": min(delay, remaining)}},
        )
        await asyncio.sleep(min(delay, remaining))


class InProcessCheck(Check):
    """Readiness of the worker running in this process, through its own SSH hop and sessions."""

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
                raise NotReady("ssh", str(exc), final=exc.final) from None
        if worker.settings.upstream is not None:
            await self._upstream()
        elif self.probes:
            for probe in self.probes:
                await self._probe(probe)
        else:
            for exit_addr in worker.settings.exit:
                await self._session([exit_addr])

    def silence(self, timeout: float) -> str:
        if self.hop == "exit" and self._current is not None:
            return (
                f"no answer through the exit for {self._current} within the {timeout:g} s ready"
                " timeout (the exit, or the probe behind it, does not answer)"
            )
        if self.hop == "exit":
            return (
                f"no carrier to the exit within the {timeout:g} s ready timeout (the login node"
                " or the exit does not answer)"
            )
        return super().silence(timeout)

    def _down(self, why: str) -> NotReady:
        """The session is not up: the SSH hop if the login node was lost, else the exit."""
        worker = self.worker
        lost_ssh = worker.ssh is not None and not worker.ssh.connected
        return NotReady("ssh" if lost_ssh else "exit", why)

    async def _session(self, exits: Sequence[tuple[str, int]]) -> None:
        """Wait until the worker's session with one of ``exits`` has a carrier up (the HELLO
        accepted); fail as soon as every one of them has failed an attempt."""
        self.hop = "exit"
        self._current = None
        clients = [self.worker.exits[e] for e in exits if e in self.worker.exits]
        if not clients:
            raise NotReady("exit", "no exit configured")
        while not any(client.usable for client in clients):
            if all(client.why for client in clients):
                reasons = []
                for client in clients:
                    where = format_hostport(*client.exit)
                    reasons.append(client.why if where in client.why else f"{where}: {client.why}")
                down = self._down("; ".join(reasons))
                down.final = all(c.refused and c.refusal in FINAL_REFUSALS for c in clients)
                raise down
            await asyncio.sleep(SESSION_POLL)

    async def _probe(self, probe: HostPort) -> None:
        """A stream to ``probe`` on the worker's session, reset again once the exit answered."""
        worker = self.worker
        await self._session(worker.settings.exit)
        self._current = probe
        try:
            address = s5.encode_address(probe.host, probe.port)
        except ValueError as exc:
            raise NotReady("probe", f"{probe}: {exc}") from None
        try:
            client = await worker.pick_exit()
        except OpenFailed as exc:
            raise self._down(str(exc)) from None
        answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def answered(code: int, bound: bytes) -> None:
            if not answer.done():
                answer.set_result(code)

        info = StreamInfo(os.urandom(4).hex(), str(probe), worker.settings.key_id or "")
        pump = client.open(address, info, answered)
        try:
            while not answer.done():
                if pump.done is not None:
                    raise NotReady("exit", f"{probe}: the stream ended before the exit answered")
                await asyncio.wait((answer,), timeout=SESSION_POLL)
        finally:
            if pump.done is None:
                refused = answer.done() and answer.result() != s5.SUCCEEDED
                if refused:
                    pump.discard()  # the session already forgot it, and told the exit
                else:  # open, or not answered yet: the exit resets it and forgets it
                    pump.abandon(SHUTDOWN, "readiness probe", mux.RST_SHUTDOWN)
        code = answer.result()
        if code != s5.SUCCEEDED:
            answer_name = s5.REPLY_NAMES.get(code, f"reply {code}")
            raise NotReady("probe", f"{probe}: the exit answered: {answer_name}")

    async def _upstream(self) -> None:
        for probe in self.probes:
            self.hop = "upstream"
            try:
                sock = await self.worker.open_upstream(probe.host, probe.port)
            except OpenFailed as exc:
                hop = "probe" if exc.code in REFUSALS else "upstream"
                raise NotReady(hop, f"{probe}: {exc}") from None
            sock.close()


# --------------------------------------------------------------------------- HELLO only


async def hello_check(worker: RelayWorker, exit_host: str, exit_port: int) -> None:
    """A new session's HELLO with one exit, on a carrier dialled as the worker dials its own
    (through the login node, TLS inside when configured), closed again at once. The session
    has no stream, so the exit ends it with the carrier. Raises :class:`NotReady`.

    The gate itself looks at the running worker's sessions instead; this checks an exit with
    a worker that is not running (its settings and SSH hop only)."""
    where = format_hostport(exit_host, exit_port)
    times = DialTimes()
    try:
        carrier, _ = await worker.dialler.connect((exit_host, exit_port), times=times)
    except DialFailed as exc:
        hop = "ssh" if exc.reason == SshUnavailable.reason else "exit"
        raise NotReady(hop, str(exc)) from None
    except TunnelRefused as exc:
        if exc.stage == "method":
            why = "the exit refused the tunnel method (is it a relay-exit?)"
        else:
            why = f"the exit refused our HELLO: {hl.STATUS_NAMES.get(exc.status, exc.status)}"
        raise NotReady("exit", why) from None
    except asyncio.TimeoutError:
        if times.stage == "channel":
            raise NotReady("exit", f"no connection to exit {where}") from None
        raise NotReady("exit", f"no HELLO reply from exit {where}") from None
    carrier.close()


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
