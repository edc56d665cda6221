"""relay-worker: the compute node's local listeners, multiplexing every stream onto a few
long-lived carriers per exit (protocol v2, docs/PROTOCOL.md)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Callable, Optional

from python_socks import ProxyConnectionError, ProxyError, ProxyTimeoutError, ProxyType
from python_socks.async_.asyncio import Proxy

from relay.errors import OpenFailed
from relay.metrics import Metrics
from relay.net.addresses import format_hostport
from relay.net.daemon import Daemon
from relay.net.muxpump import MuxPump
from relay.net.pump import REFUSED, PlainProtocol, RawPump, StreamInfo
from relay.net.sockopts import abort_with_reset, set_keepalive, transport_socket
from relay.net.sshhop import Login, SshHop
from relay.proto import mux
from relay.proto import socks5 as s5
from relay.worker.dialler import Dialler, ssh_hop
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
        self.dialler = Dialler(settings, self.metrics, ssh_hop(settings, self.metrics))
        self._next_exit = 0
        self._stopping = False
        self.listeners = Listeners(self)
        self.exits: dict[tuple[str, int], ExitClient] = {}

    @property
    def ssh(self) -> Optional[SshHop]:
        """The SSH hop every carrier goes through (None without login nodes); its
        ``--ssh-connections`` slots share the exits' carriers."""
        return self.dialler.ssh

    async def start(self) -> None:
        s = self.settings
        self.dialler.set_forwards()
        await self._listen(
            lambda: Socks5Connection(self),
            s.socks.host,
            s.socks.port,
            s.metrics.host if s.metrics is not None else None,
            s.metrics.port if s.metrics is not None else 0,
        )
        log.info(
            "listening",
            extra={
                "fields": {
                    "socks": format_hostport(*self.address),
                    "auth": "user/password" if s.socks_credentials else "none",
                    "mode": "upstream" if s.upstream else "tunnel",
                    "logins": ",".join(str(Login(*x)) for x in s.login) or "-",
                    "carriers": s.carriers,
                    "ssh_connections": self.ssh.connections if self.ssh is not None else 0,
                }
            },
        )
        await self.listeners.start()
        if s.upstream is None:
            for exit_addr in s.exit:
                self._add_exit(exit_addr)

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
        await self.dialler.close()

    # -- choosing an exit -----------------------------------------------------------------
    async def pick_exit(self) -> ExitClient:
        """A session for a new stream: round robin over exits with a carrier up; if none
        has one yet, the first to get one within --connect-timeout."""
        for exit_addr in self.settings.exit:
            if exit_addr not in self.exits and not self._stopping:
                self._add_exit(exit_addr)
        clients = [self.exits[e] for e in self.settings.exit if e in self.exits]
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

    # -- relaying one client stream ------------------------------------------------------
    async def relay(self, client: PlainProtocol, host: str, port: int, reply: ReplyFn) -> None:
        """Open a stream to ``host:port`` for an accepted local client and pump it.

        ``reply(code, bound_host, bound_port)`` answers the client in its own protocol
        (SOCKS5 reply, HTTP status line, nothing for a static forward); a non-zero code means
        the stream failed and the client is to be closed.
        """
        started = time.monotonic()
        key_id = self.settings.key_id or ""
        info = StreamInfo(os.urandom(4).hex(), format_hostport(host, port), key_id)
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
        optimistic = not self.settings.no_optimistic
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
        up_host, up_port = await self.dialler.upstream_address()
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
