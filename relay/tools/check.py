"""``relay check``: walk the worker's chain hop by hop; say which hop fails, why, and the fix.

Hops, in order, each timed:

``ssh``
    each login node: TCP, key exchange, host key against known_hosts, public key login, by the
    worker's SSH client (``--ssh-client``: the system's ssh, or asyncssh).
``tcp``
    the exit through each login node that let us in (the direct-tcpip channel the worker opens
    for each of its carriers; with ssh, a connection to its forward), or straight to the exit
    when no login node is configured.
``hello``
    the tunnel HELLO on that channel, starting a new session: both ends prove the shared
    secret; the exit's timestamp gives the clock skew, its answer the agreed heartbeat.
``connect``
    each ``--probe`` destination through the exit: an OPEN frame on the carrier, answered by
    the exit's REPLY (its policy and its reach). One carrier serves every probe.
``heartbeat``
    one PING/PONG on the carrier: the round trip the session's keepalive pays.

The check is built from the worker's own parts (:class:`~relay.net.sshhop.SshHop`, the
:class:`~relay.worker.dialler.Dialler` that opens carriers and runs their HELLO, the session
state machine and its driver), so what passes here is what the worker does. Without ``--probe``
the session OPENs ``0.0.0.0:9``, which every exit refuses by policy (the unspecified address is
always denied): that proves the session works and that the policy is on, at the price of one
``relay_policy_denials_total{reason="unspecified"}`` at the exit. Probe streams end with FIN (a
reset after two seconds if the destination does not close), so the exit logs them like any
stream; when the check closes its carrier the exit's session has no stream left, so it ends
instead of being parked for a resume.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional, Union

import asyncssh

from relay.config.loading import build_parser, load_worker_config
from relay.config.schema import CHECK_OPTIONS, WORKER_OPTIONS
from relay.config.values import parse_hostport
from relay.errors import ChannelRefused, ConfigError, DialFailed
from relay.logs import setup_logging
from relay.metrics import Metrics
from relay.net.addresses import format_hostport
from relay.net.carrier import TunnelRefused
from relay.net.muxpump import MuxDriver, MuxPump
from relay.net.openssh import OpenSshConnection, OpenSshError
from relay.net.pump import RESET, StreamInfo
from relay.net.sshhop import Connection, Login
from relay.net.tlslink import TlsError, TlsVerifyError
from relay.proto import ProtocolError, mux
from relay.proto import hello as hl
from relay.proto import session as ms
from relay.proto import socks5 as s5
from relay.proto.opener import AuthFailed, Established
from relay.worker.dialler import Carrier, Dialler, DialTimes, refused_channel, ssh_hop
from relay.worker.settings import WorkerSettings

__all__ = ["CHECK_OPTIONS", "Hop", "check_chain", "check_main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"

SELF_TEST = ("0.0.0.0", 9)
"""Destination of the OPEN when no probe is given: denied by every exit's policy."""
SKEW_WARN_S = hl.CLOCK_WINDOW_S / 2
FIN_WAIT_S = 2.0
"""How long a probe stream waits for the destination to close after our FIN, then resets."""
HOST_KEY_PEEK_S = 3.0
"""Longest wait for the login node's host key after ssh logged in: ssh does not say which key
it saw, so the report fetches it once more."""
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"


@dataclass
class Hop:
    """One line of the report."""

    name: str
    target: str
    status: str
    seconds: Optional[float] = None
    detail: str = ""
    cause: str = ""
    fix: str = ""
    facts: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "hop": self.name,
            "target": self.target,
            "status": self.status,
            "ms": None if self.seconds is None else round(self.seconds * 1000, 3),
            "detail": self.detail,
            "cause": self.cause,
            "fix": self.fix,
            "facts": self.facts,
        }


# --------------------------------------------------------------------------- the session


class _ProbePump(MuxPump):
    """One probe stream: no plain side; ``answer`` gets the exit's REPLY, ``ended`` the
    stream's result. What the destination sends is dropped."""

    def __init__(self, driver: MuxDriver, sid: int, info: StreamInfo) -> None:
        loop = asyncio.get_running_loop()
        self.answer: asyncio.Future[tuple[int, bytes]] = loop.create_future()
        self.ended: asyncio.Future[str] = loop.create_future()
        self.opened_at = time.monotonic()
        super().__init__(driver, sid, info, plain_is_client=True, on_done=self._ended)

    def on_data(self, payload: Any) -> None:
        """Dropped: a probe only needs the stream to open."""

    def _ended(self, pump: MuxPump, result: str) -> None:
        if not self.ended.done():
            self.ended.set_result(result)


class _CheckSession:
    """A one-carrier v2 session, run as the worker runs its own: every probe is an OPEN on
    the carrier, the heartbeat one PING on it."""

    CID = 1

    def __init__(
        self,
        settings: WorkerSettings,
        carrier: Carrier,
        est: Established,
        metrics: Metrics,
    ) -> None:
        s = settings
        self.key_id = s.key_id or ""
        self.loop = asyncio.get_running_loop()
        self.gone: asyncio.Future[str] = self.loop.create_future()
        self.probes: dict[int, _ProbePump] = {}
        self._pong: Optional[asyncio.Future[float]] = None
        session = ms.Session(
            ms.WORKER,
            heartbeat=est.heartbeat_ms / 1000,
            now=self.loop.time(),
            misses=s.heartbeat_misses,
            window=s.replay_buffer,
            tombstone_ttl=s.resume_timeout,
        )
        self.driver = MuxDriver(
            session,
            metrics,
            on_rtt=self._rtt,
            on_answer=self._answered,
            on_link_lost=self._lost,
        )
        carrier.join(self.driver, self.CID, est)

    # -- driver hooks -----------------------------------------------------------------------
    def _answered(self, sid: int, code: int, address: bytes) -> None:
        pump = self.probes.get(sid)
        if pump is None:
            return
        if not pump.answer.done():
            pump.answer.set_result((code, address))
        if code != s5.SUCCEEDED:
            pump.discard()  # refused: the session forgot the stream and told the exit so

    def _lost(self, cid: int, why: str) -> None:
        if not self.gone.done():
            self.gone.set_result(why)

    def _rtt(self, carrier: int, seconds: float) -> None:
        if self._pong is not None and not self._pong.done():
            self._pong.set_result(seconds)

    # -- what the check does ----------------------------------------------------------------
    async def wait(self, future: asyncio.Future[Any], timeout: float) -> Any:
        """``future``'s result; ConnectionError when the carrier goes first."""
        if not future.done() and not self.gone.done():
            await asyncio.wait(
                (future, self.gone), timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        if future.done():
            return future.result()
        if self.gone.done():
            raise ConnectionError(f"the carrier closed: {self.gone.result()}")
        raise asyncio.TimeoutError()

    def open(self, host: str, port: int) -> _ProbePump:
        """An OPEN to ``host:port``; ValueError for an address SOCKS5 cannot carry."""
        sid = self.driver.session.open(s5.encode_address(host, port))
        info = StreamInfo(os.urandom(4).hex(), format_hostport(host, port), self.key_id)
        pump = _ProbePump(self.driver, sid, info)
        self.probes[sid] = pump
        return pump

    async def ping(self, timeout: float) -> float:
        """Round trip of one PING on the carrier, with the token format the daemons use."""
        session = self.driver.session
        carrier = session.carriers.get(self.CID)
        if carrier is None:
            why = self.gone.result() if self.gone.done() else "not in the session"
            raise ConnectionError(f"the carrier closed: {why}")
        self._pong = self.loop.create_future()
        carrier.control.append(mux.encode_ping(int(self.loop.time() * 1e6)))
        if session.on_output is not None:
            session.on_output(self.CID)  # the driver writes it
        rtt: float = await self.wait(self._pong, timeout)
        return rtt

    async def close(self) -> None:
        """FIN on every open probe stream and wait for the exit to finish it (a reset after
        FIN_WAIT_S); reset the rest; then close the carrier. The exit is left with no
        stream, so it ends the session instead of parking it for a resume."""
        opened = [
            p
            for p in self.probes.values()
            if p.done is None and p.answer.done() and p.answer.result()[0] == s5.SUCCEEDED
        ]
        for pump in opened:
            pump.plain_eof()
        if opened and not self.gone.done():
            await asyncio.wait([p.ended for p in opened] + [self.gone], timeout=FIN_WAIT_S)
        for pump in list(self.probes.values()):
            if pump.done is None:
                pump.abandon(RESET, "relay check done")
        self.driver.close("relay check done")


class _Attempt:
    """What the carrier got to (``times``: the stage and how long each took) and the error
    that stopped it, as the transport, TLS, ssh or the exit gave it."""

    def __init__(self) -> None:
        self.times = DialTimes()
        self.error: Optional[BaseException] = None
        self.established: Optional[Established] = None
        self.carrier: Optional[Carrier] = None


# --------------------------------------------------------------------------- the check


class Checker:
    """Runs the hops for a worker's settings; ``report`` sees each hop as it completes."""

    def __init__(
        self,
        settings: WorkerSettings,
        probes: Sequence[tuple[str, int]] = (),
        report: Optional[Callable[[Hop], None]] = None,
    ) -> None:
        self.settings = settings
        self.probes = list(probes)
        self.timeout = settings.connect_timeout
        self.hops: list[Hop] = []
        self._report = report
        self._metrics = Metrics("check")  # the SSH hop and the dialler count into it; never served
        self._dialler = Dialler(settings, self._metrics, None)  # through each login in turn

    def add(self, hop: Hop) -> Hop:
        self.hops.append(hop)
        if self._report is not None:
            self._report(hop)
        return hop

    async def run(self) -> list[Hop]:
        s = self.settings
        targets: list[tuple[str, int]] = [s.upstream] if s.upstream is not None else list(s.exit)
        if not s.login:
            for target in targets:
                await self._path(None, None, target)
            return self.hops
        for login in [Login(*target) for target in s.login]:
            conn = await self._ssh(login)
            if conn is None:
                for target in targets:
                    self.add(
                        Hop(
                            "tcp",
                            f"{format_hostport(*target)} via {login.host}",
                            SKIP,
                            detail=f"not checked: ssh to {login.host} failed",
                        )
                    )
                continue
            try:
                for target in targets:
                    await self._path(login, conn, target)
            finally:
                conn.close()
                await conn.wait_closed()
        return self.hops

    # -- ssh --------------------------------------------------------------------------------
    async def _ssh(self, login: Login) -> Optional[Connection]:
        s = self.settings
        user = login.user or getpass.getuser()
        target = f"{user}@{format_hostport(login.host, login.port)}"
        hop = ssh_hop(s, self._metrics, [login])
        assert hop is not None
        started = time.monotonic()
        try:
            conn = await asyncio.wait_for(hop.connect_to(login), self.timeout + 5)
        except Exception as exc:
            elapsed = time.monotonic() - started
            cause, fix, why = await self._ssh_failure(login, user, exc)
            self.add(Hop("ssh", target, FAIL, elapsed, cause=cause, fix=fix, facts=why))
            return None
        elapsed = time.monotonic() - started
        if isinstance(conn, OpenSshConnection):
            detail, seen = await self._openssh_ok(login)
            self.add(Hop("ssh", target, OK, elapsed, detail=detail, facts=seen))
            return conn
        facts: dict[str, Any] = {"client": "asyncssh", "auth": "publickey"}
        client = _key_fingerprint(s.ssh_key)
        if client:
            facts["client_key"] = client
        server = conn.get_server_host_key()
        if server is not None:
            facts["host_key"] = f"{server.get_algorithm()} {server.get_fingerprint()}"
        where = str(s.known_hosts) if s.known_hosts else DEFAULT_KNOWN_HOSTS
        detail = f"auth publickey {client or ''}".rstrip()
        if "host_key" in facts:
            detail += f"; host key {facts['host_key']} matches {where}"
        self.add(Hop("ssh", target, OK, elapsed, detail=detail, facts=facts))
        return conn

    async def _openssh_ok(self, login: Login) -> tuple[str, dict[str, Any]]:
        """The ssh hop's detail when the system's ssh logged in. ssh does not tell which key
        and host key it used; the host key is fetched once more (a key exchange, no login)
        and shown when known_hosts lists it."""
        s = self.settings
        facts: dict[str, Any] = {"client": "openssh"}
        detail = "ssh (OpenSSH client) logged in"
        client = _key_fingerprint(s.ssh_key)
        if client:
            facts["client_key"] = client
            detail += f" with {client}"
        elif s.ssh_key is None:
            detail += " with the key its configuration names"
        presented = await self._presented_host_key(login, min(self.timeout, HOST_KEY_PEEK_S))
        if presented:
            known = s.known_hosts or Path(DEFAULT_KNOWN_HOSTS).expanduser()
            where = str(s.known_hosts) if s.known_hosts else DEFAULT_KNOWN_HOSTS
            if presented in _known_keys(known, login):
                facts["host_key"] = presented
                detail += f"; host key {presented} matches {where}"
        return detail, facts

    async def _ssh_failure(
        self, login: Login, user: str, exc: BaseException
    ) -> tuple[str, str, dict[str, Any]]:
        facts: dict[str, Any] = {"error": type(exc).__name__}
        if isinstance(exc, OpenSshError):
            facts.update(client="openssh", kind=exc.kind, ssh_said=str(exc))
            return await self._openssh_failure(login, user, exc, facts)
        facts["client"] = "asyncssh"
        if isinstance(exc, asyncssh.HostKeyNotVerifiable):
            return await self._host_key_failure(login, facts)
        if isinstance(exc, asyncssh.PermissionDenied):
            return self._wrong_key(login, user, facts)
        if isinstance(exc, ConnectionRefusedError):
            return self._refused(login, user, facts)
        if isinstance(exc, asyncio.TimeoutError):
            return self._no_answer(login, facts)
        if isinstance(exc, socket.gaierror):
            return self._unresolved(login, str(exc.strerror or exc), facts)
        if isinstance(exc, (asyncssh.KeyImportError, asyncssh.KeyEncryptionError)):
            return self._bad_key(str(exc), facts)
        if isinstance(exc, asyncssh.DisconnectError):
            return self._closed(login, exc.reason or type(exc).__name__, facts)
        return (
            f"cannot connect to {login.host} port {login.port}: {exc or type(exc).__name__}",
            "check --login and that this node can reach the login node",
            facts,
        )

    async def _openssh_failure(
        self, login: Login, user: str, exc: OpenSshError, facts: dict[str, Any]
    ) -> tuple[str, str, dict[str, Any]]:
        """ssh exited before its forwards were up: ``exc.kind`` is what its stderr said."""
        said = str(exc)
        if exc.kind == "host-key":
            return await self._host_key_failure(login, facts)
        if exc.kind == "auth":
            return self._wrong_key(login, user, facts)
        if exc.kind == "refused":
            return self._refused(login, user, facts)
        if exc.kind == "timeout":
            return self._no_answer(login, facts)
        if exc.kind == "resolve":
            return self._unresolved(login, said.rsplit(": ", 1)[-1], facts)
        if exc.kind == "key":
            return self._bad_key(said, facts)
        if exc.kind == "closed":
            return self._closed(login, said, facts)
        if exc.kind == "missing":
            return (
                f"no ssh on PATH: {said}",
                "install openssh-client or use --ssh-client asyncssh",
                facts,
            )
        if exc.kind == "forward":
            return (
                f"ssh could not set up its local forwards: {said}",
                "ssh needs to create Unix sockets in $XDG_RUNTIME_DIR (or $TMPDIR): check that"
                " it can write there; or use --ssh-client asyncssh",
                facts,
            )
        config = f" -F {self.settings.ssh_config}" if self.settings.ssh_config else ""
        return (
            f"ssh to {login.host} port {login.port} failed: {said}",
            f"run ssh -v{config} -p {login.port} {user}@{login.host} from this node to see"
            " why; or use --ssh-client asyncssh",
            facts,
        )

    def _wrong_key(
        self, login: Login, user: str, facts: dict[str, Any]
    ) -> tuple[str, str, dict[str, Any]]:
        s = self.settings
        node = socket.gethostname()
        if s.ssh_key is None:  # openssh: its configuration chose the keys
            return (
                f"wrong key: {login.host} refused the public key login of {user} with every"
                " key ssh offered (no --ssh-key: the keys its configuration names)",
                f"put the public key in ~{user}/.ssh/authorized_keys on {login.host}, with a"
                f" from= list that includes this node ({node}); or name the key you"
                " registered with --ssh-key",
                facts,
            )
        key_file = str(s.ssh_key)
        fingerprint = _key_fingerprint(s.ssh_key)
        facts["client_key"] = fingerprint
        return (
            f"wrong key: {login.host} refused the public key login of {user} with"
            f" {key_file} ({fingerprint or 'unreadable key'})",
            f"put {key_file}.pub in ~{user}/.ssh/authorized_keys on {login.host}, with a"
            f" from= list that includes this node ({node}); check that"
            " --ssh-key names the key you registered",
            facts,
        )

    def _refused(
        self, login: Login, user: str, facts: dict[str, Any]
    ) -> tuple[str, str, dict[str, Any]]:
        return (
            f"connection refused: nothing listens on {login.host} port {login.port} (sshd down"
            " or wrong port)",
            f"check the host and port in --login; try ssh -p {login.port} {user}@{login.host}"
            " from this node",
            facts,
        )

    def _no_answer(self, login: Login, facts: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
        return (
            f"no answer from {login.host} port {login.port} within {self.timeout:g} s",
            "check that this node can reach the login node (site firewall, host name, the"
            " node being down)",
            facts,
        )

    def _unresolved(
        self, login: Login, why: str, facts: dict[str, Any]
    ) -> tuple[str, str, dict[str, Any]]:
        return (
            f"cannot resolve {login.host}: {why}",
            "check the host name in --login and this node's DNS",
            facts,
        )

    def _bad_key(self, why: str, facts: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
        key_file = str(self.settings.ssh_key) if self.settings.ssh_key else "the default key"
        return (
            f"cannot load the SSH key {key_file}: {why}",
            "--ssh-key must name an unencrypted OpenSSH private key (ssh-keygen -N '')",
            facts,
        )

    def _closed(
        self, login: Login, why: str, facts: dict[str, Any]
    ) -> tuple[str, str, dict[str, Any]]:
        return (
            f"{login.host} closed the connection: {why}",
            "look at sshd's log on the login node (MaxStartups, a ban after too many logins)",
            facts,
        )

    async def _host_key_failure(
        self, login: Login, facts: dict[str, Any]
    ) -> tuple[str, str, dict[str, Any]]:
        s = self.settings
        name = login.host if login.port == 22 else f"[{login.host}]:{login.port}"
        presented = await self._presented_host_key(login)
        if presented:
            facts["presented_host_key"] = presented
        shown = f" presented {presented}" if presented else ""
        if s.known_hosts is None:
            return (
                f"host key not verifiable: {login.host}{shown} is not in ~/.ssh/known_hosts",
                "set --known-hosts to a file with the login node's host key, checked against"
                " the fingerprint the site publishes",
                facts,
            )
        expected = _known_keys(s.known_hosts, login)
        if expected:
            facts["expected_host_keys"] = expected
            return (
                f"host key mismatch: {login.host}{shown}, but {s.known_hosts} expects"
                f" {', '.join(expected)}",
                "if the site announced new host keys, replace the line for"
                f" {name} in {s.known_hosts} (compare the fingerprint with the site's);"
                " otherwise something may be intercepting the connection: do not go on",
                facts,
            )
        return (
            f"unknown host: {s.known_hosts} has no key for {name}{shown and ';' + shown}",
            f"add it: ssh-keyscan -p {login.port} {login.host} >> {s.known_hosts}, then compare"
            " its fingerprint (ssh-keygen -lf) with the one the site publishes",
            facts,
        )

    async def _presented_host_key(self, login: Login, timeout: Optional[float] = None) -> str:
        """The login node's host key fingerprint (one more key exchange, no login)."""
        try:
            key = await asyncio.wait_for(
                asyncssh.get_server_host_key(login.host, login.port),
                self.timeout if timeout is None else timeout,
            )
        except (OSError, asyncssh.Error, asyncio.TimeoutError):
            return ""
        return f"{key.get_algorithm()} {key.get_fingerprint()}" if key is not None else ""

    # -- exit and probes --------------------------------------------------------------------
    async def _path(
        self, login: Optional[Login], conn: Optional[Connection], target: tuple[str, int]
    ) -> None:
        """tcp, hello, connect (each probe) and heartbeat for one login node and one exit."""
        s = self.settings
        name = format_hostport(*target)
        via = f" via {login.host}" if login is not None else ""
        if s.upstream is not None:
            await self._upstream(conn, target, f"{name}{via}")
            return
        attempt = await self._open(conn, target)
        times = attempt.times
        if times.stage == "channel":
            cause, fix = self._tcp_failure(login, name, attempt.error)
            self.add(Hop("tcp", f"{name}{via}", FAIL, times.channel_s, cause=cause, fix=fix))
            self._skip_after("tcp", name)
            return
        how = "TCP connected"
        if isinstance(conn, OpenSshConnection):
            how = "direct-tcpip channel open (ssh's forward)"
        elif conn is not None:
            how = "direct-tcpip channel open"
        if s.exit_tls is not None:
            how += ", TLS certificate verified"
        self.add(Hop("tcp", f"{name}{via}", OK, times.channel_s, detail=how))
        if times.stage == "hello":
            forwarded = isinstance(conn, OpenSshConnection)
            cause, fix = self._hello_failure(name, attempt.error, forwarded)
            self.add(Hop("hello", name, FAIL, times.hello_s, cause=cause, fix=fix))
            self._skip_after("hello", name)
            return
        self.add(self._hello_hop(name, attempt))
        assert attempt.carrier is not None and attempt.established is not None
        session = _CheckSession(s, attempt.carrier, attempt.established, self._metrics)
        try:
            if self.probes:
                await self._connect_hops(session)
            else:
                await self._self_test(session)
            await self._heartbeat(name, session)
        finally:
            await session.close()

    async def _open(self, conn: Optional[Connection], target: tuple[str, int]) -> _Attempt:
        """The carrier through the chain, up to the exit's HELLO reply, as the worker opens
        it; a failure keeps the error the dialler classified, for the diagnosis.

        Through ssh (``--ssh-client openssh``) the carrier is a connection to its forward,
        which ssh accepts before the login node opens the channel: a refused channel is an
        EOF, and ssh's log line says why (a ChannelRefused, in the channel stage).
        """
        attempt = _Attempt()
        times = attempt.times
        try:
            carrier = await self._dialler.open(target, conn, self.timeout, times)
            est = await self._dialler.hello(carrier, timeout=self.timeout, times=times)
        except DialFailed as exc:
            attempt.error = exc.__cause__ or exc
            return attempt
        except (TunnelRefused, asyncio.TimeoutError) as exc:
            attempt.error = exc
            return attempt
        attempt.carrier = carrier
        attempt.established = est
        return attempt

    def _hello_hop(self, name: str, attempt: _Attempt) -> Hop:
        s = self.settings
        established = attempt.established
        assert established is not None
        skew_s, skew_error_s = attempt.times.clock_skew(established)
        skew = round(skew_s, 3) + 0.0  # + 0.0: no "-0.000"
        heartbeat = established.heartbeat_ms / 1000
        facts = {
            "key_id": s.key_id,
            "clock_skew_s": round(skew, 3),
            "clock_skew_error_s": round(skew_error_s, 3),
            "heartbeat_s": heartbeat,
        }
        detail = (
            f"key {s.key_id} accepted, exit authenticated; clock skew {skew:+.3f} s"
            f" (±{skew_error_s:.3f} s); heartbeat {heartbeat:g} s"
        )
        if abs(skew) > SKEW_WARN_S:
            return Hop(
                "hello",
                name,
                WARN,
                attempt.times.hello_s,
                detail=detail,
                cause=f"clock skew {skew:+.0f} s: the exit refuses beyond ±{hl.CLOCK_WINDOW_S:g} s",
                fix="synchronise the clocks of this node and the exit (NTP, chrony)",
                facts=facts,
            )
        return Hop("hello", name, OK, attempt.times.hello_s, detail=detail, facts=facts)

    async def _self_test(self, session: _CheckSession) -> None:
        """No probe: OPEN the unspecified address, which the exit's policy must refuse."""
        probe = format_hostport(*SELF_TEST)
        pump = session.open(*SELF_TEST)
        try:
            code, _ = await session.wait(pump.answer, self.timeout)
        except (ConnectionError, asyncio.TimeoutError) as exc:
            self.add(
                Hop(
                    "connect",
                    "-",
                    FAIL,
                    time.monotonic() - pump.opened_at,
                    cause=f"no answer to the OPEN of {probe}: {_describe(exc)}",
                    fix="look at the exit's log (stream limits, a policy error)",
                )
            )
            return
        elapsed = time.monotonic() - pump.opened_at
        if code == s5.SUCCEEDED:
            self.add(
                Hop(
                    "connect",
                    probe,
                    WARN,
                    elapsed,
                    cause=f"the exit let a stream to {probe} through: its policy allows the"
                    " unspecified address, which reaches the exit host itself",
                    fix="remove the --allow rule that covers 0.0.0.0 on the exit",
                )
            )
            return
        reply = s5.REPLY_NAMES.get(code, str(code))
        self.add(
            Hop(
                "connect",
                "-",
                SKIP,
                detail=f"no --probe given (the exit answered {probe} with '{reply}',"
                " as a policy must)",
            )
        )

    async def _connect_hops(self, session: _CheckSession) -> None:
        """Every probe is an OPEN on the one carrier, all at once; reported in order."""
        pumps: list[Union[_ProbePump, ValueError]] = []
        for host, port in self.probes:
            try:
                pumps.append(session.open(host, port))
            except ValueError as exc:
                pumps.append(exc)
        for probe, pump in zip(self.probes, pumps):
            target = format_hostport(*probe)
            if isinstance(pump, ValueError):
                self.add(
                    Hop(
                        "connect",
                        target,
                        FAIL,
                        cause=f"the address cannot be sent to the exit: {pump}",
                        fix="give --probe as HOST:PORT with a host name of at most 255 bytes",
                    )
                )
                continue
            remaining = pump.opened_at + self.timeout - time.monotonic()
            try:
                code, bound = await session.wait(pump.answer, max(remaining, 0.0))
            except (ConnectionError, asyncio.TimeoutError) as exc:
                self.add(
                    Hop(
                        "connect",
                        target,
                        FAIL,
                        time.monotonic() - pump.opened_at,
                        cause=f"no REPLY to the OPEN: {_describe(exc)}",
                        fix="look at the exit's log for this destination",
                    )
                )
                continue
            elapsed = time.monotonic() - pump.opened_at
            if code != s5.SUCCEEDED:
                cause, fix = _connect_failure(probe, code)
                facts = {"reply": s5.REPLY_NAMES.get(code, code)}
                self.add(Hop("connect", target, FAIL, elapsed, cause=cause, fix=fix, facts=facts))
                continue
            try:
                bound_host, bound_port, _ = s5.decode_address(bound)
                shown = format_hostport(bound_host, bound_port)
            except (ProtocolError, ValueError):
                shown = bound.hex()
            self.add(
                Hop(
                    "connect",
                    target,
                    OK,
                    elapsed,
                    detail=f"connected (exit's side {shown})",
                    facts={"bound": shown},
                )
            )

    async def _heartbeat(self, name: str, session: _CheckSession) -> None:
        try:
            rtt = await session.ping(self.timeout)
        except (ConnectionError, asyncio.TimeoutError) as exc:
            self.add(
                Hop(
                    "heartbeat",
                    name,
                    FAIL,
                    cause=f"no PONG for a PING: {_describe(exc)}",
                    fix="the carrier is up but the exit does not answer heartbeats; look at"
                    " the exit's log and version",
                )
            )
            return
        self.add(
            Hop(
                "heartbeat",
                name,
                OK,
                rtt,
                detail="PING/PONG round trip on the carrier",
                facts={"rtt_s": round(rtt, 6)},
            )
        )

    async def _upstream(
        self, conn: Optional[Connection], target: tuple[str, int], label: str
    ) -> None:
        """--upstream mode: only the TCP hop to the plain SOCKS5 server is checked."""
        started = time.monotonic()
        try:
            if isinstance(conn, OpenSshConnection):
                await asyncio.wait_for(self._forwarded_upstream(conn, target), self.timeout)
            else:
                await self._dialler.reach(target, conn, self.timeout)
        except (OSError, asyncssh.Error, asyncio.TimeoutError) as exc:
            cause, fix = self._tcp_failure(None, format_hostport(*target), exc)
            self.add(Hop("tcp", label, FAIL, time.monotonic() - started, cause=cause, fix=fix))
            return
        self.add(
            Hop(
                "tcp",
                label,
                OK,
                time.monotonic() - started,
                detail="upstream SOCKS5 server reachable (--upstream mode: no tunnel hops)",
            )
        )

    async def _forwarded_upstream(self, conn: OpenSshConnection, target: tuple[str, int]) -> None:
        """The upstream through ssh's loopback forward, which accepts before the login node
        opens the channel: a SOCKS5 greeting proves the far end is there (any answer does)."""
        started = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", conn.local_port(*target))
        try:
            writer.write(bytes((s5.VERSION, 1, s5.NO_AUTH)))
            answer = await reader.read(2)
        except ConnectionResetError:  # ssh closed it with the greeting unread
            answer = b""
        finally:
            writer.close()
        if not answer:
            refused = await refused_channel(conn, started)
            if refused is not None:
                raise refused
            raise ConnectionError("ssh closed the forwarded connection without an answer")

    def _skip_after(self, failed: str, name: str) -> None:
        order = ["tcp", "hello", "connect", "heartbeat"]
        for later in order[order.index(failed) + 1 :]:
            if later == "connect":
                for target in [format_hostport(*p) for p in self.probes] or ["-"]:
                    self.add(Hop("connect", target, SKIP, detail=f"not checked: {failed} failed"))
            else:
                self.add(Hop(later, name, SKIP, detail=f"not checked: {failed} failed"))

    # -- explanations -------------------------------------------------------------------------
    def _tcp_failure(
        self, login: Optional[Login], name: str, exc: Optional[BaseException]
    ) -> tuple[str, str]:
        prohibited = False
        reason: Optional[str] = None
        if isinstance(exc, asyncssh.ChannelOpenError):
            prohibited = exc.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
            reason = exc.reason
        elif isinstance(exc, ChannelRefused):
            prohibited = "administratively prohibited" in exc.why
            reason = exc.why
        if reason is not None:
            node = login.host if login is not None else "the login node"
            if prohibited:
                return (
                    f"{node} forbids forwarding to {name}: {reason}",
                    "the key's authorized_keys line needs port-forwarding and a"
                    f' permitopen="{name}" for every exit address (and sshd must allow'
                    " TCP forwarding)",
                )
            return (
                f"exit unreachable from the login node: {node} could not connect to {name}"
                f" ({reason or 'connect failed'})",
                "is relay-exit running and listening there? the login node may reach the"
                " outside on some ports only (80/443 at JSC): --exit must use one of them",
            )
        if isinstance(exc, TlsVerifyError):
            return (
                f"TLS: {name} presented a certificate that is not accepted: {exc}",
                "compare the fingerprint relay-exit logs at start with --exit-fingerprint, or"
                " fix --exit-ca / --exit-server-name; if nothing changed on the exit,"
                " something may be intercepting the connection: do not go on",
            )
        if isinstance(exc, TlsError):
            return (
                f"TLS with {name} failed: {exc}",
                "does relay-exit there run with --tls-cert and --tls-key? If not, drop"
                " --exit-ca / --exit-fingerprint (or point --exit at its TLS port)",
            )
        if isinstance(exc, asyncio.TimeoutError):
            return (
                f"no connection to {name} within {self.timeout:g} s",
                "a firewall drops the connection, or the exit host is down",
            )
        if isinstance(exc, ConnectionRefusedError):
            return (
                f"exit down: connection to {name} refused (nothing listens there)",
                "start relay-exit (systemctl status relay-exit) or fix --exit",
            )
        return (
            f"cannot reach {name}: {_describe(exc)}",
            "check --exit and that this node (or the login node) can reach it",
        )

    def _hello_failure(
        self, name: str, exc: Optional[BaseException], forwarded: bool = False
    ) -> tuple[str, str]:
        """``forwarded``: the carrier went through ssh's forward, which accepts it before
        the login node has opened the channel."""
        s = self.settings
        key = s.key_id
        if isinstance(exc, TunnelRefused):
            if exc.stage == "method":
                return (
                    f"{name} does not offer the tunnel method: it is not relay-exit (a web"
                    " server or a plain SOCKS5 server on that port?)",
                    "point --exit at relay-exit's --listen address as seen from the login node",
                )
            if exc.status == hl.BAD_AUTH:
                return (
                    f"secret mismatch: the exit refused key id {key!r} (unknown to the exit,"
                    " or its secret differs from --secret-file)",
                    f"the exit's --keys file needs the line '{key} SECRET' with the same secret"
                    " as this worker's --secret-file; after editing it run"
                    " systemctl reload relay-exit",
                )
            if exc.status == hl.CLOCK_SKEW:
                now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                return (
                    "clock skew: the exit refused the HELLO because this node's clock and the"
                    f" exit's differ by more than {hl.CLOCK_WINDOW_S:g} s (this node: {now})",
                    "synchronise the clocks of this node and the exit (NTP, chrony)",
                )
            if exc.status == hl.BAD_VERSION:
                return (
                    "the exit speaks another tunnel protocol version",
                    "run the same hpc-relay release on the worker and the exit",
                )
            if exc.status == hl.REPLAY:
                return (
                    "the exit saw this HELLO's nonce before (a replayed connection)",
                    "run the check again; if it repeats, something replays traffic",
                )
            if exc.status == hl.BUSY:
                return (
                    "the exit refused the carrier as busy: its max_carriers or"
                    " max_carriers_per_key limit is reached",
                    "raise max_carriers_per_key (or max_carriers: relay_limit_hits_total on"
                    " the exit says which) on the exit, as each worker keeps `carriers`"
                    " carriers per exit; or lower `carriers` on the workers",
                )
            return (
                f"the exit refused the HELLO ({hl.STATUS_NAMES.get(exc.status, exc.status)})",
                "look at the exit's log (it may be overloaded)",
            )
        if isinstance(exc, AuthFailed):
            return (
                "secret mismatch: the exit's HELLO reply failed authentication; whatever"
                f" answers at {name} does not hold this worker's secret for {key!r}",
                "compare --secret-file with the exit's --keys entry; check --exit points at"
                " your relay-exit",
            )
        if isinstance(exc, ProtocolError):
            return (
                f"{name} does not speak the tunnel protocol: {exc}",
                "point --exit at relay-exit's --listen address as seen from the login node",
            )
        if isinstance(exc, asyncio.TimeoutError) and forwarded:
            return (
                f"no HELLO reply from {name} within {self.timeout:g} s: the login node's"
                " connection to it hangs (a firewall dropping it), or whatever listens there"
                " is not answering like relay-exit",
                f"check that the login node reaches {name} (nc -vz from there); look at the"
                " exit's log",
            )
        if isinstance(exc, asyncio.TimeoutError):
            return (
                f"no HELLO reply from {name} within {self.timeout:g} s",
                "whatever listens there is not answering like relay-exit; look at its log",
            )
        return (
            f"the connection closed during the HELLO: {_describe(exc)}",
            "look at the exit's log (handshake limit reached? not relay-exit?)",
        )


def _connect_failure(probe: tuple[str, int], code: int) -> tuple[str, str]:
    host, port = probe
    name = format_hostport(host, port)
    if code == s5.NOT_ALLOWED:
        return (
            f"destination denied by policy: the exit does not allow {name}",
            f"add an --allow rule on the exit that covers {name} (CIDR or .domain suffix with"
            " the port; private and loopback ranges need a rule inside them), then"
            " systemctl reload relay-exit",
        )
    if code == s5.CONNECTION_REFUSED:
        return (
            f"the exit reached {host} but nothing accepts connections on port {port}",
            "is the service running, and is the port right?",
        )
    if code == s5.HOST_UNREACHABLE:
        return (
            f"the exit cannot reach {host} (no answer, or the name does not resolve at the exit)",
            "check the name resolves on the exit host and the exit's own outbound firewall",
        )
    if code == s5.NETWORK_UNREACHABLE:
        return (
            f"the exit has no route to {host}",
            "check the exit host's network (routing, IPv6 connectivity)",
        )
    return (
        f"the exit could not open the stream ({s5.REPLY_NAMES.get(code, code)})",
        "look at the exit's log and relay_limit_hits_total (stream limits)",
    )


def _describe(exc: Optional[BaseException]) -> str:
    if exc is None:
        return "unknown error"
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


def _key_fingerprint(path: Optional[Path]) -> str:
    """``ALG SHA256:...`` of the SSH key file, or '' when it cannot be read."""
    if path is None:
        return ""
    try:
        key = asyncssh.read_private_key(str(path))
    except (OSError, asyncssh.KeyImportError, asyncssh.KeyEncryptionError):
        return ""
    return f"{key.get_algorithm()} {key.get_fingerprint()}"


def _known_keys(path: Path, login: Login) -> list[str]:
    """Fingerprints known_hosts trusts for the login node (empty when it has none)."""
    try:
        known = asyncssh.read_known_hosts(str(path))
    except (OSError, ValueError, asyncssh.Error):
        return []
    addresses = [""]
    with contextlib.suppress(OSError):
        addresses += [str(i[4][0]) for i in socket.getaddrinfo(login.host, login.port)]
    found: list[str] = []
    for address in addresses:
        for key in known.match(login.host, address, login.port)[0]:
            shown = f"{key.get_algorithm()} {key.get_fingerprint()}"
            if shown not in found:
                found.append(shown)
    return found


async def check_chain(
    settings: WorkerSettings,
    probes: Sequence[tuple[str, int]] = (),
    report: Optional[Callable[[Hop], None]] = None,
) -> list[Hop]:
    """Run every hop; the result lists them in order (``report`` sees each as it ends)."""
    return await Checker(settings, probes, report).run()


# --------------------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def _own_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="relay check", add_help=False, allow_abbrev=False)
    parser.add_argument("-h", "--help", action="store_true")
    for opt in CHECK_OPTIONS:
        if opt.kind == "bool":
            parser.add_argument(opt.flag, dest=opt.key, action="store_true")
        else:
            parser.add_argument(opt.flag, dest=opt.key, action="append", default=[])
    return parser


USAGE = """usage: relay check [--probe HOST:PORT ...] [--json] [--config worker.toml] [WORKER FLAGS]

Walks the chain as relay-worker would and prints one line per hop with its time: ssh (each
login node), tcp (the exit through it), hello (tunnel authentication, clock skew, agreed
heartbeat), connect (each --probe through the exit, all on one carrier), heartbeat (PING/PONG
round trip on that carrier). On a failure it names the hop, the cause and the likely fix.
Exit status: 0 every hop ok, 1 a hop failed, 2 usage or configuration error.

check options:
  --probe HOST:PORT   destination to open through the exit, e.g. the collector (repeatable)
  --json              one JSON document: {"ok": ..., "hops": [...]}

Every relay-worker option is accepted (most come from --config):
"""


def _format_ms(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds:.1f} s"


def format_hop(hop: Hop) -> str:
    """The text line of a hop (plus a ``fix:`` line for a failure or warning)."""
    status = {OK: "ok", WARN: "warn", FAIL: "FAIL", SKIP: "skip"}[hop.status]
    text = hop.cause if hop.status in (FAIL, WARN) and hop.cause else hop.detail
    if hop.status == WARN and hop.detail:
        text = f"{hop.detail}; {hop.cause}"
    line = f"{status:<5} {hop.name:<9} {hop.target:<36} {_format_ms(hop.seconds):>9}  {text}"
    if hop.fix and hop.status in (FAIL, WARN):
        line += f"\n{'':<16}fix: {hop.fix}"
    return line


def _load(argv: Sequence[str]) -> tuple[WorkerSettings, list[tuple[str, int]], bool]:
    ns, rest = _own_parser().parse_known_args(list(argv))
    if ns.help:
        raise _Help()
    probes = []
    for text in ns.probe:
        try:
            probe = parse_hostport(text)
        except ValueError as exc:
            raise ConfigError(f"--probe: bad address {text!r}: {exc}") from None
        probes.append((probe.host, probe.port))
    given = {arg.split("=", 1)[0] for arg in rest}
    if "--socks-auth" not in given and "--no-socks-auth" not in given:
        rest.append("--no-socks-auth")  # the local listener is not part of the check
    return WorkerSettings.from_values(load_worker_config(rest)), probes, bool(ns.json)


class _Help(Exception):
    pass


def check_main(argv: Optional[Sequence[str]] = None) -> int:
    """``relay check``: 0 all hops ok, 1 a hop failed, 2 usage or configuration error."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        settings, probes, as_json = _load(args)
    except _Help:
        print(USAGE + build_parser("relay check", WORKER_OPTIONS).format_help(), end="")
        return EXIT_OK
    except ConfigError as exc:
        print(f"relay check: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(settings.log_format, "debug" if settings.log_level == "debug" else "error")

    def show(hop: Hop) -> None:
        if not as_json:
            print(format_hop(hop), flush=True)

    try:
        hops = asyncio.run(check_chain(settings, probes, show))
    except KeyboardInterrupt:
        return EXIT_FAILED
    failed = [hop for hop in hops if hop.status == FAIL]
    if as_json:
        doc = {
            "ok": not failed,
            "config": str(settings.config) if settings.config else None,
            "failed": [f"{hop.name} {hop.target}" for hop in failed],
            "hops": [hop.as_dict() for hop in hops],
        }
        print(json.dumps(doc, indent=2))
    elif failed:
        names = ", ".join(f"{hop.name} {hop.target}" for hop in failed)
        print(f"FAILED: {len(failed)} of {len(hops)} hops ({names})")
    else:
        print(f"ok: {len(hops)} hops checked")
    return EXIT_FAILED if failed else EXIT_OK
