"""Byte pumps between two transports, with back-pressure through the transports themselves.

:class:`TunnelPump` joins a plain TCP side (the application at the worker, the destination at
the exit) to a carrier that speaks the framed tunnel protocol. :class:`RawPump` joins two plain
sides (the exit's plain SOCKS5 mode, the worker's upstream mode). Both are driven by protocol
callbacks only: no coroutine per chunk, no copies beyond what framing needs. Either side may
deliver bytes before the other side exists; they are held and the early side stops reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Callable, Optional

from relay.metrics import Metrics
from relay.proto import ProtocolError
from relay.proto import frames as fr
from relay.proto.stream import Rtt, TunnelStream
from relay.sockopts import abort_with_reset

log = logging.getLogger("relay.stream")

# Reasons a stream ends; also the ``result`` label of relay_streams_total.
OK = "ok"
RESET = "reset"
RESUME_FAILED = "resume-failed"
PARK_EXPIRED = "park-expired"
PEER_RESET = "peer-reset"
CARRIER_LOST = "carrier-lost"
HEARTBEAT_TIMEOUT = "heartbeat-timeout"
PROTOCOL_ERROR = "protocol-error"
SHUTDOWN = "shutdown"

REFUSED = "refused"

UNCONFIRMED_BYTES = 64 * 1024
"""What an optimistic stream sends before the exit has confirmed its CONNECT: enough for a
request line or a TLS ClientHello, and well inside the exit's limit on bytes that may arrive
before a stream starts."""

_RST_RESULT = {
    fr.RST_PEER_RESET: PEER_RESET,
    fr.RST_PROTOCOL: PROTOCOL_ERROR,
    fr.RST_TIMEOUT: HEARTBEAT_TIMEOUT,
    fr.RST_SHUTDOWN: SHUTDOWN,
    fr.RST_UNKNOWN_SESSION: CARRIER_LOST,
}


class PlainProtocol(asyncio.Protocol):
    """The plain TCP side of a pump (application or destination socket)."""

    def __init__(self, pump: Optional[Any] = None) -> None:
        self.pump = pump
        self.transport: Optional[asyncio.Transport] = None
        self.closed = False
        self._early: list[bytes] = []
        self._early_eof = False
        self._early_lost: Optional[tuple[Optional[Exception]]] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def attach(self, pump: Any) -> None:
        """Hand over to ``pump``, replaying anything that arrived before it existed."""
        self.pump = pump
        early, self._early = self._early, []
        for data in early:
            pump.plain_data(data)
        if self._early_eof:
            pump.plain_eof()
        if self._early_lost is not None:
            pump.plain_lost(self._early_lost[0])

    def data_received(self, data: bytes) -> None:
        if self.pump is None:
            # uvloop may deliver data even after pause_reading(); keep it, in order.
            self._early.append(data)
            if self.transport is not None:
                self.transport.pause_reading()
            return
        self.pump.plain_data(data)

    def eof_received(self) -> bool:
        if self.pump is None:
            self._early_eof = True
            return True
        return self.pump.plain_eof()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.closed = True
        if self.pump is None:
            self._early_lost = (exc,)
            return
        self.pump.plain_lost(exc)

    def pause_writing(self) -> None:
        if self.pump is not None:
            self.pump.plain_pause_writing()

    def resume_writing(self) -> None:
        if self.pump is not None:
            self.pump.plain_resume_writing()


class StreamInfo:
    """What a stream close log line and its metrics say."""

    __slots__ = ("destination", "down", "key_id", "started", "stream_id", "up")

    def __init__(self, stream_id: str, destination: str, key_id: str = "") -> None:
        self.stream_id = stream_id
        self.destination = destination
        self.key_id = key_id
        self.started = time.monotonic()
        self.up = 0
        self.down = 0

    def log_resumed(self, gap: float, replayed: int, received: int, **extra: object) -> None:
        """The line per resume: how long the stream had no carrier and what was sent again."""
        fields = {
            "stream": self.stream_id,
            "key": self.key_id,
            "dest": self.destination,
            "gap": round(gap, 3),
            "replayed": replayed,
            "received": received,
        }
        fields.update(extra)
        log.info("stream resumed", extra={"fields": fields})

    def log_end(self, result: str, reason: str) -> None:
        """The one line per stream an operator greps for."""
        log.info(
            "stream closed",
            extra={
                "fields": {
                    "stream": self.stream_id,
                    "key": self.key_id,
                    "dest": self.destination,
                    "up": self.up,
                    "down": self.down,
                    "duration": round(time.monotonic() - self.started, 3),
                    "result": result,
                    "reason": reason,
                }
            },
        )


class _Pausable:
    """Pause a transport's reading for several independent reasons, resume when none remain."""

    __slots__ = ("reasons", "target")

    def __init__(self) -> None:
        self.target: Any = None
        self.reasons: set[str] = set()

    def pause(self, reason: str) -> None:
        if not self.reasons and self.target is not None:
            self.target.pause_reading()
        self.reasons.add(reason)

    def resume(self, reason: str) -> None:
        if reason in self.reasons:
            self.reasons.discard(reason)
            if not self.reasons and self.target is not None:
                self.target.resume_reading()


class ReplayTally:
    """Unacknowledged bytes of every stream of a daemon, kept as they change, so a budget
    over all replay buffers costs nothing per check however many streams are idle."""

    __slots__ = ("bytes",)

    def __init__(self) -> None:
        self.bytes = 0


class TunnelPump:
    """Plain TCP <-> framed tunnel carrier for one stream; owns the stream's lifetime."""

    def __init__(
        self,
        stream: TunnelStream,
        info: StreamInfo,
        metrics: Metrics,
        *,
        plain_is_client: bool,
        on_done: Optional[Callable[[TunnelPump, str], None]] = None,
        on_carrier_lost: Optional[Callable[[TunnelPump, str], bool]] = None,
        unconfirmed_limit: Optional[int] = None,
        tally: Optional[ReplayTally] = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self._tally = tally
        self._tallied = 0
        self.stream = stream
        self.info = info
        self.metrics = metrics
        self.plain: Optional[asyncio.Transport] = None
        self.carrier: Any = None
        self._up_from_plain = plain_is_client
        self._on_done = on_done
        self._on_carrier_lost = on_carrier_lost
        self._plain_reading = _Pausable()
        self._carrier_reading = _Pausable()
        self._plain_eof_seen = False
        self._plain_eof_written = False
        self._replay_reported = 0
        self._timer: Optional[asyncio.TimerHandle] = None
        self._sent_unflushed = 0
        self._recv_unflushed = 0
        self.done: Optional[str] = None
        self._unconfirmed_limit = unconfirmed_limit
        """Set while the exit has not confirmed the stream: reading stops at this offset."""
        self._out: list[Any] = []
        """Payloads for the plain side, written together once the current callback is over."""
        metrics.streams_active.inc()

    # -- wiring ---------------------------------------------------------------------------
    def attach_plain(self, protocol: PlainProtocol) -> None:
        assert protocol.transport is not None
        self.plain = protocol.transport
        self._plain_reading.target = self.plain
        self._plain_reading.reasons.clear()
        protocol.attach(self)
        if self.done is None and self.plain is not None:
            self.plain.resume_reading()
            if self._plain_reading.reasons:
                self.plain.pause_reading()

    def attach_carrier(
        self, carrier: Any, early: bytes = b"", peer_offset: int = 0, preface: bytes = b""
    ) -> int:
        """Start the data phase on ``carrier``, or continue it there after a resume.

        Everything the peer has not received (it told us ``peer_offset`` in its HELLO) is
        sent again first, FIN included, in one write with ``preface`` (the handshake answer
        still to be sent). Returns the number of bytes replayed.
        """
        if self.done is not None:
            return 0
        stream = self.stream
        try:
            pieces = stream.resume(peer_offset, self.loop.time())
        except ProtocolError as exc:
            self.metrics.protocol_errors.labels("resume").inc()
            self._set_carrier(carrier)
            self._reset_carrier(fr.RST_PROTOCOL, str(exc))
            self._reset_plain()
            self._finish(PROTOCOL_ERROR, str(exc))
            return 0
        self._set_carrier(carrier)
        self._carrier_reading.target = carrier
        self._count_replay()
        if preface:
            pieces.insert(0, preface)
        if pieces and not self._send(pieces):
            return 0
        self._plain_reading.resume("carrier-full")
        if stream.window > 0:
            self._plain_reading.resume("window")
        self._schedule()
        replayed = stream.send_offset - peer_offset
        if early:
            self.carrier_data(early)
        # Only now read on: resuming may hand over bytes the carrier queued, which must come
        # after ``early``. A full application side stays a reason not to read.
        if self.carrier is carrier:
            if self._carrier_reading.reasons:
                carrier.pause_reading()
            else:
                carrier.resume_reading()
        return replayed

    def carrier_confirmed(self, held: bytes = b"") -> None:
        """The exit accepted the stream this pump already sends on (optimistic data).

        ``held`` is what arrived behind the CONNECT reply; the carrier reads on after it.
        """
        self._unconfirmed_limit = None
        if self.done is not None:
            return
        self._plain_reading.resume("unconfirmed")
        if held:
            self.carrier_data(held)
        carrier = self.carrier
        if carrier is not None and self.done is None:
            if self._carrier_reading.reasons:
                carrier.pause_reading()
            else:
                carrier.resume_reading()

    def detach_carrier(self) -> None:
        """Let go of a carrier whose handshake failed; every byte stays in the replay buffer
        for the next carrier, which sends it again from offset 0."""
        self._cancel_timer()
        self._set_carrier(None)
        self._carrier_reading.target = None

    def _count_replay(self) -> None:
        """Bring the daemon's replay tally up to date with this stream's buffer."""
        tally = self._tally
        if tally is not None:
            now = 0 if self.done is not None else self.stream.replay_bytes
            tally.bytes += now - self._tallied
            self._tallied = now

    # -- plain side -----------------------------------------------------------------------
    def plain_data(self, data: bytes) -> None:
        if self.done is not None:
            return
        stream = self.stream
        # Without a carrier (between carriers) the bytes only go to the replay buffer; the
        # next carrier sends them. Either way a full buffer stops reading the source.
        pieces = stream.send(data, self.loop.time())
        self._sent_unflushed += len(data)
        self._count_replay()
        if self.carrier is not None and not self._send(pieces):
            return
        if stream.window <= 0:
            self._plain_reading.pause("window")
        limit = self._unconfirmed_limit
        if limit is not None and stream.send_offset >= limit:
            self._plain_reading.pause("unconfirmed")

    def plain_eof(self) -> bool:
        self._plain_eof_seen = True
        if self.done is None:
            fin = self.stream.send_fin(self.loop.time())
            if self.carrier is not None and self._send((fin,)):
                self._maybe_finish()
        return True

    def plain_lost(self, exc: Optional[Exception]) -> None:
        self.plain = None
        if self.done is not None:
            return
        if exc is None and self._plain_eof_seen and self.stream.fin_received:
            self._maybe_finish()
            return
        reason = "closed" if exc is None else _describe(exc)
        self._reset_carrier(fr.RST_PEER_RESET, reason)
        self._finish(PEER_RESET if exc is not None else RESET, reason)

    def hold_source(self, held: bool) -> None:
        """Stop (or resume) reading the plain side for a daemon-wide reason: the exit's
        memory budget (``--max-buffered``). Bytes already read are still sent."""
        if held:
            self._plain_reading.pause("budget")
        else:
            self._plain_reading.resume("budget")

    def plain_pause_writing(self) -> None:
        self._carrier_reading.pause("plain-full")

    def plain_resume_writing(self) -> None:
        self._carrier_reading.resume("plain-full")

    # -- carrier side ---------------------------------------------------------------------
    def carrier_data(self, data: bytes) -> None:
        if self.done is not None:
            return
        stream = self.stream
        try:
            events, reply = stream.receive(data, self.loop.time())
        except ProtocolError as exc:
            self.metrics.protocol_errors.labels("data").inc()
            self._reset_carrier(fr.RST_PROTOCOL, str(exc))
            self._reset_plain()
            self._finish(PROTOCOL_ERROR, str(exc))
            return
        plain = self.plain
        for event in events:
            kind = type(event)
            if kind is fr.Data:
                if plain is not None:
                    if not self._out:
                        self.loop.call_soon(self._write_out)
                    self._out.append(event.payload)  # type: ignore[union-attr]
                self._recv_unflushed += len(event.payload)  # type: ignore[union-attr]
            elif kind is fr.Fin:
                self._write_out()
                if plain is not None and plain.can_write_eof():
                    plain.write_eof()
                self._plain_eof_written = True
            elif kind is fr.Reset:
                self._reset_plain()
                self._close_carrier()
                code, text = event  # type: ignore[misc]
                self._finish(_RST_RESULT.get(code, RESET), text or fr.RST_CODE_NAMES.get(code, ""))
                return
            elif kind is Rtt:
                self.metrics.heartbeat_rtt.observe(event.seconds)  # type: ignore[union-attr]
            elif stream.window > 0:
                self._plain_reading.resume("window")
        self._count_replay()
        if reply and self.carrier is not None and not self._send((reply,)):
            return
        self._maybe_finish()

    def _write_out(self) -> None:
        """One writelines() for the payloads of many SSH packets: fewer send() calls."""
        out, self._out = self._out, []
        if out and self.plain is not None:
            self.plain.writelines(out)

    def carrier_lost(self, why: str, carrier: Any = None) -> None:
        """The carrier closed or failed; clean if the stream already finished, else a loss.

        ``carrier`` names the one that was lost, so news from a carrier already replaced
        by a resume is ignored.
        """
        if self.done is not None or self.carrier is None:
            return
        if carrier is not None and carrier is not self.carrier:
            return
        self._set_carrier(None)
        self._carrier_gone(why)

    def _carrier_gone(self, why: str) -> None:
        self._cancel_timer()
        if self.stream.finished:
            self._finish(OK, "")
            return
        if self._on_carrier_lost is not None and self._on_carrier_lost(self, why):
            return
        self._reset_plain()
        self._finish(CARRIER_LOST, why)

    def abandon(self, result: str, why: str) -> None:
        """Give up a stream whose carrier is gone for good: the application sees a reset."""
        if self.done is None:
            self._close_carrier(abort=True)
            self._reset_plain()
            self._finish(result, why)

    def _send(self, pieces: Any) -> bool:
        """Write to the carrier; a carrier that refuses (already closed) counts as lost.

        The bytes are in the replay buffer either way, so nothing is lost with it.
        """
        try:
            self.carrier.writelines(pieces)
        except (OSError, RuntimeError) as exc:
            self.carrier_lost(f"carrier write failed: {exc}")
            return False
        return True

    def carrier_pause_writing(self) -> None:
        self._plain_reading.pause("carrier-full")

    def carrier_resume_writing(self) -> None:
        self._plain_reading.resume("carrier-full")

    # -- time -----------------------------------------------------------------------------
    def _schedule(self) -> None:
        self._cancel_timer()
        self._timer = self.loop.call_at(self.stream.wake_at(self.loop.time()), self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if self.done is not None or self.carrier is None:
            return
        self._flush_counters()
        now = self.loop.time()
        if self.stream.is_dead(now):
            silent = now - self.stream.last_recv
            self._close_carrier(abort=True)
            self._carrier_gone(f"no frame for {silent:.1f}s (heartbeat timeout)")
            return
        out = self.stream.poll(now)
        if out and not self._send((out,)):
            return
        self._schedule()

    # -- ending ---------------------------------------------------------------------------
    def _maybe_finish(self) -> None:
        stream = self.stream
        if self._plain_eof_seen and self._plain_eof_written and self.plain is not None:
            self._write_out()
            self.plain.close()
        if stream.finished and self.carrier is not None:
            self._close_carrier()
            self._finish(OK, "")

    def _reset_plain(self) -> None:
        self._out.clear()
        if self.plain is not None:
            abort_with_reset(self.plain)
            self.plain = None

    def _reset_carrier(self, code: int, reason: str) -> None:
        if self.carrier is not None:
            with contextlib.suppress(OSError, RuntimeError):
                self.carrier.write(self.stream.send_reset(code, reason))
            self._close_carrier()

    def _set_carrier(self, carrier: Any) -> None:
        if (carrier is None) != (self.carrier is None):
            self.metrics.carriers_active.inc(1 if carrier is not None else -1)
        self.carrier = carrier

    def _close_carrier(self, abort: bool = False) -> None:
        carrier = self.carrier
        self._set_carrier(None)
        if carrier is not None:
            with contextlib.suppress(OSError, RuntimeError):
                carrier.abort() if abort else carrier.close()

    def shutdown(self, reason: str = "shutdown") -> None:
        """Reset both sides now (daemon stopping or key revoked)."""
        if self.done is None:
            self._reset_carrier(fr.RST_SHUTDOWN, reason)
            self._reset_plain()
            self._finish(SHUTDOWN, reason)

    def _flush_counters(self) -> None:
        replay = 0 if self.done is not None else self.stream.replay_bytes
        if replay != self._replay_reported:
            self.metrics.replay_bytes.inc(replay - self._replay_reported)
            self._replay_reported = replay
        sent, recv = self._sent_unflushed, self._recv_unflushed
        self._sent_unflushed = self._recv_unflushed = 0
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
        self._cancel_timer()
        self._flush_counters()
        self._count_replay()
        if self.plain is not None and result == OK:
            self._write_out()
            self.plain.close()
        self.metrics.streams_active.dec()
        self.metrics.streams.labels(result).inc()
        self.info.log_end(result, reason)
        if self._on_done is not None:
            self._on_done(self, result)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


class RawPump:
    """Plain <-> plain byte relay with half-close in both directions and resets passed on."""

    def __init__(
        self,
        info: StreamInfo,
        metrics: Metrics,
        on_done: Optional[Callable[[RawPump, str], None]] = None,
    ) -> None:
        self.info = info
        self.metrics = metrics
        self.sides: list[Optional[asyncio.Transport]] = [None, None]
        self._reading = [_Pausable(), _Pausable()]
        self._eof = [False, False]
        self._on_done = on_done
        self.done: Optional[str] = None
        metrics.streams_active.inc()

    def attach(self, client: PlainProtocol, upstream: PlainProtocol) -> None:
        for index, proto in enumerate((client, upstream)):
            assert proto.transport is not None
            self.sides[index] = proto.transport
            self._reading[index].target = proto.transport
        client.attach(_RawSide(self, 0))
        upstream.attach(_RawSide(self, 1))
        for transport in self.sides:
            if transport is not None and self.done is None:
                transport.resume_reading()

    def data(self, index: int, data: bytes) -> None:
        other = self.sides[1 - index]
        if other is None:
            return
        other.write(data)
        if index == 0:
            self.info.up += len(data)
        else:
            self.info.down += len(data)

    def eof(self, index: int) -> bool:
        self._eof[index] = True
        other = self.sides[1 - index]
        if other is not None and other.can_write_eof():
            other.write_eof()
        if all(self._eof):
            self._end(OK, "")
        return True

    def lost(self, index: int, exc: Optional[Exception]) -> None:
        self.sides[index] = None
        if self.done is not None:
            return
        if exc is None and all(self._eof):
            self._end(OK, "")
            return
        abort_with_reset(self.sides[1 - index])
        self.sides[1 - index] = None
        self._end(PEER_RESET if exc is not None else RESET, _describe(exc) if exc else "closed")

    def pause(self, index: int) -> None:
        self._reading[1 - index].pause("full")

    def resume(self, index: int) -> None:
        self._reading[1 - index].resume("full")

    def _end(self, result: str, reason: str) -> None:
        if self.done is not None:
            return
        self.done = result
        for transport in self.sides:
            if transport is not None:
                transport.close()
        self.metrics.streams_active.dec()
        self.metrics.streams.labels(result).inc()
        self.metrics.bytes.labels("up").inc(self.info.up)
        self.metrics.bytes.labels("down").inc(self.info.down)
        self.info.log_end(result, reason)
        if self._on_done is not None:
            self._on_done(self, result)


class _RawSide:
    """Routes one side's PlainProtocol callbacks into a RawPump with its index."""

    __slots__ = ("index", "pump")

    def __init__(self, pump: RawPump, index: int) -> None:
        self.pump = pump
        self.index = index

    def plain_data(self, data: bytes) -> None:
        self.pump.data(self.index, data)

    def plain_eof(self) -> bool:
        return self.pump.eof(self.index)

    def plain_lost(self, exc: Optional[Exception]) -> None:
        self.pump.lost(self.index, exc)

    def plain_pause_writing(self) -> None:
        self.pump.pause(self.index)

    def plain_resume_writing(self) -> None:
        self.pump.resume(self.index)
