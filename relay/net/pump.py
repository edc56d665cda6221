"""The plain TCP side of every pump, the stream's log line, and the raw pump.

:class:`RawPump` joins two plain sides (the exit's plain SOCKS5 mode, the worker's upstream
mode); relay.net.muxpump joins a plain side to a multiplexed tunnel stream. Both are driven
by protocol callbacks only: no coroutine per chunk, no copies beyond what framing needs.
Either side may deliver bytes before the other side exists; they are held and the early side
stops reading.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Optional

from relay.metrics import Metrics
from relay.net.sockopts import abort_with_reset

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
