"""The worker's local listeners; every one hands its clients to the same stream opener.

* SOCKS5 (``--socks``) with RFC 1929 credentials from ``--socks-auth``.
* An HTTP CONNECT proxy (``--http``) for tools that only speak HTTP proxies
  (``https_proxy``), with Basic proxy authentication using the ``--socks-auth`` credentials.
* Static forwards (``--forward LOCAL:PORT=DEST:PORT``): every connection accepted on a local
  port is a stream to one fixed destination, for programs that cannot be pointed at any proxy
  (static or Go binaries, which an LD_PRELOAD interposer cannot reach).

Each accepts a local client, works out the destination in its own way and hands the client
to :meth:`relay.worker.daemon.RelayWorker.relay`, which opens the stream over the same
carriers (heartbeats, half-close, resets, resume) whichever listener it came from.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import hmac
import logging
from collections.abc import Awaitable
from typing import Any, Callable, NamedTuple, Optional, Protocol

from relay.net.addresses import format_hostport
from relay.net.pump import PlainProtocol
from relay.net.sockopts import abort_with_reset, set_keepalive, set_nodelay, transport_socket
from relay.proto import socks5 as s5
from relay.proto.httpconnect import (
    HttpConnectError,
    HttpConnectParser,
    Request,
    basic_credentials,
    connect_target,
    established,
    response,
)


class StreamOpener(Protocol):
    """What the listeners need of relay.worker.daemon.RelayWorker (which imports this module)."""

    metrics: Any
    settings: Any
    connections: set[Any]

    def relay(
        self, client: PlainProtocol, host: str, port: int, reply: Callable[..., Any]
    ) -> Awaitable[None]: ...


log = logging.getLogger("relay.worker")

HANDSHAKE_TIMEOUT = 30.0
REALM = "hpc-relay"

#: HTTP status for a stream the worker could not open, by the SOCKS5 reply code it got.
_HTTP_STATUS = {
    s5.NOT_ALLOWED: 403,
    s5.TTL_EXPIRED: 504,
}


def http_status(code: int) -> int:
    """The HTTP answer to a failed CONNECT: 403 for a policy refusal, 504 for a timeout,
    502 for everything else (the next hop could not or would not connect)."""
    return _HTTP_STATUS.get(code, 502)


class Forward(NamedTuple):
    """A static forward: connections to ``listen_host:listen_port`` go to ``dest``."""

    listen_host: str
    listen_port: int
    dest_host: str
    dest_port: int

    def __str__(self) -> str:
        listen = format_hostport(self.listen_host, self.listen_port)
        return f"{listen}={format_hostport(self.dest_host, self.dest_port)}"


def credentials_ok(required: Optional[tuple[str, str]], user: str, password: str) -> bool:
    """Constant-time check of a local client's user and password (None required: any)."""
    if required is None:
        return True
    return hmac.compare_digest(user.encode(), required[0].encode()) & hmac.compare_digest(
        password.encode(), required[1].encode()
    )


class _LocalClient(PlainProtocol, abc.ABC):
    """An accepted local client: registered with the worker, keepalive on, a deadline for
    its handshake, then one stream handed to :meth:`relay.worker.daemon.RelayWorker.relay`."""

    handshake_timeout: Optional[float] = HANDSHAKE_TIMEOUT
    timeout_stage = "local-handshake-timeout"

    def __init__(self, worker: StreamOpener) -> None:
        super().__init__()
        self.worker = worker
        self.metrics = worker.metrics
        self.in_handshake = True
        self._timer: Optional[asyncio.TimerHandle] = None
        self._task: Optional[asyncio.Future[None]] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.worker.connections.add(self)
        sock = transport_socket(transport)
        set_keepalive(sock, self.worker.settings.tcp_keepalive)
        set_nodelay(sock)
        if self.handshake_timeout is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.handshake_timeout, self._timed_out)

    def data_received(self, data: bytes) -> None:
        if self.in_handshake:
            self._advance(data)
        else:
            super().data_received(data)

    def eof_received(self) -> bool:
        if self.in_handshake:
            self._close()
            return False
        return super().eof_received()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.closed = True
        self.worker.connections.discard(self)
        self._cancel_timer()
        if not self.in_handshake:
            super().connection_lost(exc)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        self.metrics.protocol_errors.labels(self.timeout_stage).inc()
        self._close(self._timeout_answer())

    def _timeout_answer(self) -> Optional[bytes]:
        return None

    def _close(self, answer: Optional[bytes] = None) -> None:
        self._cancel_timer()
        if self.transport is not None:
            if answer:
                self.transport.write(answer)
            self.transport.close()

    def _relay(self, host: str, port: int, early: bytes = b"") -> None:
        """The handshake is over: hold what came early and open the stream."""
        assert self.transport is not None
        self.transport.pause_reading()
        self.in_handshake = False
        self._cancel_timer()
        if early:
            self._early.append(early)
        self._task = asyncio.ensure_future(self.worker.relay(self, host, port, self._reply))

    @abc.abstractmethod
    def _advance(self, data: bytes) -> None:
        """Parse handshake bytes in the listener's own protocol."""

    @abc.abstractmethod
    def _reply(self, code: int, host: str, port: int) -> None:
        """Tell the client how opening the stream went (a SOCKS5 reply code)."""


class Socks5Connection(_LocalClient):
    """One SOCKS5 client: RFC 1929 credentials (unless --no-socks-auth), CONNECT, a stream."""

    def __init__(self, worker: StreamOpener) -> None:
        super().__init__(worker)
        self.socks = s5.Socks5Server()

    def _advance(self, data: bytes) -> None:
        try:
            events = self.socks.receive(data)
            while events and not self.closed:
                if not self._handle(events.pop(0)):
                    return
                events.extend(self.socks.receive())
        except s5.Socks5Error as exc:
            self.metrics.protocol_errors.labels("local-socks5").inc()
            log.info("bad SOCKS5 from local client", extra={"fields": {"why": str(exc)}})
            self._close(self.socks.reply(exc.reply) if self.socks.state == "reply" else None)

    def _handle(self, event: s5.Event) -> bool:
        assert self.transport is not None
        required = self.worker.settings.socks_credentials
        if isinstance(event, s5.Greeting):
            if s5.USERPASS in event.methods:
                self.transport.write(self.socks.select_method(s5.USERPASS))
            elif required is None and s5.NO_AUTH in event.methods:
                self.transport.write(self.socks.select_method(s5.NO_AUTH))
            else:
                self.metrics.auth_failures.labels("local-no-credentials").inc()
                self._close(self.socks.select_method(s5.NO_ACCEPTABLE))
                return False
            return True
        if isinstance(event, s5.UserPass):
            ok = credentials_ok(required, event.username, event.password)
            self.transport.write(self.socks.auth_reply(ok))
            if not ok:
                self.metrics.auth_failures.labels("local-bad-credentials").inc()
                self._close()
                return False
            return True
        if isinstance(event, s5.Request):
            if event.command != s5.CMD_CONNECT:
                self._close(self.socks.reply(s5.COMMAND_NOT_SUPPORTED))
                return False
            self._relay(event.host, event.port, self.socks.trailing())
        return False

    def _reply(self, code: int, host: str, port: int) -> None:
        if self.transport is None or self.closed:
            return
        self.transport.write(self.socks.reply(code, host, port))
        if code != s5.SUCCEEDED:
            self.transport.close()


class HttpConnectConnection(_LocalClient):
    """One HTTP proxy client: a CONNECT request head, then one relayed stream."""

    timeout_stage = "local-http-timeout"

    def __init__(self, worker: StreamOpener) -> None:
        super().__init__(worker)
        self.parser = HttpConnectParser()

    def _timeout_answer(self) -> Optional[bytes]:
        return response(408)

    def _advance(self, data: bytes) -> None:
        try:
            request = self.parser.receive(data)
        except HttpConnectError as exc:
            self._bad_request(exc)
            return
        if request is not None:
            self._handle(request)

    def _bad_request(self, exc: HttpConnectError) -> None:
        self.metrics.protocol_errors.labels("local-http").inc()
        log.info("bad HTTP request from local client", extra={"fields": {"why": str(exc)}})
        self._close(response(exc.status))

    def _handle(self, request: Request) -> None:
        if request.method != "CONNECT":
            self.metrics.protocol_errors.labels("local-http").inc()
            self._close(response(405, [("Allow", "CONNECT")]))
            return
        if not self._authorized(request):
            challenge = ("Proxy-Authenticate", f'Basic realm="{REALM}"')
            self._close(response(407, [challenge]))
            return
        try:
            host, port = connect_target(request.target)
        except HttpConnectError as exc:
            self._bad_request(exc)
            return
        self._relay(host, port, self.parser.trailing())

    def _authorized(self, request: Request) -> bool:
        required = self.worker.settings.socks_credentials
        if required is None:
            return True
        values = request.header("proxy-authorization")
        if not values:
            self.metrics.auth_failures.labels("local-no-credentials").inc()
            return False
        given = basic_credentials(values[0]) if len(values) == 1 else None
        if given is None or not credentials_ok(required, *given):
            self.metrics.auth_failures.labels("local-bad-credentials").inc()
            return False
        return True

    def _reply(self, code: int, host: str, port: int) -> None:
        if self.transport is None or self.closed:
            return
        if code == s5.SUCCEEDED:
            self.transport.write(established())
            return
        self.transport.write(response(http_status(code)))
        self.transport.close()


class ForwardConnection(_LocalClient):
    """One client of a static forward: relayed to the forward's destination at once."""

    handshake_timeout = None

    def __init__(self, worker: StreamOpener, forward: Forward) -> None:
        super().__init__(worker)
        self.forward = forward

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._relay(self.forward.dest_host, self.forward.dest_port)

    def _advance(self, data: bytes) -> None:
        """Never called: there is no handshake, the stream opens on accept."""

    def _reply(self, code: int, host: str, port: int) -> None:
        if code != s5.SUCCEEDED and not self.closed:
            # The client's connect already succeeded; a reset is how "refused" looks now.
            abort_with_reset(self.transport)


class Listeners:
    """The HTTP CONNECT listener and static forwards of one worker (any of them may be off)."""

    def __init__(self, worker: StreamOpener) -> None:
        self.worker = worker
        self.http: Optional[asyncio.Server] = None
        self.forwards: list[tuple[Forward, asyncio.Server]] = []

    async def start(self) -> None:
        settings = self.worker.settings
        loop = asyncio.get_running_loop()
        worker = self.worker
        try:
            if settings.http is not None:
                self.http = await loop.create_server(
                    lambda: HttpConnectConnection(worker),
                    settings.http.host,
                    settings.http.port,
                    backlog=1024,
                )
                log.info(
                    "listening",
                    extra={"fields": {"http": format_hostport(*_address(self.http))}},
                )
            for forward in settings.forward:
                fwd = Forward(*forward.listen, *forward.dest)
                server = await loop.create_server(
                    lambda fwd=fwd: ForwardConnection(worker, fwd),  # type: ignore[misc]
                    fwd.listen_host,
                    fwd.listen_port,
                    backlog=1024,
                )
                self.forwards.append((fwd, server))
                log.info("listening", extra={"fields": {"forward": str(fwd)}})
        except BaseException:
            self.close()
            raise

    @property
    def http_address(self) -> Optional[tuple[str, int]]:
        return _address(self.http) if self.http is not None else None

    @property
    def forward_addresses(self) -> list[tuple[str, int]]:
        """Where each static forward listens, in configuration order (port 0 resolved)."""
        return [_address(server) for _, server in self.forwards]

    def close(self) -> None:
        """Stop accepting (open streams are the worker's to drain or reset)."""
        for server in self._servers():
            server.close()

    async def wait_closed(self) -> None:
        for server in self._servers():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 2)

    def _servers(self) -> list[asyncio.Server]:
        servers = [server for _, server in self.forwards]
        return ([self.http] if self.http is not None else []) + servers


def _address(server: Any) -> tuple[str, int]:
    host, port = server.sockets[0].getsockname()[:2]
    return str(host), int(port)
