"""One worker's session at the exit: its carriers, streams and parking."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Optional, Protocol, Union

from relay.exit.destinations import Refusal, connect_error, resolve
from relay.exit.settings import ExitSettings
from relay.metrics import Metrics
from relay.net.addresses import format_hostport
from relay.net.muxpump import MuxDriver, MuxPump
from relay.net.pump import PARK_EXPIRED, PlainProtocol, RawPump, StreamInfo
from relay.net.sockopts import set_keepalive, set_nodelay, transport_socket
from relay.proto import seal
from relay.proto import session as ms
from relay.proto import socks5 as s5

log = logging.getLogger("relay.exit")


class SessionHost(Protocol):
    """What a session needs of the exit that holds it (relay.exit.daemon.RelayExit): its
    settings and metrics, the stream limits, and parking."""

    settings: ExitSettings
    metrics: Metrics
    pumps: set[Union[MuxPump, RawPump]]
    sessions: dict[bytes, ExitMux]
    over_budget: bool

    def reserve_stream(self, key_id: str) -> Optional[str]: ...
    def stream_started(self) -> None: ...
    def release_stream(self, key_id: str) -> None: ...
    def stream_done(self, pump: Union[MuxPump, RawPump], result: str) -> None: ...
    def carrier_ended(self, key_id: str) -> None: ...
    def park(self, session: ExitMux) -> bool: ...
    def unparked(self) -> None: ...
    def forget(self, session: ExitMux) -> None: ...


class CarrierConnection(Protocol):
    """What a session needs of an accepted connection that became one of its carriers
    (relay.exit.connection.ExitConnection)."""

    transport: Optional[asyncio.Transport]
    closed: bool
    mux: Optional[ExitMux]


class ExitMux:
    """One worker's session: its carriers, its multiplexed streams and its parking."""

    def __init__(
        self, relay_exit: SessionHost, session_id: bytes, key_id: str, key: bytes, heartbeat: float
    ) -> None:
        self.exit = relay_exit
        self.session_id = session_id
        self.key_id = key_id
        self.key = key
        s = relay_exit.settings
        self.driver = MuxDriver.new_session(
            ms.EXIT,
            relay_exit.metrics,
            heartbeat=heartbeat,
            misses=s.heartbeat_misses,
            window=s.replay_buffer,
            resume_timeout=s.resume_timeout,
            on_open=self._on_open,
            on_link_lost=self._link_lost,
            on_resumed=self._resumed,
        )
        self.conns: dict[int, CarrierConnection] = {}
        self._next_cid = 1
        self.parked_at: Optional[float] = None
        self._expiry: Optional[asyncio.TimerHandle] = None
        self._tasks: set[asyncio.Future[None]] = set()
        self.ended = False
        relay_exit.sessions[session_id] = self

    def join(self, conn: CarrierConnection, worker_nonce: bytes, exit_nonce: bytes) -> int:
        """A carrier joined (the first one, a further one, or a resume)."""
        assert conn.transport is not None
        cid = self._next_cid
        self._next_cid += 1
        self.conns[cid] = conn
        to_exit, to_worker = seal.derive_keys(self.key, worker_nonce, exit_nonce)
        gap = self._unpark()
        self.driver.add_link(
            cid, conn.transport, seal.Sealer(to_worker), seal.Unsealer(to_exit), b""
        )
        if gap is not None:
            log.info(
                "session resumed",
                extra={
                    "fields": {
                        "key": self.key_id,
                        "gap": round(gap, 3),
                        "streams": len(self.driver.pumps),
                    }
                },
            )
        return cid

    def _link_lost(self, cid: int, why: str) -> None:
        conn = self.conns.pop(cid, None)
        if conn is not None:
            conn.mux = None
            self.exit.carrier_ended(self.key_id)
            if conn.transport is not None and not conn.closed:
                conn.transport.abort()
        if self.conns or self.ended:
            return
        if not self.driver.pumps and not self.driver.session.streams:
            self.end("")  # nothing to come back for
            return
        if not self.exit.park(self):
            self.end("too many parked sessions")
            return
        self.parked_at = time.monotonic()
        loop = asyncio.get_running_loop()
        self._expiry = loop.call_later(self.exit.settings.resume_timeout, self._expire)
        log.info(
            "session parked",
            extra={"fields": {"key": self.key_id, "streams": len(self.driver.pumps), "why": why}},
        )

    def _unpark(self) -> Optional[float]:
        if self.parked_at is None:
            return None
        gap = time.monotonic() - self.parked_at
        self.parked_at = None
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self.exit.unparked()
        return gap

    def _expire(self) -> None:
        self._expiry = None
        self.exit.metrics.resumes.labels("expired").inc()
        timeout = self.exit.settings.resume_timeout
        self.end(f"no resume within {timeout:.0f}s", PARK_EXPIRED)

    def end(self, why: str, result: str = "shutdown") -> None:
        """The session is over: reset its streams, close its carriers."""
        if self.ended:
            return
        self.ended = True
        self._unpark()
        for task in self._tasks:
            task.cancel()
        conns = list(self.conns.values())
        self.conns.clear()
        for conn in conns:
            conn.mux = None
            self.exit.carrier_ended(self.key_id)
        self.driver.close(why or "session ended", result)
        self.exit.forget(self)

    def _resumed(self, sid: int, cid: int) -> None:
        """The worker moved a stream here from a lost carrier (one resume per stream)."""
        self.exit.metrics.resumes.labels("ok").inc()
        pump = self.driver.pumps.get(sid)
        if pump is not None:
            log.debug(
                "stream moved", extra={"fields": {"stream": pump.info.stream_id, "carrier": cid}}
            )

    # -- streams --------------------------------------------------------------------------
    def _on_open(self, sid: int, address: bytes) -> None:
        # The pump exists from now on, so that optimistic bytes arriving while the exit
        # dials are kept for the destination.
        info = StreamInfo(os.urandom(4).hex(), "?", self.key_id)
        pump = MuxPump(self.driver, sid, info, plain_is_client=False, on_done=self.exit.stream_done)
        task = asyncio.ensure_future(self._open(pump, address))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _refuse(self, pump: MuxPump, code: int, result: str, dest: str, why: str) -> None:
        pump.discard()
        sid = pump.sid
        self.exit.metrics.streams.labels(result).inc()
        log.info(
            "stream refused",
            extra={
                "fields": {
                    "key": self.key_id,
                    "dest": dest,
                    "result": result,
                    "reason": why or s5.REPLY_NAMES.get(code, ""),
                }
            },
        )
        self.driver.session.answer(sid, code)

    async def _open(self, pump: MuxPump, address: bytes) -> None:
        relay_exit = self.exit
        sid = pump.sid
        started = time.monotonic()
        settings = relay_exit.settings
        try:
            host, port, atyp = s5.decode_address(address)
        except s5.Socks5Error as exc:
            relay_exit.metrics.protocol_errors.labels("open").inc()
            self._refuse(pump, exc.reply, "bad-address", "?", str(exc))
            return
        dest_name = format_hostport(host, port)
        full = relay_exit.reserve_stream(self.key_id)
        if full is not None:
            relay_exit.metrics.limit_hits.labels(full).inc()
            why = "too many streams" if full == "streams" else "too many streams for this key"
            log.warning(
                "stream limit reached", extra={"fields": {"key": self.key_id, "limit": full}}
            )
            self._refuse(pump, s5.GENERAL_FAILURE, "limit", dest_name, why)
            return
        slot = True
        try:
            try:
                addresses = await resolve(
                    settings.policy, relay_exit.metrics, settings.connect_timeout, host, port, atyp
                )
            except Refusal as refusal:
                self._refuse(pump, refusal.code, refusal.reason, dest_name, refusal.why)
                return
            dest, error = None, None
            loop = asyncio.get_running_loop()
            for candidate in addresses:
                try:
                    dest = await asyncio.wait_for(
                        loop.create_connection(PlainProtocol, candidate, port),
                        settings.connect_timeout,
                    )
                    break
                except (OSError, asyncio.TimeoutError) as exc:
                    error = exc
            if pump.done is not None or self.ended:
                if dest is not None:
                    dest[0].close()
                pump.discard()
                return  # the worker reset the stream while we dialled
            if self.key_id not in settings.secrets:  # revoked by a reload while we connected
                if dest is not None:
                    dest[0].close()
                self._refuse(pump, s5.GENERAL_FAILURE, "revoked", dest_name, "key revoked")
                return
            if dest is None:
                code, why = connect_error(error)
                self._refuse(pump, code, "connect-failed", dest_name, why)
                return
            transport, protocol = dest
            dest_sock = transport_socket(transport)
            set_keepalive(dest_sock, settings.tcp_keepalive)
            set_nodelay(dest_sock)
            bound = transport.get_extra_info("sockname") or ("0.0.0.0", 0)
            info = pump.info
            info.destination = dest_name
            info.started = time.monotonic()
            relay_exit.pumps.add(pump)
            relay_exit.stream_started()
            slot = False
            pump.attach_plain(protocol)
            if relay_exit.over_budget:
                pump.hold_source(True)
            self.driver.session.answer(sid, s5.SUCCEEDED, s5.encode_address(*bound[:2]))
            relay_exit.metrics.handshake.observe(time.monotonic() - started)
            log.debug(
                "stream open",
                extra={"fields": {"stream": info.stream_id, "key": self.key_id, "dest": dest_name}},
            )
        finally:
            if slot:
                relay_exit.release_stream(self.key_id)
                pump.discard()
