"""relay-worker: the compute node's local SOCKS5 listener, carrying each stream to the exit."""

from __future__ import annotations

import asyncio
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
from relay.carrier import (
    Opened,
    SshCarrier,
    TcpCarrier,
    TunnelRefused,
    new_opener,
    resume_opener,
)
from relay.daemon import Daemon
from relay.listeners import Listeners, Socks5Connection
from relay.loopbound import LoopBound
from relay.metrics import Metrics
from relay.proto import ProtocolError
from relay.proto import hello as hl
from relay.proto import socks5 as s5
from relay.proto.stream import TunnelStream
from relay.pump import (
    REFUSED,
    RESUME_FAILED,
    UNCONFIRMED_BYTES,
    PlainProtocol,
    RawPump,
    StreamInfo,
    TunnelPump,
)
from relay.secrets import load_secret, load_userpass
from relay.sockopts import set_keepalive, set_nodelay, transport_socket
from relay.sshhop import Login, SshHop, SshUnavailable
from relay.tlslink import TlsClient, TlsError, TlsVerifyError, client_context, connect_tls
from relay.warm import WarmPool

log = logging.getLogger("relay.worker")


class WorkerSettings:
    """The knobs the worker reads, so tests and the demo need not build a whole config."""

    def __init__(self, **kwargs: Any) -> None:
        self.socks_host: str = kwargs.pop("socks_host", "127.0.0.1")
        self.socks_port: int = kwargs.pop("socks_port", 1080)
        self.socks_credentials: Optional[tuple[str, str]] = kwargs.pop("socks_credentials", None)
        self.logins: list[Login] = list(kwargs.pop("logins", []))
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
        # Warm carriers kept per exit (0 = off), see relay.warm.
        self.warm_carriers: int = kwargs.pop("warm_carriers", 2)
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
            warm_carriers=cfg.warm_carriers,
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


EXIT_PENALTY = 30.0
"""Seconds a new stream avoids an exit that just failed (unless every exit failed)."""
RESUME_CONCURRENCY = 16
"""Carriers re-opened at once after a loss; the rest wait, so a dead SSH connection
carrying thousands of streams does not turn into a stampede."""


class Session:
    """What a stream needs to come back after its carrier died."""

    __slots__ = ("exit", "key", "lost_at", "session_id", "task")

    def __init__(self, exit_addr: tuple[str, int], session_id: bytes, key: bytes) -> None:
        self.exit = exit_addr
        self.session_id = session_id
        self.key = key
        self.lost_at = 0.0
        self.task: Optional[asyncio.Future[None]] = None


class OpenFailed(Exception):
    """A stream could not be opened; ``code`` is the SOCKS5 reply for the local client."""

    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code


class RelayWorker(Daemon):
    role = "worker"
    _resume_slots = LoopBound(lambda: asyncio.Semaphore(RESUME_CONCURRENCY))

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
            )
        self._next_exit = 0
        self._exit_failed: dict[tuple[str, int], float] = {}
        self.sessions: dict[TunnelPump, Session] = {}
        self._opening: set[TunnelPump] = set()
        """Optimistic streams whose CONNECT the exit has not answered yet."""
        self._stopping = False
        self._forward: Optional[tuple[Any, Any]] = None
        self.listeners = Listeners(self)
        self.warm: dict[tuple[str, int], WarmPool] = {}

    async def start(self) -> None:
        s = self.settings
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
                }
            },
        )
        await self.listeners.start()
        self._start_warm()

    async def drain(self, timeout: float) -> None:
        self.listeners.close()
        await self._close_warm()
        await super().drain(timeout)

    async def stop(self) -> None:
        self.listeners.close()
        self._stopping = True
        await self._close_warm()
        for session in self.sessions.values():
            if session.task is not None:
                session.task.cancel()
        await super().stop()
        await self.listeners.wait_closed()
        if self.ssh is not None:
            await self.ssh.close()

    # -- opening streams ------------------------------------------------------------------
    def _exit_order(self) -> list[tuple[str, int]]:
        """Exits for a new stream: round robin over healthy ones, recently failed ones last."""
        exits = self.settings.exits
        if not exits:
            raise OpenFailed(s5.GENERAL_FAILURE, "no exit configured")
        start = self._next_exit % len(exits)
        self._next_exit += 1
        rotated = exits[start:] + exits[:start]
        now = time.monotonic()
        healthy = [e for e in rotated if self._exit_failed.get(e, -1e9) + EXIT_PENALTY < now]
        return healthy + [e for e in rotated if e not in healthy]

    # -- warm carriers --------------------------------------------------------------------
    def _start_warm(self) -> None:
        s = self.settings
        if s.warm_carriers <= 0 or s.upstream is not None:
            return
        for exit_addr in s.exits:
            if exit_addr not in self.warm:
                pool = WarmPool(self, exit_addr, s.warm_carriers)
                self.warm[exit_addr] = pool
                pool.start()

    async def _close_warm(self) -> None:
        pools, self.warm = list(self.warm.values()), {}
        for pool in pools:
            await pool.close()

    def may_warm(self) -> bool:
        """Warm carriers are opened over an SSH connection that is up, never for one."""
        return not self._stopping and (self.ssh is None or self.ssh.connected)

    async def _take_warm(
        self, exit_addr: tuple[str, int], host: str, port: int, pump: Optional[TunnelPump]
    ) -> Optional[tuple[Any, Opened]]:
        """Send the CONNECT on a warm carrier to ``exit_addr``, if one is ready."""
        pool = self.warm.get(exit_addr)
        if pool is None:
            return None
        pool.kick()  # the SSH connection may be up again: let an empty pool refill
        entry = pool.take()
        if entry is None:
            return None
        carrier = entry.send_connect(host, port)
        self._send_behind_connect(carrier, pump)
        try:
            opened = await self._handshake(carrier)
        except (OpenFailed, TunnelRefused) as exc:
            self.metrics.keep_warm_failures.labels("lost").inc()
            log.debug("warm carrier failed its CONNECT", extra={"fields": {"why": str(exc)}})
            self._let_go(carrier, pump, exc)
            return None
        self.metrics.stream_carriers.labels("warm").inc()
        return carrier, opened

    def _send_behind_connect(self, carrier: Any, pump: Optional[TunnelPump]) -> None:
        """Optimistic data: the stream sends on the carrier right behind its CONNECT."""
        if pump is None:
            return
        if pump.done is not None:
            carrier.link.close()
            raise OpenFailed(s5.GENERAL_FAILURE, "client gone")
        pump.attach_carrier(carrier.link)

    def _let_go(self, carrier: Any, pump: Optional[TunnelPump], exc: Exception) -> None:
        """A carrier failed before the exit answered the CONNECT. Its stream may go to
        another carrier, from its first byte, only if this exit cannot have started it."""
        if pump is None:
            return
        stream = pump.stream
        if carrier.established is not None and (stream.send_offset or stream.fin_sent):
            raise OpenFailed(
                s5.GENERAL_FAILURE, f"carrier lost before the exit answered the CONNECT: {exc}"
            )
        pump.detach_carrier()

    async def open_carrier(
        self, host: str, port: int, pump: Optional[TunnelPump] = None
    ) -> tuple[Any, Opened, tuple[str, int]]:
        """Open a carrier to an exit and run the handshake for ``host:port``.

        A warm carrier for the chosen exit is used when one is ready; otherwise a new one is
        dialled. An exit that cannot be reached is skipped for a while and the next one
        tried, so losing one exit VM costs new streams nothing but the failed attempt. With
        ``pump`` (optimistic data) the stream sends on the carrier right behind its CONNECT;
        after a failed handshake the next carrier sends it all again from the start, unless
        the exit may already have started it.
        """
        s = self.settings
        failure: Optional[OpenFailed] = None
        for exit_addr in self._exit_order():
            warm = await self._take_warm(exit_addr, host, port, pump)
            if warm is not None:
                self._exit_failed.pop(exit_addr, None)
                return warm[0], warm[1], exit_addr
            try:
                carrier = await self._dial(exit_addr)
            except OpenFailed as exc:
                if isinstance(exc.__cause__, SshUnavailable):
                    raise
                failure = exc
                self._exit_failed[exit_addr] = time.monotonic()
                continue
            carrier.start(new_opener(s.secret, s.key_id, s.heartbeat, (host, port)))
            self._send_behind_connect(carrier, pump)
            try:
                opened = await self._handshake(carrier)
            except TunnelRefused as exc:
                raise OpenFailed(s5.GENERAL_FAILURE, str(exc)) from None
            except OpenFailed as exc:  # the exit dropped the carrier: try the next one
                failure = exc
                self._exit_failed[exit_addr] = time.monotonic()
                self._let_go(carrier, pump, exc)
                continue
            self._exit_failed.pop(exit_addr, None)
            self.metrics.stream_carriers.labels("dialled").inc()
            return carrier, opened, exit_addr
        assert failure is not None
        raise failure

    async def _dial(self, exit_addr: tuple[str, int]) -> Union[SshCarrier, TcpCarrier]:
        """A byte pipe to the exit: a direct-tcpip channel through the login node, or TCP."""
        exit_host, exit_port = exit_addr
        carrier: Union[SshCarrier, TcpCarrier]
        try:
            if self.settings.exit_tls is not None:
                carrier = await self._dial_tls(exit_addr, self.settings.exit_tls)
            elif self.ssh is not None:
                conn = await self.ssh.connection()
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
        if self.ssh is not None:
            conn = await self.ssh.connection()

            def open_raw(factory: Callable[[], Any]) -> Any:
                return conn.create_connection(factory, host, port)

        else:
            loop = asyncio.get_running_loop()

            def open_raw(factory: Callable[[], Any]) -> Any:
                return loop.create_connection(factory, host, port)

        link, carrier = await connect_tls(
            open_raw, TcpCarrier, tls, host, self.settings.connect_timeout
        )
        if self.ssh is None:
            sock = transport_socket(link.raw)
            set_keepalive(sock, self.settings.tcp_keepalive)
            set_nodelay(sock)
        assert isinstance(carrier, TcpCarrier)
        return carrier

    async def _handshake(self, carrier: Union[SshCarrier, TcpCarrier]) -> Opened:
        try:
            opened = await carrier.opened
        except TunnelRefused as exc:
            self.metrics.carriers.labels("refused").inc()
            self.metrics.auth_failures.labels(f"exit-{exc.stage}").inc()
            raise
        except (ProtocolError, ConnectionError) as exc:
            carrier.link.close()
            self.metrics.carriers.labels("failed").inc()
            raise OpenFailed(s5.GENERAL_FAILURE, f"tunnel handshake: {exc}") from None
        self.metrics.carriers.labels("ok").inc()
        return opened

    # -- resume ---------------------------------------------------------------------------
    def _carrier_lost(self, pump: TunnelPump, why: str) -> bool:
        """A stream lost its carrier: get it back in the background (True) or give up."""
        if pump in self._opening:
            return True  # the handshake fails with it; open_carrier tries the next exit
        session = self.sessions.get(pump)
        if session is None or self._stopping:
            return False
        session.lost_at = time.monotonic()
        self.metrics.reconnects.inc()
        log.info(
            "carrier lost, resuming",
            extra={
                "fields": {"stream": pump.info.stream_id, "dest": pump.info.destination, "why": why}
            },
        )
        session.task = asyncio.ensure_future(self._resume(pump, session))
        return True

    async def _resume(self, pump: TunnelPump, session: Session) -> None:
        """Re-open a carrier to the session's exit, with backoff, until it works or is refused."""
        s = self.settings
        deadline = session.lost_at + s.resume_timeout
        attempt = 0
        why = ""
        while pump.done is None:
            wait = 0.0
            async with self._resume_slots:
                if pump.done is not None:
                    return
                try:
                    carrier = await asyncio.wait_for(self._dial(session.exit), s.connect_timeout)
                    carrier.start(
                        resume_opener(
                            session.key,
                            s.key_id,
                            s.heartbeat,
                            session.session_id,
                            pump.stream.recv_offset,
                        )
                    )
                    opened = await asyncio.wait_for(self._handshake(carrier), s.connect_timeout)
                except TunnelRefused as exc:
                    if exc.status in (hl.UNKNOWN_SESSION, hl.BAD_AUTH):
                        self.metrics.resumes.labels("refused").inc()
                        pump.abandon(RESUME_FAILED, f"exit refused the resume: {exc}")
                        return
                    why = str(exc)
                except OpenFailed as exc:
                    why = str(exc)
                    if isinstance(exc.__cause__, SshUnavailable):
                        wait = exc.__cause__.retry_after
                except (ProtocolError, ConnectionError, OSError, asyncio.TimeoutError) as exc:
                    why = str(exc) or type(exc).__name__
                else:
                    if pump.done is not None:
                        carrier.link.close()
                        return
                    replayed = carrier.attach(pump, opened.established.peer_offset)
                    self.metrics.resumes.labels("ok").inc()
                    pump.info.log_resumed(
                        time.monotonic() - session.lost_at,
                        replayed,
                        pump.stream.recv_offset,
                        attempts=attempt + 1,
                    )
                    return
            if time.monotonic() >= deadline:
                self.metrics.resumes.labels("gave-up").inc()
                pump.abandon(RESUME_FAILED, f"no carrier for {s.resume_timeout:.0f}s: {why}")
                return
            backoff = min(s.reconnect_max, 0.25 * 2**attempt) * random.uniform(0.5, 1.0)
            attempt += 1
            self.metrics.resumes.labels("retry").inc()
            log.debug(
                "resume attempt failed",
                extra={
                    "fields": {
                        "stream": pump.info.stream_id,
                        "why": why,
                        "next": round(max(backoff, wait), 2),
                    }
                },
            )
            await asyncio.sleep(min(max(backoff, wait), max(0.0, deadline - time.monotonic())))

    def stream_done(self, pump: Any, result: str) -> None:
        super().stream_done(pump, result)
        session = self.sessions.pop(pump, None)
        if session is not None and session.task is not None and not session.task.done():
            session.task.cancel()

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
        if self._forward is None or self._forward[0] is not conn:
            host, port = self.settings.upstream
            listener = await conn.forward_local_port("127.0.0.1", 0, host, port)
            self._forward = (conn, listener)
        return int(self._forward[1].get_port())

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
            elif self.settings.optimistic:
                await self._start_optimistic(client, host, port, info, reply)
            else:
                await self._start_tunnel(client, host, port, info, reply)
            self.metrics.handshake.observe(time.monotonic() - started)
        except OpenFailed as exc:
            self._refused(client, info, exc.code, str(exc), reply)
        except asyncio.TimeoutError:
            self._refused(client, info, s5.GENERAL_FAILURE, "timed out opening the stream", reply)
        except Exception as exc:
            log.exception("stream set-up failed")
            self._refused(client, info, s5.GENERAL_FAILURE, f"internal error: {exc}", reply)

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

    async def _start_tunnel(
        self, client: PlainProtocol, host: str, port: int, info: StreamInfo, reply: ReplyFn
    ) -> None:
        s = self.settings
        carrier, opened, exit_addr = await asyncio.wait_for(
            self.open_carrier(host, port), s.connect_timeout + 5
        )
        connected = opened.connected
        assert connected is not None
        if connected.code != s5.SUCCEEDED or client.closed:
            carrier.link.close()
            if client.closed:
                return
            raise OpenFailed(connected.code, "exit: " + s5.REPLY_NAMES.get(connected.code, "?"))
        reply(s5.SUCCEEDED, connected.host, connected.port)
        pump = self._new_pump(info, opened.established.heartbeat_ms / 1000)
        est = opened.established
        self.sessions[pump] = Session(exit_addr, est.session_id, est.session_key)
        pump.attach_plain(client)
        carrier.attach(pump)

    def _new_pump(
        self, info: StreamInfo, heartbeat: float, unconfirmed_limit: Optional[int] = None
    ) -> TunnelPump:
        s = self.settings
        stream = TunnelStream(
            heartbeat=heartbeat,
            now=asyncio.get_running_loop().time(),
            misses=s.heartbeat_misses,
            replay_limit=s.replay_buffer,
        )
        pump = TunnelPump(
            stream,
            info,
            self.metrics,
            plain_is_client=True,
            on_done=self.stream_done,
            on_carrier_lost=self._carrier_lost,
            unconfirmed_limit=unconfirmed_limit,
        )
        self.pumps.add(pump)
        return pump

    async def _start_optimistic(
        self, client: PlainProtocol, host: str, port: int, info: StreamInfo, reply: ReplyFn
    ) -> None:
        """Answer the client now and send its first bytes right behind the CONNECT.

        Connect and first exchange then cost one round trip to the exit. A stream the exit
        refuses, or that no exit takes, reaches the client as a reset instead of a reply.
        """
        s = self.settings
        reply(s5.SUCCEEDED, "0.0.0.0", 0)
        pump = self._new_pump(info, s.heartbeat, UNCONFIRMED_BYTES)
        pump.attach_plain(client)
        if pump.done is not None:
            return
        self._opening.add(pump)
        try:
            carrier, opened, exit_addr = await asyncio.wait_for(
                self.open_carrier(host, port, pump), s.connect_timeout + 5
            )
        except OpenFailed as exc:
            pump.abandon(REFUSED, str(exc))
            return
        except asyncio.TimeoutError:
            pump.abandon(REFUSED, "timed out opening the stream")
            return
        except Exception as exc:  # the client was answered: a reset, never a second reply
            log.exception("stream set-up failed")
            pump.abandon(REFUSED, f"internal error: {exc}")
            return
        finally:
            self._opening.discard(pump)
        connected = opened.connected
        assert connected is not None
        if pump.done is not None:
            carrier.link.close()
            return
        if connected.code != s5.SUCCEEDED:
            pump.abandon(REFUSED, "exit: " + s5.REPLY_NAMES.get(connected.code, "?"))
            return
        est = opened.established
        pump.stream.heartbeat = est.heartbeat_ms / 1000
        self.sessions[pump] = Session(exit_addr, est.session_id, est.session_key)
        carrier.hand_over(pump)

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
