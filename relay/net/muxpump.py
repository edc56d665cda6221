"""Asyncio glue around a v2 session (relay.proto.session): carriers in, streams out.

:class:`MuxDriver` feeds carrier bytes to the session, writes what the session has to send
when the carrier can take it (never more than a small budget ahead, so the fair scheduler and
not a buffer decides the order), runs the heartbeat timer and hands stream events to each
stream's :class:`MuxPump`. :class:`MuxPump` joins one plain TCP side (the application at the
worker, the destination at the exit) to its stream. Both are driven by protocol callbacks
only: no coroutine per chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Callable, Optional

from relay.metrics import Metrics
from relay.net.pump import (
    CARRIER_LOST,
    OK,
    PEER_RESET,
    PROTOCOL_ERROR,
    REFUSED,
    RESET,
    SHUTDOWN,
    PlainProtocol,
    StreamInfo,
    _describe,
    _Pausable,
)
from relay.net.sockopts import QUICKACK_BELOW, abort_with_reset
from relay.proto import ProtocolError, mux
from relay.proto import session as ms

log = logging.getLogger("relay.stream")

FLUSH_BUDGET = 64 * 1024
"""Bytes handed to a carrier per write while it accepts more: small, so that a stream that
becomes ready is scheduled within about one budget of the bulk streams already queued."""

_RST_RESULT = {
    mux.RST_PEER_RESET: PEER_RESET,
    mux.RST_PROTOCOL: PROTOCOL_ERROR,
    mux.RST_SHUTDOWN: SHUTDOWN,
    mux.RST_UNKNOWN_STREAM: CARRIER_LOST,
    mux.RST_LIMIT: REFUSED,
    mux.RST_REFUSED: REFUSED,
}


def _last_stream(events: list[ms.Event]) -> int:
    """The stream of the last stream event of a read (0: none, e.g. only a PONG)."""
    for event in reversed(events):
        sid = getattr(event, "stream", 0)
        if sid:
            return int(sid)
    return 0


class MuxPump:
    """Plain TCP side <-> one multiplexed stream; owns the stream's lifetime and logging."""

    def __init__(
        self,
        driver: MuxDriver,
        sid: int,
        info: StreamInfo,
        *,
        plain_is_client: bool,
        on_done: Optional[Callable[[MuxPump, str], None]] = None,
    ) -> None:
        self.driver = driver
        self.sid = sid
        self.info = info
        self.metrics = driver.metrics
        self.plain: Optional[asyncio.Transport] = None
        self._up_from_plain = plain_is_client
        self._on_done = on_done
        self._reading = _Pausable()
        self._eof_seen = False
        self._eof_written = False
        self._early: list[Any] = []  # bytes for a plain side not attached yet
        self._early_eof = False
        self._out: list[Any] = []
        self._sent = 0
        self._recv = 0
        self.done: Optional[str] = None
        driver.pumps[sid] = self
        self.metrics.streams_active.inc()

    # -- wiring ---------------------------------------------------------------------------
    def attach_plain(self, protocol: PlainProtocol) -> None:
        assert protocol.transport is not None
        self.plain = protocol.transport
        self._reading.target = self.plain
        protocol.attach(self)
        if self.done is None and self.plain is not None:
            if self._early:
                early, self._early = self._early, []
                self.plain.writelines(early)
            if self._early_eof and self.plain.can_write_eof():
                self.plain.write_eof()
                self._eof_written = True
            if self._reading.reasons:
                self.plain.pause_reading()
            else:
                self.plain.resume_reading()

    # -- plain side -----------------------------------------------------------------------
    def plain_data(self, data: bytes) -> None:
        if self.done is not None:
            return
        self._sent += len(data)
        self.driver.counting.add(self)
        if self.driver.session.send(self.sid, data):
            self._reading.pause("credit")
            self.metrics.credit_stalls.inc()

    def plain_eof(self) -> bool:
        self._eof_seen = True
        if self.done is None:
            self.driver.session.send_fin(self.sid)
        return True

    def plain_lost(self, exc: Optional[Exception]) -> None:
        self.plain = None
        if self.done is not None:
            return
        if exc is None and self._eof_seen and self._eof_written:
            return  # both halves closed: the stream finishes when the FINs are acknowledged
        reason = "closed" if exc is None else _describe(exc)
        self.driver.session.reset(self.sid, mux.RST_PEER_RESET, reason)
        self._finish(PEER_RESET if exc is not None else RESET, reason)

    def plain_pause_writing(self) -> None:
        self.driver.session.hold_acks(self.sid, True)

    def plain_resume_writing(self) -> None:
        if self.done is None:
            self.driver.session.hold_acks(self.sid, False)

    def hold_source(self, held: bool) -> None:
        """Stop (or resume) reading the plain side for a daemon-wide reason (the exit's
        ``--max-buffered``)."""
        if held:
            self._reading.pause("budget")
        else:
            self._reading.resume("budget")

    # -- session events -------------------------------------------------------------------
    def on_data(self, payload: Any) -> None:
        self._recv += len(payload)
        self.driver.counting.add(self)
        if self.plain is None:
            self._early.append(payload)
            return
        if not self._out:
            self.driver.loop.call_soon(self._write_out)
        self._out.append(payload)

    def _write_out(self) -> None:
        """One writelines() for the payloads of many frames: fewer send() calls."""
        out, self._out = self._out, []
        if out and self.plain is not None:
            self.plain.writelines(out)

    def on_end(self) -> None:
        """The peer half-closed: so does the plain side, after the bytes before it."""
        self._write_out()
        if self.plain is None:
            self._early_eof = True
            return
        if self.plain.can_write_eof():
            self.plain.write_eof()
        self._eof_written = True
        if self._eof_seen:
            self.plain.close()

    def on_finished(self) -> None:
        self._finish(OK, "")

    def on_reset(self, code: int, reason: str) -> None:
        self._reset_plain()
        self._finish(_RST_RESULT.get(code, RESET), reason or mux.RST_CODE_NAMES.get(code, ""))

    def on_writable(self) -> None:
        self._reading.resume("credit")

    def abandon(self, result: str, why: str, code: int = mux.RST_ERROR) -> None:
        """Give the stream up: the peer gets a RST, the plain side a TCP reset."""
        if self.done is None:
            self.driver.session.reset(self.sid, code, why)
            self._reset_plain()
            self._finish(result, why)

    def discard(self) -> None:
        """Drop a pump whose stream never started (refused): no count, no log line."""
        if self.done is None:
            self.done = REFUSED
            self.driver.pumps.pop(self.sid, None)
            self._early.clear()
            self.metrics.streams_active.dec()

    def shutdown(self, reason: str = "shutdown") -> None:
        self.abandon(SHUTDOWN, reason, mux.RST_SHUTDOWN)

    # -- ending ---------------------------------------------------------------------------
    def _reset_plain(self) -> None:
        self._out.clear()
        self._early.clear()
        if self.plain is not None:
            abort_with_reset(self.plain)
            self.plain = None

    def flush_counters(self) -> None:
        sent, recv = self._sent, self._recv
        self._sent = self._recv = 0
        up, down = (sent, recv) if self._up_from_plain else (recv, sent)
        if up:
            self.metrics.bytes.labels("up").inc(up)
        if down:
            self.metrics.bytes.labels("down").inc(down)
        self.info.up += up
        self.info.down += down

    def _finish(self, result: str, reason: str) -> None:
        if self.done is not None:
            return
        self.done = result
        self.driver.pumps.pop(self.sid, None)
        self.flush_counters()
        if self.plain is not None and result == OK:
            self._write_out()
            self.plain.close()
        self.metrics.streams_active.dec()
        self.metrics.streams.labels(result).inc()
        self.info.log_end(result, reason)
        if self._on_done is not None:
            self._on_done(self, result)


class Link:
    """What the driver needs of a carrier's transport (SSH channel, TCP or TLS)."""

    def writelines(self, data: Any) -> None: ...  # pragma: no cover

    def abort(self) -> None: ...  # pragma: no cover


class MuxDriver:
    """One session's carriers and streams, on the event loop."""

    def __init__(
        self,
        session: ms.Session,
        metrics: Metrics,
        *,
        on_open: Optional[Callable[[int, bytes], None]] = None,
        on_answer: Optional[Callable[[int, int, bytes], None]] = None,
        on_link_lost: Optional[Callable[[int, str], None]] = None,
        on_draining: Optional[Callable[[str], None]] = None,
        on_resumed: Optional[Callable[[int, int], None]] = None,
        on_rtt: Optional[Callable[[int, float], None]] = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.session = session
        self.metrics = metrics
        self.links: dict[int, Any] = {}
        self.pumps: dict[int, MuxPump] = {}
        self.counting: set[MuxPump] = set()
        """Pumps that moved bytes since the last tick: only they flush their counters."""
        self._paused: set[int] = set()
        self._dirty: set[int] = set()
        self._ack_small: set[int] = set()
        self._nudge: dict[int, int] = {}
        """Carrier -> stream to ACK if the carrier has nothing else to send (add_link)."""
        self._flush_handle: Optional[asyncio.Handle] = None
        self._timer: Optional[asyncio.TimerHandle] = None
        self._on_open = on_open
        self._on_answer = on_answer
        self._on_link_lost = on_link_lost
        self._on_draining = on_draining
        self._on_resumed = on_resumed
        self._on_rtt = on_rtt
        self.closed = False
        self.moved = 0
        """Streams the carrier dropped last had (moved on, or waiting for a carrier)."""
        session.on_output = self._want
        self._frames_in = 0
        self._frames_out = 0
        self._stalls = 0

    @classmethod
    def new_session(
        cls,
        role: str,
        metrics: Metrics,
        *,
        heartbeat: float,
        misses: int,
        window: int,
        resume_timeout: float,
        **callbacks: Any,
    ) -> MuxDriver:
        """A driver for a fresh session of ``role`` (ms.WORKER or ms.EXIT): credit window
        ``window``, streams remembered for ``resume_timeout`` after they end."""
        session = ms.Session(
            role,
            heartbeat=heartbeat,
            now=asyncio.get_running_loop().time(),
            misses=misses,
            window=window,
            tombstone_ttl=resume_timeout,
        )
        return cls(session, metrics, **callbacks)

    # -- carriers -------------------------------------------------------------------------
    def add_link(
        self,
        cid: int,
        link: Any,
        sealer: Any,
        unsealer: Any,
        early: bytes,
        *,
        ack_small_reads: bool = False,
    ) -> None:
        """A carrier joined the session; ``early`` is what it received after the HELLO.

        ``ack_small_reads``: answer a small read that leaves nothing else to send with an
        ACK frame (Session.ack_now), for carriers that are the forward of an ssh process
        whose socket the worker cannot acknowledge on itself (OpenSshConnection.acknowledge);
        the frame takes the TCP acknowledgement to the login node, whose sshd (without
        TCP_NODELAY) would otherwise hold its next small packet until a delayed ACK."""
        self.links[cid] = link
        if ack_small_reads:
            self._ack_small.add(cid)
        self.session.add_carrier(cid, sealer, unsealer, self.loop.time())
        self.metrics.carriers_active.inc()
        self._schedule_tick()
        if early:
            self.link_data(cid, early)
        self._want(cid)

    def link_data(self, cid: int, data: bytes) -> None:
        if cid not in self.links:
            return
        try:
            events = self.session.receive(cid, data, self.loop.time())
        except ProtocolError as exc:
            self.metrics.protocol_errors.labels("carrier").inc()
            log.warning(
                "carrier broke the protocol; closing it",
                extra={"fields": {"carrier": cid, "why": str(exc)}},
            )
            self.drop_link(cid, f"protocol error: {exc}", abort=True)
            return
        if events:
            self._dispatch(events)
            if cid in self._ack_small and len(data) < QUICKACK_BELOW:
                sid = _last_stream(events)
                if sid:
                    self._nudge[cid] = sid
                    self._want(cid)

    def drop_link(self, cid: int, why: str, abort: bool = False) -> None:
        """The carrier is gone (closed, failed or declared dead); its streams move on."""
        link = self.links.pop(cid, None)
        if link is None:
            return
        self._paused.discard(cid)
        self._ack_small.discard(cid)
        self._nudge.pop(cid, None)
        self.metrics.carriers_active.dec()
        if abort:
            with contextlib.suppress(OSError, RuntimeError):
                link.abort()
        self.moved = len(self.session.remove_carrier(cid, self.loop.time()))
        if self._on_link_lost is not None:
            self._on_link_lost(cid, why)

    def pause_link(self, cid: int) -> None:
        self._paused.add(cid)

    def resume_link(self, cid: int) -> None:
        self._paused.discard(cid)
        self._want(cid)

    # -- output ---------------------------------------------------------------------------
    def _want(self, cid: int) -> None:
        self._dirty.add(cid)
        if self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        dirty, self._dirty = self._dirty, set()
        for cid in dirty:
            self._write(cid)

    def _write(self, cid: int) -> None:
        link = self.links.get(cid)
        if link is None:
            return
        now = self.loop.time()
        session = self.session
        paused = self._paused
        nudge = self._nudge.pop(cid, 0)
        while cid not in paused:
            pieces = session.output(cid, now, FLUSH_BUDGET)
            if not pieces:
                if nudge and session.ack_now(nudge):
                    nudge = 0
                    continue
                break
            nudge = 0
            try:
                link.writelines(pieces)
            except (OSError, RuntimeError) as exc:
                self.drop_link(cid, f"carrier write failed: {exc}", abort=True)
                return
            if cid not in self.links:
                return

    def flush_now(self) -> None:
        """Write what is due at once (before closing carriers)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush()

    # -- events ---------------------------------------------------------------------------
    def _dispatch(self, events: list[ms.Event]) -> None:
        pumps = self.pumps
        event: Any
        for event in events:
            kind = type(event)
            if kind is ms.Received:
                pump = pumps.get(event.stream)
                if pump is not None:
                    pump.on_data(event.payload)
            elif kind is ms.Writable:
                pump = pumps.get(event.stream)
                if pump is not None:
                    pump.on_writable()
            elif kind is ms.Ended:
                pump = pumps.get(event.stream)
                if pump is not None:
                    pump.on_end()
            elif kind is ms.Finished:
                pump = pumps.get(event.stream)
                if pump is not None:
                    pump.on_finished()
            elif kind is ms.Reset:
                pump = pumps.get(event.stream)
                if pump is not None:
                    pump.on_reset(event.code, event.reason)
            elif kind is ms.Opened:
                if self._on_open is not None:
                    self._on_open(event.stream, event.address)
            elif kind is ms.Answered:
                if self._on_answer is not None:
                    self._on_answer(event.stream, event.code, event.address)
            elif kind is ms.Rtt:
                self.metrics.heartbeat_rtt.observe(event.seconds)
                if self._on_rtt is not None:
                    self._on_rtt(event.carrier, event.seconds)
            elif kind is ms.Resumed:
                if self._on_resumed is not None:
                    self._on_resumed(event.stream, event.carrier)
            elif kind is ms.Draining and self._on_draining is not None:
                self._on_draining(event.reason)

    # -- time -----------------------------------------------------------------------------
    def _schedule_tick(self) -> None:
        if self._timer is None and not self.closed:
            now = self.loop.time()
            self._timer = self.loop.call_at(self.session.next_tick(now), self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self.closed:
            return
        now = self.loop.time()
        for cid in self.session.tick(now):
            silent = now - self._last_recv(cid)
            log.info(
                "carrier silent; declaring it dead",
                extra={"fields": {"carrier": cid, "silent": round(silent, 1)}},
            )
            self.drop_link(cid, f"no frame for {silent:.1f}s (heartbeat timeout)", abort=True)
        self._count()
        for carrier in self.session.carriers.values():
            self.metrics.streams_per_carrier.observe(carrier.streams)
        counting, self.counting = self.counting, set()
        for pump in counting:
            pump.flush_counters()
        if self.links or self.pumps:
            self._schedule_tick()

    def _last_recv(self, cid: int) -> float:
        carrier = self.session.carriers.get(cid)
        return carrier.last_recv if carrier is not None else self.loop.time()

    def _count(self) -> None:
        s = self.session
        m = self.metrics
        if s.frames_in != self._frames_in:
            m.frames.labels("in").inc(s.frames_in - self._frames_in)
            self._frames_in = s.frames_in
        if s.frames_out != self._frames_out:
            m.frames.labels("out").inc(s.frames_out - self._frames_out)
            self._frames_out = s.frames_out

    # -- ending ---------------------------------------------------------------------------
    def close(self, why: str, result: str = SHUTDOWN) -> None:
        """Reset every stream and close every carrier (session over)."""
        for pump in list(self.pumps.values()):
            pump.abandon(result, why, mux.RST_SHUTDOWN)
        self.flush_now()
        self.closed = True
        for cid in list(self.links):
            link = self.links.pop(cid)
            self.metrics.carriers_active.dec()
            with contextlib.suppress(OSError, RuntimeError):
                link.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._count()
