"""relay-worker: the compute node's local listeners, multiplexing every stream onto a few
long-lived carriers per exit (protocol v2, docs/PROTOCOL.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any, Callable, Optional, Union

import asyncssh
from python_socks import ProxyConnectionError, ProxyError, ProxyTimeoutError, ProxyType
from python_socks.async_.asyncio import Proxy

from relay.errors import OpenFailed
from relay.metrics import Metrics
from relay.net.addresses import format_hostport
from relay.net.carrier import SshCarrier, TcpCarrier, TunnelRefused
from relay.net.daemon import Daemon
from relay.net.muxpump import MuxPump
from relay.net.openssh import OpenSshConnection
from relay.net.pump import REFUSED, PlainProtocol, RawPump, StreamInfo
from relay.net.sockopts import abort_with_reset, set_keepalive, set_nodelay, transport_socket
from relay.net.sshhop import SshHop, SshUnavailable
from relay.net.tlslink import TlsClient, TlsError, TlsVerifyError, connect_tls
from relay.proto import ProtocolError, mux
from relay.proto import socks5 as s5
from relay.proto.opener import Established
from relay.worker.exitclient import ExitClient
from relay.worker.listeners import Listeners, Socks5Connection
from relay.worker.settings import WorkerSettings

log = logging.getLogger("relay.worker")

ReplyFn = Callable[[int, str, int], None]
"""Answers the local client: (SOCKS5 reply code, bound host, bound port)."""


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
