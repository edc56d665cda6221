"""One accepted connection at the exit: the handshake, then a carrier of its session or a
plain SOCKS5 relay; destinations are resolved and checked against the policy here."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import socket
import time
from typing import Any, Optional, Protocol

from relay.exit.destinations import Refusal, connect_error, resolve
from relay.exit.group import Group, PlaintextRelay
from relay.exit.sessions import ExitMux, SessionHost
from relay.net.addresses import format_hostport
from relay.net.pump import PlainProtocol, RawPump, StreamInfo
from relay.net.sockopts import set_keepalive, set_nodelay, set_notsent_lowat, transport_socket
from relay.net.tlslink import TlsLink
from relay.proto import ProtocolError
from relay.proto import handoff as ho
from relay.proto import hello as hl
from relay.proto import socks5 as s5

log = logging.getLogger("relay.exit")


MIN_HEARTBEAT_MS = 100
HANDSHAKE_BYTES_MAX = 512 * 1024
"""Most bytes a connection may send before its HELLO is done (or, for a plain SOCKS5 client,
its stream starts). A real first flight is under 1 KiB; this caps what one handshake can make
the exit buffer."""
CARRIER_NOTSENT_LOWAT = 128 * 1024
"""Unsent bytes a carrier socket may hold in the kernel: the queue below the fair scheduler
stays short, so a bulk stream delays another stream's frames by little."""


class ConnectionHost(SessionHost, Protocol):
    """What an accepted connection needs of its exit (relay.exit.daemon.RelayExit), beyond
    what its session does: the handshake limits, the replay guard, the process group."""

    connections: set[Any]
    unauthenticated: dict[ExitConnection, None]
    handshakes: int
    guard: hl.ReplayGuard
    group: Optional[Group]
    tls_relays: set[PlaintextRelay]

    def handshake_started(self, conn: ExitConnection) -> bool: ...
    def carrier_full(self, key_id: str) -> Optional[str]: ...
    def carrier_started(self, key_id: str) -> None: ...
    def was_expired(self, session_id: bytes) -> bool: ...


class ExitConnection(PlainProtocol):
    """One accepted connection: the handshake first, then a carrier of its worker's session
    (or, for an allowed plain SOCKS5 client, one side of a raw relay)."""

    def __init__(self, relay_exit: ConnectionHost, adopted: Optional[ho.Handoff] = None) -> None:
        super().__init__()
        self.exit = relay_exit
        self.metrics = relay_exit.metrics
        self.socks = s5.Socks5Server({hl.METHOD_TUNNEL: hl.decode_hello})
        self.mux: Optional[ExitMux] = None
        self.cid = 0
        self.key_id = ""
        self.in_handshake = True
        self.started = 0.0
        self._timer: Optional[asyncio.TimerHandle] = None
        self._task: Optional[asyncio.Future[None]] = None
        self._corked: Optional[list[bytes]] = None
        self._received = 0  # bytes received during the handshake
        # A --workers process keeps the handshake bytes until it knows whether the HELLO is
        # its own; a connection a sibling handed over is never handed on again.
        self.adopted = adopted
        self._raw: Optional[bytearray] = (
            bytearray() if relay_exit.group is not None and adopted is None else None
        )
        self._sent = 0  # handshake answer bytes written so far
        self._skip = adopted.sent if adopted is not None else 0  # the sibling wrote those

    # -- asyncio callbacks ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        relay_exit = self.exit
        self.started = time.monotonic()
        relay_exit.connections.add(self)
        if not relay_exit.handshake_started(self):
            self._end_handshake()
            self.abort()
            return
        sock = transport_socket(transport)
        set_keepalive(sock, relay_exit.settings.tcp_keepalive)
        set_nodelay(sock)
        set_notsent_lowat(sock, CARRIER_NOTSENT_LOWAT)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(relay_exit.settings.handshake_timeout, self._timed_out)
        if self.adopted is not None:
            self.data_received(self.adopted.data)

    def data_received(self, data: bytes) -> None:
        if self.mux is not None:
            self.mux.driver.link_data(self.cid, data)
        elif self.in_handshake:
            self._received += len(data)
            if self._received > HANDSHAKE_BYTES_MAX:
                self.metrics.limit_hits.labels("handshake-bytes").inc()
                log.warning(
                    "too many bytes before the handshake ended; closing",
                    extra={"fields": {"peer": self._peer(), "bytes": self._received}},
                )
                self._end_handshake()
                self.abort()
                return
            if self._raw is not None:
                self._raw += data
            self._advance(data)
        else:
            super().data_received(data)

    def eof_received(self) -> bool:
        if self.mux is not None:
            self.mux.driver.drop_link(self.cid, "carrier closed by the worker")
            return False
        if self.in_handshake:
            self._fail("handshake", "peer closed during handshake")
            return False
        return super().eof_received()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.closed = True
        self.exit.connections.discard(self)
        self._end_handshake()
        if self.mux is not None:
            self.mux.driver.drop_link(self.cid, str(exc) if exc else "carrier closed")
        elif not self.in_handshake and self._task is None:
            super().connection_lost(exc)

    def pause_writing(self) -> None:
        if self.mux is not None:
            self.mux.driver.pause_link(self.cid)
        else:
            super().pause_writing()

    def resume_writing(self) -> None:
        if self.mux is not None:
            self.mux.driver.resume_link(self.cid)
        else:
            super().resume_writing()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- handshake ------------------------------------------------------------------------
    def age(self) -> float:
        return time.monotonic() - self.started

    def evict(self) -> None:
        """Make room for a new connection: the handshake limit is reached (see RelayExit)."""
        self._end_handshake()
        self.abort()

    def tls_failed(self, exc: Exception) -> None:
        """The TLS layer gave up: no TLS from the client, a bad record, a closed connection."""
        if self.in_handshake:
            self._fail("tls", str(exc))
            return
        self.metrics.protocol_errors.labels("tls").inc()
        log.info(
            "TLS failed on a carrier", extra={"fields": {"peer": self._peer(), "why": str(exc)}}
        )
        # The link closes; connection_lost then moves the carrier's streams as for any loss.

    def _end_handshake(self) -> None:
        self.exit.unauthenticated.pop(self, None)
        if self.in_handshake:
            self.in_handshake = False
            self.exit.handshakes -= 1
        self._cancel_timer()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        self.metrics.protocol_errors.labels("handshake-timeout").inc()
        self.metrics.limit_hits.labels("handshake-timeout").inc()
        log.info("handshake timed out", extra={"fields": {"peer": self._peer()}})
        self._end_handshake()
        self.abort()

    def _fail(self, stage: str, why: str, reply: Optional[bytes] = None) -> None:
        self.metrics.protocol_errors.labels(stage).inc()
        log.info("handshake failed", extra={"fields": {"peer": self._peer(), "why": why}})
        self._close_with(reply)

    def _close_with(self, reply: Optional[bytes]) -> None:
        self._end_handshake()
        if self.transport is not None:
            if reply:
                self._write(reply)
            self._flush()
            self.transport.close()

    def _write(self, data: bytes) -> None:
        if self._corked is not None:
            self._corked.append(data)
        elif self.transport is not None:
            data = self._unsent(data)
            self._sent += len(data)
            self.transport.write(data)

    def _unsent(self, data: bytes) -> bytes:
        """Leave out the answer bytes a sibling already wrote before handing us this
        connection (the method selection: the same bytes, as both parse the same greeting)."""
        if self._skip and data:
            skipped = min(self._skip, len(data))
            self._skip -= skipped
            data = data[skipped:]
        return data

    def _flush(self) -> None:
        """Send the handshake answers held back so far, as one segment.

        The worker sends greeting, HELLO and CONNECT in one flight; answering all three in
        one segment matters because sshd relays to the worker without TCP_NODELAY: a second
        small segment would wait for the worker's delayed ACK, about 40 ms.
        """
        data = self._take_corked()
        if data and self.transport is not None:
            self._sent += len(data)
            self.transport.write(data)

    def _take_corked(self) -> bytes:
        corked, self._corked = self._corked, None
        return self._unsent(b"".join(corked)) if corked else b""

    def _peer(self) -> str:
        if self.transport is None:
            return "?"
        peer = self.transport.get_extra_info("peername")
        return format_hostport(*peer) if peer else "?"

    def _advance(self, data: bytes) -> None:
        if self._corked is None:  # else answers held for the CONNECT reply are still waiting
            self._corked = []
        try:
            events = self.socks.receive(data)
            while events and not self.closed:
                if not self._handle(events.pop(0)):
                    return
                events.extend(self.socks.receive())
        except s5.Socks5Error as exc:
            reply = self.socks.reply(exc.reply) if self.socks.state == "reply" else None
            self._fail("socks5", str(exc), reply)
        except ProtocolError as exc:
            self._fail("hello", str(exc))
        finally:
            if self._task is None:  # else the CONNECT reply joins them after the connect
                self._flush()

    def _handle(self, event: s5.Event) -> bool:
        assert self.transport is not None
        settings = self.exit.settings
        if isinstance(event, s5.Greeting):
            if hl.METHOD_TUNNEL in event.methods:
                self._write(self.socks.select_method(hl.METHOD_TUNNEL))
            elif settings.allow_plain and s5.USERPASS in event.methods:
                self._write(self.socks.select_method(s5.USERPASS))
            else:
                reason = "plain-refused" if s5.USERPASS in event.methods else "no-method"
                self.metrics.auth_failures.labels(reason).inc()
                log.info(
                    "no acceptable method",
                    extra={"fields": {"peer": self._peer(), "offered": event.methods.hex()}},
                )
                self._close_with(self.socks.select_method(s5.NO_ACCEPTABLE))
                return False
            return True
        if isinstance(event, s5.SubNegotiation):
            assert isinstance(event.message, hl.Hello)
            return self._on_hello(event.message)
        if isinstance(event, s5.UserPass):
            secret = settings.secrets.get(event.username)
            ok = secret is not None and hmac.compare_digest(
                secret, event.password.encode("utf-8", "replace")
            )
            self._write(self.socks.auth_reply(ok))
            if not ok:
                self.metrics.auth_failures.labels("bad-password").inc()
                self._close_with(None)
                return False
            self.key_id = event.username
            self.exit.unauthenticated.pop(self, None)
            return True
        if isinstance(event, s5.Request):
            if event.command != s5.CMD_CONNECT:
                self._refuse_plain(s5.COMMAND_NOT_SUPPORTED, "command-not-supported", event)
                return False
            self.transport.pause_reading()
            self._task = asyncio.ensure_future(self._connect_plain_guarded(event))
            return False
        return False

    def _on_hello(self, hello: hl.Hello) -> bool:
        assert self.transport is not None
        settings = self.exit.settings
        if hello.is_resume:
            if self._hand_off(hello, ho.KIND_RESUME):
                return False
            return self._on_join(hello)
        secret = settings.secrets.get(hello.key_id)
        if secret is None:
            return self._hello_refused(hello, hl.BAD_AUTH, "unknown-key")
        if not hl.verify_hello(hello, secret):
            return self._hello_refused(hello, hl.BAD_AUTH, "bad-mac")
        if self._hand_off(hello, ho.KIND_NEW):  # the nonce's process checks it for replay
            return False
        now_ms = int(time.time() * 1000)
        status = self.exit.guard.check(hello.timestamp_ms, hello.nonce, now_ms)
        if status != hl.OK:
            reason = {hl.CLOCK_SKEW: "clock-skew", hl.REPLAY: "replay"}.get(status, "busy")
            return self._hello_refused(hello, status, reason)
        if not self._carrier_room(hello):
            return False
        ours = int(settings.heartbeat * 1000)
        heartbeat_ms = max(MIN_HEARTBEAT_MS, min(ours, hello.heartbeat_ms or ours))
        group = self.exit.group
        session_id = group.new_session_id() if group is not None else os.urandom(16)
        nonce = os.urandom(hl.NONCE_SIZE)
        key = hl.session_key(secret, hello.nonce, nonce, session_id)
        self._write(
            hl.encode_reply(secret, hello.mac, hl.OK, session_id, 0, heartbeat_ms, nonce, now_ms)
        )
        mux = ExitMux(self.exit, session_id, hello.key_id, key, heartbeat_ms / 1000)
        log.info(
            "session open",
            extra={"fields": {"peer": self._peer(), "key": hello.key_id}},
        )
        self._start_carrier(mux, hello, nonce)
        return False

    def _on_join(self, hello: hl.Hello) -> bool:
        """A further carrier of a session, or a resume after its carriers died."""
        relay_exit = self.exit
        mux = relay_exit.sessions.get(hello.session_id)
        if mux is None or mux.ended:
            result = "expired" if relay_exit.was_expired(hello.session_id) else "unknown"
            self.metrics.resumes.labels(result).inc()
            return self._hello_refused(hello, hl.UNKNOWN_SESSION, f"resume-{result}")
        if mux.key_id != hello.key_id or not hl.verify_hello(hello, mux.key):
            self.metrics.resumes.labels("bad-auth").inc()
            return self._hello_refused(hello, hl.BAD_AUTH, "resume-bad-mac")
        now_ms = int(time.time() * 1000)
        status = relay_exit.guard.check(hello.timestamp_ms, hello.nonce, now_ms)
        if status != hl.OK:
            reason = {hl.CLOCK_SKEW: "clock-skew", hl.REPLAY: "replay"}.get(status, "busy")
            self.metrics.resumes.labels(reason).inc()
            return self._hello_refused(hello, status, f"resume-{reason}")
        if not self._carrier_room(hello):
            return False
        nonce = os.urandom(hl.NONCE_SIZE)
        heartbeat_ms = int(mux.driver.session.heartbeat * 1000)
        self._write(
            hl.encode_reply(
                mux.key, hello.mac, hl.OK, mux.session_id, 0, heartbeat_ms, nonce, now_ms
            )
        )
        self._start_carrier(mux, hello, nonce)
        return False

    def _carrier_room(self, hello: hl.Hello) -> bool:
        full = self.exit.carrier_full(hello.key_id)
        if full is None:
            return True
        self.metrics.limit_hits.labels(full).inc()
        log.warning(
            "carrier limit reached; refusing a HELLO",
            extra={"fields": {"key": hello.key_id, "limit": full, "peer": self._peer()}},
        )
        self._hello_refused(hello, hl.BUSY, full, auth_failure=False)
        return False

    def _start_carrier(self, mux: ExitMux, hello: hl.Hello, exit_nonce: bytes) -> None:
        """The HELLO is answered: from here on the connection is one of ``mux``'s carriers."""
        self.key_id = hello.key_id
        self.metrics.carrier_handshake.observe(time.monotonic() - self.started)
        self._end_handshake()
        self._flush()  # the method choice and the HELLO reply, in one segment
        self.exit.carrier_started(hello.key_id)
        self.mux = mux
        self.cid = mux.join(self, hello.nonce, exit_nonce)
        early = self.socks.trailing()
        if early and self.mux is not None:
            self.mux.driver.link_data(self.cid, early)

    def _hand_off(self, hello: hl.Hello, kind: int) -> bool:
        """Pass the connection to the sibling that owns this HELLO; False if it is ours."""
        group = self.exit.group
        if group is None or self._raw is None or self.transport is None:
            return False
        target = group.owner(hello.is_resume, hello.nonce, hello.session_id)
        if target == group.index:
            self._raw = None
            return False
        data, self._raw = bytes(self._raw), None
        transport = self.transport
        self._corked = None  # the owner answers the greeting again, unless it was sent
        self._end_handshake()
        transport.pause_reading()
        self.closed = True
        if isinstance(transport, TlsLink):
            # TLS stays here; the owner gets the plaintext over a local socket pair.
            ours, theirs = socket.socketpair()
            sent = group.send(target, kind, self._sent, data, theirs.fileno())
            theirs.close()
            if sent:
                relays = self.exit.tls_relays
                self.exit.connections.discard(self)
                relay = PlaintextRelay(transport, ours, lambda: relays.discard(relay))
                relays.add(relay)
            else:
                ours.close()
                transport.abort()
        else:
            sock = transport_socket(transport)
            if sock is not None:
                group.send(target, kind, self._sent, data, sock.fileno())
            # Our descriptor goes; the connection lives on in the owner (or, if the handoff
            # failed, it closes here and the failure is counted).
            transport.abort()
        log.debug(
            "handed off",
            extra={"fields": {"to": target, "kind": ho.KIND_NAMES[kind], "peer": self._peer()}},
        )
        return True

    def _hello_refused(
        self, hello: hl.Hello, status: int, reason: str, auth_failure: bool = True
    ) -> bool:
        """Answer the HELLO with a failure and close; a limit (``auth_failure`` False) is
        counted in relay_limit_hits_total only, as the HELLO itself was good."""
        if auth_failure:
            self.metrics.auth_failures.labels(reason).inc()
        log.info(
            "HELLO refused",
            extra={"fields": {"peer": self._peer(), "key": hello.key_id, "reason": reason}},
        )
        self.socks.subnegotiation_done(False)
        self._close_with(hl.encode_reply(None, hello.mac, status))
        return False

    def _refuse_plain(self, code: int, result: str, request: s5.Request, why: str = "") -> None:
        self.metrics.streams.labels(result).inc()
        log.info(
            "stream refused",
            extra={
                "fields": {
                    "peer": self._peer(),
                    "key": self.key_id,
                    "dest": format_hostport(request.host, request.port),
                    "result": result,
                    "reason": why or s5.REPLY_NAMES.get(code, ""),
                }
            },
        )
        self._close_with(self.socks.reply(code))

    async def _connect_plain_guarded(self, request: s5.Request) -> None:
        relay_exit = self.exit
        full = relay_exit.reserve_stream(self.key_id)
        if full is not None:
            self.metrics.limit_hits.labels(full).inc()
            self._refuse_plain(s5.GENERAL_FAILURE, "limit", request, "too many streams")
            return
        slot = True
        try:
            slot = not await self._connect_plain(request)
        except Exception:
            log.exception("stream set-up failed", extra={"fields": {"peer": self._peer()}})
            self.metrics.streams.labels("error").inc()
            self._end_handshake()
            self.abort()
        finally:
            if slot:
                relay_exit.release_stream(self.key_id)

    async def _connect_plain(self, request: s5.Request) -> bool:
        """A plain SOCKS5 client's CONNECT (``allow_plain``): relayed raw. True if started."""
        relay_exit = self.exit
        settings = relay_exit.settings
        try:
            addresses = await resolve(
                settings.policy,
                relay_exit.metrics,
                settings.connect_timeout,
                request.host,
                request.port,
                request.atyp,
            )
        except Refusal as refusal:
            if not self.closed:
                self._refuse_plain(refusal.code, refusal.reason, request, refusal.why)
            return False
        dest, error = None, None
        loop = asyncio.get_running_loop()
        for address in addresses:
            try:
                dest = await asyncio.wait_for(
                    loop.create_connection(PlainProtocol, address, request.port),
                    settings.connect_timeout,
                )
                break
            except (OSError, asyncio.TimeoutError) as exc:
                error = exc
        if self.closed:
            if dest is not None:
                dest[0].close()
            return False
        if dest is None:
            code, why = connect_error(error)
            self._refuse_plain(code, "connect-failed", request, why)
            return False
        transport, protocol = dest
        set_keepalive(transport_socket(transport), settings.tcp_keepalive)
        set_nodelay(transport_socket(transport))
        bound = transport.get_extra_info("sockname") or ("0.0.0.0", 0)
        assert self.transport is not None
        self._write(self.socks.reply(s5.SUCCEEDED, str(bound[0]), int(bound[1])))
        self._flush()
        self.metrics.handshake.observe(time.monotonic() - self.started)
        self._end_handshake()
        early = self.socks.trailing()
        info = StreamInfo(
            os.urandom(4).hex(), format_hostport(request.host, request.port), self.key_id
        )
        relay_exit.stream_started()
        raw = RawPump(info, self.metrics, on_done=relay_exit.stream_done)
        relay_exit.pumps.add(raw)
        if early:
            transport.write(early)
            info.up += len(early)
        self._task = None
        raw.attach(self, protocol)
        if self.transport is not None:
            self.transport.resume_reading()
        return True
