"""relay-worker: the compute node's local listeners, multiplexing every stream onto a few
long-lived carriers per exit (protocol v2, docs/PROTOCOL.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

import asyncssh
from python_socks import ProxyConnectionError, ProxyError, ProxyTimeoutError, ProxyType
from python_socks.async_.asyncio import Proxy

from relay.addresses import format_hostport
from relay.carrier import SshCarrier, TcpCarrier, TunnelRefused, carrier_opener
from relay.daemon import Daemon
from relay.listeners import Listeners, Socks5Connection
from relay.loopbound import LoopBound
from relay.metrics import Metrics
from relay.muxpump import MuxDriver, MuxPump
from relay.openssh import OpenSshConnection
from relay.proto import ProtocolError, mux
from relay.proto import hello as hl
from relay.proto import session as ms
from relay.proto import socks5 as s5
from relay.proto.opener import Established
from relay.pump import REFUSED, RESUME_FAILED, PlainProtocol, RawPump, StreamInfo
from relay.secrets import load_secret, load_userpass
from relay.sockopts import abort_with_reset, set_keepalive, set_nodelay, transport_socket
from relay.sshhop import Login, SshHop, SshUnavailable
from relay.tlslink import TlsClient, TlsError, TlsVerifyError, client_context, connect_tls

log = logging.getLogger("relay.worker")

DEMAND_RETRY = 1.0
"""Seconds between carrier attempts that waiting clients may ask for (ExitClient.demand)."""


class WorkerSettings:
    """The knobs the worker reads, so tests and the demo need not build a whole config."""

    def __init__(self, **kwargs: Any) -> None:
        self.socks_host: str = kwargs.pop("socks_host", "127.0.0.1")
        self.socks_port: int = kwargs.pop("socks_port", 1080)
        self.socks_credentials: Optional[tuple[str, str]] = kwargs.pop("socks_credentials", None)
        self.logins: list[Login] = list(kwargs.pop("logins", []))
        self.ssh_client: str = kwargs.pop("ssh_client", "openssh")
        self.ssh_config: Optional[Path] = kwargs.pop("ssh_config", None)
        self.ssh_key: Optional[Path] = kwargs.pop("ssh_key", None)
        self.known_hosts: Optional[Path] = kwargs.pop("known_hosts", None)
        self.exits: list[tuple[str, int]] = list(kwargs.pop("exits", []))
        # TLS to the exits (None: plain TCP inside the SSH channel), see relay.tlslink.
        self.exit_tls: Optional[TlsClient] = kwargs.pop("exit_tls", None)
        self.key_id: str = kwargs.pop("key_id", "")
        self.secret: bytes = kwargs.pop("secret", b"")
        self.upstream: Optional[tuple[str, int]] = kwargs.pop("upstream", None)
        self.upstream_credentials: Optional[tuple[str, str]] = kwargs.pop(
            "upstream_credentials", None
        )
        self.heartbeat: float = kwargs.pop("heartbeat", 25.0)
        self.heartbeat_misses: int = kwargs.pop("heartbeat_misses", 3)
        self.ssh_keepalive: float = kwargs.pop("ssh_keepalive", 15.0)
        self.connect_timeout: float = kwargs.pop("connect_timeout", 15.0)
        self.reconnect_max: float = kwargs.pop("reconnect_max", 30.0)
        self.ssh_connect_rate: float = kwargs.pop("ssh_connect_rate", 4.0)
        self.resume_timeout: float = kwargs.pop("resume_timeout", 600.0)
        # Carriers kept open to each exit; every stream is multiplexed on them.
        self.carriers: int = kwargs.pop("carriers", 2)
        self.tcp_keepalive: float = kwargs.pop("tcp_keepalive", 60.0)
        self.replay_buffer: int = kwargs.pop("replay_buffer", 4 * 1024 * 1024)
        # Answer local clients at once and send their first bytes behind the CONNECT.
        self.optimistic: bool = kwargs.pop("optimistic", True)
        self.metrics_host: Optional[str] = kwargs.pop("metrics_host", None)
        self.metrics_port: int = kwargs.pop("metrics_port", 0)
        # HTTP CONNECT listener (None = off) and static forwards, see relay.listeners.
        self.http_host: Optional[str] = kwargs.pop("http_host", None)
        self.http_port: int = kwargs.pop("http_port", 0)
        self.forwards: list[tuple[str, int, str, int]] = list(kwargs.pop("forwards", []))
        if kwargs:
            raise TypeError(f"unknown worker settings: {', '.join(sorted(kwargs))}")

    @classmethod
    def from_config(cls, cfg: Any) -> WorkerSettings:
        upstream = (cfg.upstream.host, cfg.upstream.port) if cfg.upstream else None
        return cls(
            socks_host=cfg.socks.host,
            socks_port=cfg.socks.port,
            socks_credentials=None if cfg.no_socks_auth else load_userpass(cfg.socks_auth),
            logins=[Login(t.user, t.host, t.port) for t in cfg.login],
            ssh_client=cfg.ssh_client,
            ssh_config=cfg.ssh_config,
            ssh_key=cfg.ssh_key,
            known_hosts=cfg.known_hosts,
            exits=[(e.host, e.port) for e in cfg.exit],
            exit_tls=(
                TlsClient(client_context(cfg.exit_ca), cfg.exit_server_name, cfg.exit_fingerprint)
                if cfg.exit_ca is not None or cfg.exit_fingerprint
                else None
            ),
            key_id=cfg.key_id or "",
            secret=load_secret(cfg.secret_file) if cfg.secret_file else b"",
            upstream=upstream,
            upstream_credentials=(
                load_userpass(cfg.upstream_auth, "--upstream-auth") if cfg.upstream_auth else None
            ),
            heartbeat=cfg.heartbeat,
            heartbeat_misses=cfg.heartbeat_misses,
            ssh_keepalive=cfg.ssh_keepalive,
            connect_timeout=cfg.connect_timeout,
            reconnect_max=cfg.reconnect_max,
            ssh_connect_rate=cfg.ssh_connect_rate,
            resume_timeout=cfg.resume_timeout,
            carriers=cfg.carriers,
            tcp_keepalive=cfg.tcp_keepalive,
            replay_buffer=cfg.replay_buffer,
            optimistic=not cfg.no_optimistic,
            metrics_host=cfg.metrics.host if cfg.metrics else None,
            metrics_port=cfg.metrics.port if cfg.metrics else 0,
            http_host=cfg.http.host if cfg.http else None,
            http_port=cfg.http.port if cfg.http else 0,
            forwards=[(*f.listen, *f.dest) for f in cfg.forward],
        )


ReplyFn = Callable[[int, str, int], None]
"""Answers the local client: (SOCKS5 reply code, bound host, bound port)."""


class SessionGone(Exception):
    """The exit no longer has our session (restarted, or parked too long): start anew."""


class ExitClient:
    """The worker's session with one exit: ``--carriers`` carriers kept open (new ones
    joining the session with its key), every stream of the worker multiplexed on them.

    When carriers die their streams move to the others at once; a replacement is dialled
    with backoff and jitter (the SSH hop caps new logins per login node). When none is left
    the streams wait, up to ``--resume-timeout``, for a carrier to come back.
    """

    ready = LoopBound(asyncio.Event)
    """Set while a carrier is up."""
    _wake = LoopBound(asyncio.Event)
    _demand = LoopBound(asyncio.Event)
    """Set when a local client waits for a stream while no carrier is up."""
    settled = LoopBound(asyncio.Event)
    """Set when a carrier attempt ends, well or not (clients waiting in pick_exit look again)."""

    def __init__(self, worker: RelayWorker, exit_addr: tuple[str, int]) -> None:
        self.worker = worker
        self.exit = exit_addr
        self.metrics = worker.metrics
        self.driver: Optional[MuxDriver] = None
        self.session_id = hl.NEW_SESSION
        self.session_key = b""
        self.carriers: dict[int, Union[SshCarrier, TcpCarrier]] = {}
        self._next_cid = 1
        self._task: Optional[asyncio.Future[None]] = None
        self.lost_at: Optional[float] = None
        """When the last carrier went; None while one is up."""
        self.failed_at = 0.0
        self.attempting = False
        """A carrier attempt is under way."""
        self.refused = False
        """The last attempt was refused by the exit (key, clock, limits): a configuration
        matter, retried only after --reconnect-max."""
        self.refusal: Optional[int] = None
        """The HELLO status of that refusal (None for the tunnel method)."""
        self.why = ""
        self._answers: dict[int, Callable[[int, bytes], None]] = {}
        self._old: list[MuxDriver] = []
        """Sessions the exit is draining: their streams finish, no new ones go there."""

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._keep_carriers())
        self._task.add_done_callback(self._keeper_ended)

    def _keeper_ended(self, task: asyncio.Future[None]) -> None:
        """A bug, not an outage: without this task the exit never gets a carrier again."""
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "carrier keeper failed; this exit gets no new carriers",
                exc_info=task.exception(),
                extra={"fields": {"exit": format_hostport(*self.exit)}},
            )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # asyncio.wait, not wait_for: a cancel of close() itself must not be swallowed
            await asyncio.wait({self._task}, timeout=5)
        for driver in [*self._old, *([self.driver] if self.driver else [])]:
            driver.close("worker stopping")
        self.driver = None

    @property
    def usable(self) -> bool:
        return self.driver is not None and bool(self.carriers) and not self.driver.session.draining

    # -- carriers -------------------------------------------------------------------------
    async def _keep_carriers(self) -> None:
        s = self.worker.settings
        attempt = 0
        while True:
            if len(self.carriers) >= s.carriers:
                await self._wake.wait()
                self._wake.clear()
                continue
            wait = 0.0
            self.attempting = True
            try:
                await self._add_carrier()
                attempt = 0
                self.refused = False
                continue
            except SessionGone as exc:
                self._session_over(RESUME_FAILED, f"exit refused the resume: {exc}")
                continue
            except TunnelRefused as exc:
                # Refused by the exit (wrong key, clock, limits): a configuration matter that
                # a quick retry does not fix; try again at the longest backoff.
                self.why = str(exc)
                self.refused = True
                self.refusal = exc.status if exc.stage == "hello" else None
                wait = s.reconnect_max
            except OpenFailed as exc:
                self.why = str(exc)
                self.refused = False
                if isinstance(exc.__cause__, SshUnavailable):
                    wait = exc.__cause__.retry_after
            except (ProtocolError, ConnectionError, OSError, asyncio.TimeoutError) as exc:
                self.why = str(exc) or type(exc).__name__
                self.refused = False
            except Exception as exc:
                # A bug, logged as one; the exit still gets carriers (its streams' resume
                # depends on them), so it counts as a failed attempt.
                log.error(
                    "carrier attempt failed unexpectedly",
                    exc_info=True,
                    extra={"fields": {"exit": format_hostport(*self.exit)}},
                )
                self.why = f"internal error: {exc!r}"
                self.refused = False
            finally:
                self.attempting = False
                self.settled.set()
            self.failed_at = time.monotonic()
            if (
                self.lost_at is not None
                and self.driver is not None
                and time.monotonic() - self.lost_at >= s.resume_timeout
            ):
                self.metrics.resumes.labels("gave-up").inc()
                self._session_over(
                    RESUME_FAILED, f"no carrier for {s.resume_timeout:.0f}s: {self.why}"
                )
            backoff = min(s.reconnect_max, 0.25 * 2**attempt) * random.uniform(0.5, 1.0)
            attempt += 1
            if self.lost_at is not None:
                self.metrics.resumes.labels("retry").inc()
            log.debug(
                "carrier attempt failed",
                extra={
                    "fields": {
                        "exit": format_hostport(*self.exit),
                        "why": self.why,
                        "next": round(max(backoff, wait), 2),
                    }
                },
            )
            await self._back_off(max(backoff, wait))

    async def _back_off(self, seconds: float) -> None:
        """Wait between attempts; a client asking for a stream (demand()) ends the wait, so a
        key put back or a clock fixed is noticed at the next stream, not after up to
        --reconnect-max."""
        self._demand.clear()
        waiter = asyncio.ensure_future(self._demand.wait())
        try:
            await asyncio.wait({waiter}, timeout=seconds)
        finally:
            waiter.cancel()

    def demand(self) -> bool:
        """A client waits for a carrier: try again now if the last attempt failed (not
        refused) at least DEMAND_RETRY seconds ago, so waiting clients make one a second.
        True if an attempt is under way or asked for."""
        if self.attempting or self._demand.is_set():
            return True
        if (
            not self.carriers
            and not self.refused
            and time.monotonic() - self.failed_at >= DEMAND_RETRY
        ):
            self._demand.set()
            return True
        return False

    @property
    def down(self) -> bool:
        """No session and the last attempt failed: a new stream fails at once with ``why``
        instead of waiting (a session that lost its carriers waits for a resume)."""
        return self.driver is None and not self.attempting and self.failed_at > 0

    async def _add_carrier(self) -> None:
        s = self.worker.settings
        joins = self.driver is not None
        carrier = await asyncio.wait_for(self.worker.dial(self.exit), s.connect_timeout + 5)
        key = self.session_key if joins else s.secret
        carrier.start(carrier_opener(key, s.key_id, s.heartbeat, self.session_id))
        started = time.monotonic()
        try:
            est = await asyncio.wait_for(self.worker.handshake(carrier), s.connect_timeout)
        except TunnelRefused as exc:
            carrier.close()
            if joins and exc.status in (hl.UNKNOWN_SESSION, hl.BAD_AUTH):
                self.metrics.resumes.labels("refused").inc()
                raise SessionGone(str(exc)) from None
            log.warning(
                "exit refused a carrier",
                extra={"fields": {"exit": format_hostport(*self.exit), "why": str(exc)}},
            )
            raise
        except BaseException:
            carrier.close()
            raise
        self.worker.metrics.carrier_handshake.observe(time.monotonic() - started)
        if self.driver is None:
            self._new_session(est)
        assert self.driver is not None
        cid = self._next_cid
        self._next_cid += 1
        self.carriers[cid] = carrier
        moved = self.driver.session.live_streams() if self.lost_at is not None else 0
        carrier.join(self.driver, cid, est)
        if cid in self.carriers:
            if self.lost_at is not None:
                gap = time.monotonic() - self.lost_at
                self.lost_at = None
                if moved:
                    self.metrics.resumes.labels("ok").inc(moved)
                log.info(
                    "session resumed",
                    extra={
                        "fields": {
                            "exit": format_hostport(*self.exit),
                            "gap": round(gap, 3),
                            "streams": moved,
                        }
                    },
                )
            self.ready.set()

    def _new_session(self, est: Established) -> None:
        s = self.worker.settings
        self.driver = MuxDriver.new_session(
            ms.WORKER,
            self.metrics,
            heartbeat=est.heartbeat_ms / 1000,
            misses=s.heartbeat_misses,
            window=s.replay_buffer,
            resume_timeout=s.resume_timeout,
            on_answer=self._answered,
            on_link_lost=self._link_lost,
            on_draining=self._draining,
        )
        self.session_id = est.session_id
        self.session_key = est.session_key
        log.info(
            "session open",
            extra={
                "fields": {
                    "exit": format_hostport(*self.exit),
                    "heartbeat": est.heartbeat_ms / 1000,
                }
            },
        )

    def _link_lost(self, cid: int, why: str) -> None:
        if self.carriers.pop(cid, None) is None:
            return
        self.metrics.reconnects.inc()
        streams = self.driver.session.live_streams() if self.driver is not None else 0
        log.info(
            "carrier lost",
            extra={
                "fields": {
                    "exit": format_hostport(*self.exit),
                    "carrier": cid,
                    "left": len(self.carriers),
                    "streams": streams,
                    "why": why,
                }
            },
        )
        if not self.carriers:
            self.lost_at = time.monotonic()
            self.ready.clear()
        elif self.driver is not None and self.driver.moved:
            self.metrics.resumes.labels("ok").inc(self.driver.moved)
        self._wake.set()

    def _draining(self, reason: str) -> None:
        """The exit is going away: finish this session's streams there, open new ones on
        a fresh session (to the same address: the exit's replacement)."""
        driver = self.driver
        if driver is None:
            return
        log.info(
            "exit draining; new streams go to a new session",
            extra={"fields": {"exit": format_hostport(*self.exit), "reason": reason}},
        )
        self._old.append(driver)
        driver._on_link_lost = lambda cid, why: self._old_link_lost(driver, why)
        self._forget_session()
        self._reap()

    def _old_link_lost(self, driver: MuxDriver, why: str) -> None:
        """A draining session lost its last carrier (the exit went before its streams
        ended): nothing resumes it, so its streams are reset instead of waiting forever."""
        if driver.links or driver not in self._old:
            return
        self._old.remove(driver)
        if driver.pumps:
            log.warning(
                "draining exit went away; resetting its streams",
                extra={
                    "fields": {
                        "exit": format_hostport(*self.exit),
                        "streams": len(driver.pumps),
                        "why": why,
                    }
                },
            )
        driver.close(f"exit went away while draining: {why}", RESUME_FAILED)

    def _forget_session(self) -> None:
        self.driver = None
        self.carriers = {}
        self.session_id = hl.NEW_SESSION
        self.session_key = b""
        self.lost_at = None
        self.ready.clear()
        self._wake.set()

    def _reap(self) -> None:
        for driver in list(self._old):
            if not driver.pumps:
                driver.close("drained")
                self._old.remove(driver)

    def _session_over(self, result: str, why: str) -> None:
        """The session cannot come back: reset its streams, start a new one."""
        driver = self.driver
        if driver is not None:
            log.warning(
                "session lost; resetting its streams",
                extra={"fields": {"exit": format_hostport(*self.exit), "why": why}},
            )
            driver.close(why, result)
        self._forget_session()

    # -- streams --------------------------------------------------------------------------
    def open(
        self, address: bytes, info: StreamInfo, answer: Callable[[int, bytes], None]
    ) -> MuxPump:
        """A new stream on this session; ``answer(code, bound)`` gets the exit's reply."""
        driver = self.driver
        assert driver is not None
        sid = driver.session.open(address)
        self._answers[sid] = answer
        return MuxPump(driver, sid, info, plain_is_client=True, on_done=self._stream_done)

    def _answered(self, sid: int, code: int, address: bytes) -> None:
        answer = self._answers.pop(sid, None)
        if answer is not None:
            answer(code, address)

    def _stream_done(self, pump: MuxPump, result: str) -> None:
        self._answers.pop(pump.sid, None)
        self.worker.stream_done(pump, result)
        if self._old:
            self._reap()


class OpenFailed(Exception):
    """A stream could not be opened; ``code`` is the SOCKS5 reply for the local client."""

    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code


class RelayWorker(Daemon):
    role = "worker"

    def __init__(self, settings: WorkerSettings, metrics: Optional[Metrics] = None) -> None:
        super().__init__(metrics)
        self.settings = settings
        self.ssh: Optional[SshHop] = None
        if settings.logins:
            self.ssh = SshHop(
                settings.logins,
                settings.ssh_key,
                settings.known_hosts,
                self.metrics,
                keepalive=settings.ssh_keepalive,
                connect_timeout=settings.connect_timeout,
                connects_per_minute=settings.ssh_connect_rate,
                client=settings.ssh_client,
                ssh_config=settings.ssh_config,
            )
        self._set_forwards()
        self._next_exit = 0
        self._stopping = False
        self._forward: Optional[tuple[Any, Any]] = None
        self.listeners = Listeners(self)
        self.exits: dict[tuple[str, int], ExitClient] = {}

    async def start(self) -> None:
        s = self.settings
        self._set_forwards()
        await self._listen(
            lambda: Socks5Connection(self),
            s.socks_host,
            s.socks_port,
            s.metrics_host,
            s.metrics_port,
        )
        log.info(
            "listening",
            extra={
                "fields": {
                    "socks": format_hostport(*self.address),
                    "auth": "user/password" if s.socks_credentials else "none",
                    "mode": "upstream" if s.upstream else "tunnel",
                    "logins": ",".join(str(x) for x in s.logins) or "-",
                    "carriers": s.carriers,
                }
            },
        )
        await self.listeners.start()
        if s.upstream is None:
            for exit_addr in s.exits:
                self._add_exit(exit_addr)

    def _set_forwards(self) -> None:
        """What an ssh process forwards (--ssh-client openssh): read when it starts."""
        s = self.settings
        if self.ssh is not None:
            self.ssh.targets = [] if s.upstream else list(s.exits)
            self.ssh.tcp_targets = [s.upstream] if s.upstream else []

    def _add_exit(self, exit_addr: tuple[str, int]) -> None:
        client = ExitClient(self, exit_addr)
        self.exits[exit_addr] = client
        client.start()

    async def drain(self, timeout: float) -> None:
        self.listeners.close()
        await super().drain(timeout)

    async def stop(self) -> None:
        self.listeners.close()
        self._stopping = True
        await super().stop()
        for client in self.exits.values():
            await client.close()
        await self.listeners.wait_closed()
        if self.ssh is not None:
            # A login node that no longer answers must not keep the worker from stopping.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.ssh.close(), 5)

    # -- choosing an exit -----------------------------------------------------------------
    async def pick_exit(self) -> ExitClient:
        """A session for a new stream: round robin over exits with a carrier up; if none
        has one yet, the first to get one within --connect-timeout."""
        for exit_addr in self.settings.exits:
            if exit_addr not in self.exits and not self._stopping:
                self._add_exit(exit_addr)
        clients = [self.exits[e] for e in self.settings.exits if e in self.exits]
        if not clients:
            raise OpenFailed(s5.GENERAL_FAILURE, "no exit configured")
        start = self._next_exit % len(clients)
        self._next_exit += 1
        rotated = clients[start:] + clients[:start]
        for client in rotated:
            if client.usable:
                return client
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.connect_timeout
        while loop.time() < deadline:
            asked = [client.demand() for client in rotated]
            if all(c.down for c in rotated) and not any(asked):
                break  # every exit failed just now or refused us: say why at once
            for client in rotated:
                client.settled.clear()
            waits = [asyncio.ensure_future(c.ready.wait()) for c in rotated]
            waits += [asyncio.ensure_future(c.settled.wait()) for c in rotated]
            try:
                await asyncio.wait(
                    waits,
                    timeout=max(0.0, deadline - loop.time()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                for w in waits:
                    w.cancel()
            for client in rotated:
                if client.usable:
                    return client
            await asyncio.sleep(0.01)
        why = "; ".join(f"{format_hostport(*c.exit)}: {c.why or 'no carrier yet'}" for c in rotated)
        raise OpenFailed(s5.GENERAL_FAILURE, f"no exit reachable: {why}")

    async def handshake(self, carrier: Union[SshCarrier, TcpCarrier]) -> Established:
        try:
            est = await carrier.established
        except TunnelRefused as exc:
            self.metrics.carriers.labels("refused").inc()
            self.metrics.auth_failures.labels(f"exit-{exc.stage}").inc()
            raise
        except (ProtocolError, ConnectionError) as exc:
            carrier.close()
            refusal = await carrier.channel_failure()
            if refusal is not None:
                self.metrics.carriers.labels("exit-unreachable").inc()
                raise OpenFailed(s5.GENERAL_FAILURE, refusal) from None
            self.metrics.carriers.labels("failed").inc()
            raise OpenFailed(s5.GENERAL_FAILURE, f"tunnel handshake: {exc}") from None
        self.metrics.carriers.labels("ok").inc()
        return est

    async def dial(self, exit_addr: tuple[str, int]) -> Union[SshCarrier, TcpCarrier]:
        """A byte pipe to the exit: a direct-tcpip channel through the login node, or TCP."""
        exit_host, exit_port = exit_addr
        carrier: Union[SshCarrier, TcpCarrier]
        try:
            if self.settings.exit_tls is not None:
                carrier = await self._dial_tls(exit_addr, self.settings.exit_tls)
            elif self.ssh is not None:
                conn = await self.ssh.connection()
                if isinstance(conn, OpenSshConnection):
                    _, tcp = await conn.create_connection(TcpCarrier, exit_host, exit_port)
                    assert isinstance(tcp, TcpCarrier)
                    carrier = tcp
                    carrier.via = conn
                else:
                    _, session = await conn.create_connection(SshCarrier, exit_host, exit_port)
                    assert isinstance(session, SshCarrier)
                    carrier = session
            else:
                loop = asyncio.get_running_loop()
                transport, carrier = await loop.create_connection(TcpCarrier, exit_host, exit_port)
                set_keepalive(transport_socket(transport), self.settings.tcp_keepalive)
                set_nodelay(transport_socket(transport))
        except SshUnavailable as exc:
            self.metrics.carriers.labels("ssh-unavailable").inc()
            raise OpenFailed(s5.GENERAL_FAILURE, f"no login node: {exc}") from exc
        except asyncssh.ChannelOpenError as exc:
            self.metrics.carriers.labels("exit-unreachable").inc()
            raise OpenFailed(
                s5.GENERAL_FAILURE,
                f"login node cannot reach exit {exit_host}:{exit_port}: {exc.reason}",
            ) from None
        except TlsError as exc:
            self.metrics.carriers.labels("tls-failed").inc()
            where = format_hostport(exit_host, exit_port)
            if isinstance(exc, TlsVerifyError):
                self.metrics.auth_failures.labels("exit-tls").inc()
                log.warning(
                    "exit refused: its TLS certificate is not the one configured",
                    extra={"fields": {"exit": where, "why": str(exc)}},
                )
                why = f"exit {where} refused: {exc} (check --exit-ca / --exit-fingerprint)"
            else:
                why = f"TLS with exit {where} failed: {exc} (does the exit have --tls-cert?)"
            raise OpenFailed(s5.GENERAL_FAILURE, why) from None
        except (OSError, asyncssh.Error) as exc:
            self.metrics.carriers.labels("exit-unreachable").inc()
            raise OpenFailed(
                s5.GENERAL_FAILURE, f"cannot reach exit {exit_host}:{exit_port}: {exc}"
            ) from None
        return carrier

    async def _dial_tls(self, exit_addr: tuple[str, int], tls: TlsClient) -> TcpCarrier:
        """TLS over the direct-tcpip channel (or TCP), handshake finished and verified."""
        host, port = exit_addr
        open_raw: Callable[[Callable[[], Any]], Any]
        conn: Any = None
        if self.ssh is not None:
            conn = await self.ssh.connection()

            def open_raw(factory: Callable[[], Any]) -> Any:
                return conn.create_connection(factory, host, port)

        else:
            loop = asyncio.get_running_loop()

            def open_raw(factory: Callable[[], Any]) -> Any:
                return loop.create_connection(factory, host, port)

        since = time.monotonic()
        try:
            link, carrier = await connect_tls(
                open_raw, TcpCarrier, tls, host, self.settings.connect_timeout
            )
        except TlsError as exc:
            refused = None
            if isinstance(conn, OpenSshConnection) and not isinstance(exc, TlsVerifyError):
                refused = await conn.channel_failure(since)
            if refused is not None:
                raise ConnectionRefusedError(
                    f"login node cannot reach exit {format_hostport(host, port)}: {refused}"
                ) from None
            raise
        if self.ssh is None:
            sock = transport_socket(link.raw)
            set_keepalive(sock, self.settings.tcp_keepalive)
            set_nodelay(sock)
        assert isinstance(carrier, TcpCarrier)
        if isinstance(conn, OpenSshConnection):
            carrier.via = conn
        return carrier

    # -- relaying one client stream ------------------------------------------------------
    async def relay(self, client: PlainProtocol, host: str, port: int, reply: ReplyFn) -> None:
        """Open a stream to ``host:port`` for an accepted local client and pump it.

        ``reply(code, bound_host, bound_port)`` answers the client in its own protocol
        (SOCKS5 reply, HTTP status line, nothing for a static forward); a non-zero code means
        the stream failed and the client is to be closed.
        """
        started = time.monotonic()
        info = StreamInfo(os.urandom(4).hex(), format_hostport(host, port), self.settings.key_id)
        try:
            if self.settings.upstream is not None:
                sock = await asyncio.wait_for(
                    self.open_upstream(host, port), self.settings.connect_timeout + 5
                )
                await self._start_raw(client, sock, info, reply)
                self.metrics.handshake.observe(time.monotonic() - started)
            else:
                await self._start_stream(client, host, port, info, reply, started)
        except OpenFailed as exc:
            self._refused(client, info, exc.code, str(exc), reply)
        except asyncio.TimeoutError:
            self._refused(client, info, s5.GENERAL_FAILURE, "timed out opening the stream", reply)
        except Exception as exc:
            log.exception("stream set-up failed")
            self._refused(client, info, s5.GENERAL_FAILURE, f"internal error: {exc}", reply)

    async def _start_stream(
        self,
        client: PlainProtocol,
        host: str,
        port: int,
        info: StreamInfo,
        reply: ReplyFn,
        started: float,
    ) -> None:
        """Open a multiplexed stream. Optimistic (the default): answer the client now and
        send its first bytes right behind the OPEN, so connect and first exchange cost one
        round trip to the exit; a refusal then reaches the client as a reset. Otherwise the
        client gets the exit's own answer (SOCKS5 reply code, HTTP status)."""
        try:
            address = s5.encode_address(host, port)
        except ValueError as exc:
            raise OpenFailed(s5.ADDRESS_TYPE_NOT_SUPPORTED, str(exc)) from None
        exit_client = await self.pick_exit()
        if client.closed:
            return
        optimistic = self.settings.optimistic
        pump: Optional[MuxPump] = None

        def answered(code: int, bound: bytes) -> None:
            assert pump is not None
            if code == s5.SUCCEEDED:
                self.metrics.handshake.observe(time.monotonic() - started)
                if not optimistic:
                    bound_host, bound_port, _ = s5.decode_address(bound)
                    reply(s5.SUCCEEDED, bound_host, bound_port)
                    pump.attach_plain(client)
                return
            why = "exit: " + s5.REPLY_NAMES.get(code, str(code))
            if optimistic:
                pump.abandon(REFUSED, why, mux.RST_REFUSED)
            else:
                pump.discard()  # never started: counted and logged as refused only
                self.pumps.discard(pump)
                self._refused(client, info, code, why, reply)

        pump = exit_client.open(address, info, answered)
        self.pumps.add(pump)
        if optimistic:
            reply(s5.SUCCEEDED, "0.0.0.0", 0)
            try:
                pump.attach_plain(client)
            except Exception as exc:  # answered already: a reset, never a second reply
                log.exception("stream set-up failed")
                pump.abandon(REFUSED, f"internal error: {exc}")
                if client.transport is not None:
                    abort_with_reset(client.transport)

    def _refused(
        self, client: PlainProtocol, info: StreamInfo, code: int, why: str, reply: ReplyFn
    ) -> None:
        self.metrics.streams.labels("refused").inc()
        log.info(
            "stream refused",
            extra={
                "fields": {
                    "stream": info.stream_id,
                    "dest": info.destination,
                    "reply": s5.REPLY_NAMES.get(code, code),
                    "reason": why,
                }
            },
        )
        if not client.closed:
            reply(code, "0.0.0.0", 0)

    async def open_upstream(self, host: str, port: int) -> Any:
        """A socket to ``host:port`` through the plain SOCKS5 upstream (python-socks)."""
        s = self.settings
        assert s.upstream is not None
        up_host, up_port = s.upstream
        if self.ssh is not None:
            up_host, up_port = "127.0.0.1", await self._upstream_forward()
        user, password = s.upstream_credentials or (None, None)
        proxy = Proxy(ProxyType.SOCKS5, up_host, up_port, username=user, password=password)
        try:
            return await proxy.connect(host, port, timeout=s.connect_timeout)
        except ProxyError as exc:
            code = getattr(exc, "error_code", None)
            code = code if isinstance(code, int) and 0 < code < 256 else s5.GENERAL_FAILURE
            raise OpenFailed(code, f"upstream refused: {exc}") from None
        except (ProxyConnectionError, ProxyTimeoutError, OSError) as exc:
            raise OpenFailed(s5.GENERAL_FAILURE, f"upstream unreachable: {exc}") from None

    async def _upstream_forward(self) -> int:
        """Loopback port forwarded over the SSH connection to the upstream (like ``ssh -L``)."""
        assert self.ssh is not None and self.settings.upstream is not None
        try:
            conn = await self.ssh.connection()
        except SshUnavailable as exc:
            raise OpenFailed(s5.GENERAL_FAILURE, f"no login node: {exc}") from None
        if isinstance(conn, OpenSshConnection):
            return conn.local_port(*self.settings.upstream)
        if self._forward is None or self._forward[0] is not conn:
            host, port = self.settings.upstream
            listener = await conn.forward_local_port("127.0.0.1", 0, host, port)
            self._forward = (conn, listener)
        return int(self._forward[1].get_port())

    # -- relaying one client stream ------------------------------------------------------

    async def _start_raw(
        self, client: PlainProtocol, sock: Any, info: StreamInfo, reply: ReplyFn
    ) -> None:
        loop = asyncio.get_running_loop()
        transport, upstream = await loop.create_connection(PlainProtocol, sock=sock)
        if client.closed:
            transport.close()
            return
        reply(s5.SUCCEEDED, "0.0.0.0", 0)
        raw = RawPump(info, self.metrics, on_done=self.stream_done)
        self.pumps.add(raw)
        set_keepalive(transport_socket(transport), self.settings.tcp_keepalive)
        raw.attach(client, upstream)
