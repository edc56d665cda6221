"""State machine of a v2 tunnel session: streams multiplexed over a few carriers, with resume.

The same class runs at both ends; ``role`` says which. It takes carrier bytes, application
bytes and the time in, and gives carrier bytes (sealed records) and stream events out. Nothing
here touches a socket or a clock.

Guarantees it keeps, whatever the peer or the carriers do:

- Every stream's bytes reach the other application exactly once and in order, or the stream
  is reset. DATA carries its offset, so bytes replayed on another carrier are deduplicated
  and a gap is a protocol error.
- A sender has at most ``window`` unacknowledged bytes per stream (credit), and the receiver
  acknowledges only what it handed to its application without back-pressure, so a stalled
  application stalls its own stream and nothing else.
- Carriers take turns between streams one DATA frame at a time (round robin), after the
  control frames, so a bulk stream delays another stream's frame by at most a frame.
- When a carrier dies the worker moves each of its streams to another carrier (SYNC, or OPEN
  again if the exit never answered) and sends again what the exit has not acknowledged; the
  exit answers with its own offset and its unacknowledged bytes. A side forgets a stream only
  once the peer knows it ended (both FINs acknowledged, or a RST answered by a RST), so a
  replayed OPEN is never taken for a new stream.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, NamedTuple, Optional, Union

from relay.proto import ProtocolError, mux

WORKER = "worker"
EXIT = "exit"

UNCONFIRMED_WINDOW = 64 * 1024
"""Credit of a stream the exit has not answered yet (optimistic data): enough for a request
or a TLS ClientHello, and little for the exit to hold while it dials."""

Chunk = Union[bytes, memoryview]


# -- events -------------------------------------------------------------------------------
class Opened(NamedTuple):
    """Exit: the worker asks for a stream to ``address`` (SOCKS5 address bytes)."""

    stream: int
    address: bytes


class Answered(NamedTuple):
    """Worker: the exit answered the OPEN; a code other than 0 ended the stream."""

    stream: int
    code: int
    address: bytes


class Received(NamedTuple):
    """Bytes for the application, each exactly once and in order."""

    stream: int
    payload: Chunk


class Ended(NamedTuple):
    """The peer half-closed the stream (FIN, after all its bytes)."""

    stream: int


class Finished(NamedTuple):
    """Both directions closed and acknowledged: the stream is over and forgotten."""

    stream: int


class Reset(NamedTuple):
    """The stream is over without a clean close; the application connection is reset."""

    stream: int
    code: int
    reason: str


class Writable(NamedTuple):
    """Credit came back: the application side may be read again."""

    stream: int


class Resumed(NamedTuple):
    """Exit: the stream continues on another carrier."""

    stream: int
    carrier: int


class Rtt(NamedTuple):
    carrier: int
    seconds: float


class Draining(NamedTuple):
    """Worker: the exit asked for no new streams on this session (GOAWAY)."""

    reason: str


Event = Union[Opened, Answered, Received, Ended, Finished, Reset, Writable, Resumed, Rtt, Draining]

# Stream states.
_OPENING = 0  # worker: OPEN sent, no answer; exit: OPEN received, not answered
_OPEN = 1
_GONE = 2  # reset by us: kept until the peer's RST arrives (tombstone)


class _Stream:
    __slots__ = (
        "ack_hold",
        "ack_sent",
        "acked",
        "address",
        "carrier",
        "fin_ack_sent",
        "fin_acked",
        "fin_at",
        "fin_queued",
        "fin_received",
        "fin_sent",
        "gone_at",
        "gone_frame",
        "id",
        "in_ring",
        "paused",
        "pending",
        "pending_len",
        "recv",
        "replay",
        "sent",
        "state",
    )

    def __init__(self, sid: int, state: int, address: bytes) -> None:
        self.id = sid
        self.state = state
        self.address = address
        self.carrier: Optional[int] = None
        self.sent = 0  # bytes framed and sent (replay buffer holds acked..sent)
        self.acked = 0
        self.replay: deque[Chunk] = deque()
        self.pending: deque[Chunk] = deque()  # accepted from the application, not framed yet
        self.pending_len = 0
        self.in_ring = False
        self.paused = False
        self.fin_queued = False
        self.fin_sent = False
        self.fin_acked = False
        self.recv = 0
        self.ack_sent = 0
        self.ack_hold = False
        self.fin_at: Optional[int] = None
        self.fin_received = False
        self.fin_ack_sent = False
        self.gone_frame = b""
        self.gone_at = 0.0


class _Carrier:
    __slots__ = (
        "control",
        "decoder",
        "id",
        "last_recv",
        "last_send",
        "ring",
        "sealer",
        "streams",
        "unsealer",
    )

    def __init__(self, cid: int, sealer: object, unsealer: object, now: float) -> None:
        self.id = cid
        self.sealer = sealer
        self.unsealer = unsealer
        self.decoder = mux.FrameDecoder()
        self.control: list[Chunk] = []
        self.ring: deque[_Stream] = deque()
        self.streams = 0
        self.last_send = now
        self.last_recv = now


class Session:
    """One worker's association with one exit: its carriers and its streams."""

    def __init__(
        self,
        role: str,
        *,
        heartbeat: float,
        now: float,
        misses: int,
        window: int,
        tombstone_ttl: float,
    ) -> None:
        if role not in (WORKER, EXIT):
            raise ValueError(f"role {role!r}")
        if heartbeat <= 0 or misses < 1 or window < mux.DATA_STEP:
            raise ValueError("heartbeat > 0, misses >= 1, window >= DATA_STEP")
        self.role = role
        self.heartbeat = heartbeat
        self.misses = misses
        self.window = window
        self.ack_every = max(mux.DATA_STEP, window // 4)
        self.tombstone_ttl = tombstone_ttl
        self.streams: dict[int, _Stream] = {}
        self.carriers: dict[int, _Carrier] = {}
        self._next_id = 1
        self._unbound: list[_Stream] = []
        self._ack_due: set[_Stream] = set()
        self._graves: deque[_Stream] = deque()
        """Streams in the order they went: tick() forgets the old ones without a walk over
        every stream."""
        self.draining = False
        self.on_output: Optional[Callable[[int], None]] = None
        """Called with a carrier id when that carrier has something new to send."""
        self.buffered = 0
        """Bytes held for all streams: queued from the applications plus unacknowledged."""
        self.frames_in = 0
        self.frames_out = 0
        self.credit_stalls = 0
        self._ping_after = heartbeat if role == WORKER else heartbeat * 1.5
        self._now = now

    # -- carriers -------------------------------------------------------------------------
    def add_carrier(self, cid: int, sealer: object, unsealer: object, now: float) -> None:
        """A carrier joined the session (HELLO done); ``sealer``/``unsealer`` may be None
        when TLS already protects it. The worker moves waiting streams onto it."""
        if cid in self.carriers:
            raise ValueError(f"carrier {cid} already in the session")
        self.carriers[cid] = _Carrier(cid, sealer, unsealer, now)
        if self._unbound:
            waiting, self._unbound = self._unbound, []
            for stream in waiting:
                if stream.id in self.streams:
                    self._bind(stream, self._pick())
        self._wake(cid)

    def remove_carrier(self, cid: int, now: float) -> list[int]:
        """The carrier closed or died. The worker moves its streams to another carrier (or
        keeps them until one is added); the exit keeps them until the worker moves them.
        Returns the ids of the streams that were on it."""
        carrier = self.carriers.pop(cid, None)
        if carrier is None:
            return []
        moved = [s for s in self.streams.values() if s.carrier == cid]
        for stream in moved:
            stream.carrier = None
            stream.in_ring = False
        for stream in moved:
            # The worker moves every stream; the exit only its resets and its unacknowledged
            # FINs, which the worker may not have seen (it moves the rest itself, with SYNC or
            # OPEN).
            if (
                self.role == WORKER
                or stream.state == _GONE
                or (stream.fin_sent and not stream.fin_acked)
            ):
                self._bind(stream, self._pick())
        del now
        return [s.id for s in moved]

    def _pick(self) -> Optional[_Carrier]:
        best: Optional[_Carrier] = None
        for carrier in self.carriers.values():
            if best is None or carrier.streams < best.streams:
                best = carrier
        return best

    def _bind(self, stream: _Stream, carrier: Optional[_Carrier]) -> None:
        """Put ``stream`` on ``carrier`` and send there what the peer may not have."""
        if carrier is None:
            stream.carrier = None
            self._unbound.append(stream)
            return
        old = self.carriers.get(stream.carrier) if stream.carrier is not None else None
        if old is not None:
            old.streams -= 1
        stream.carrier = carrier.id
        carrier.streams += 1
        stream.in_ring = False
        control = carrier.control
        if stream.state == _GONE:
            control.append(stream.gone_frame)
        elif self.role == EXIT:
            if stream.fin_sent and not stream.fin_acked:
                # The worker may have finished and forgotten the stream, our FIN's ACK lost
                # with the carrier: ask again (a worker that still has it moves it anyway).
                control.append(mux.encode_fin(stream.id, stream.sent))
        elif self.role == WORKER:
            if stream.state == _OPENING:
                control.append(mux.encode_open(stream.id, stream.address))
            else:
                control.append(mux.encode_sync(stream.id, stream.recv, stream.fin_received))
                stream.ack_sent = stream.recv
                stream.fin_ack_sent = stream.fin_received
            self._replay(stream, control, stream.acked)
        self._ready(stream, carrier)
        self._wake(carrier.id)

    def _replay(self, stream: _Stream, control: list[Chunk], start: int) -> None:
        """Frame again everything from ``start`` (>= acked) to what was sent, FIN included."""
        offset = stream.acked
        for chunk in stream.replay:
            n = len(chunk)
            if offset + n > start:
                cut = max(0, start - offset)
                piece = chunk[cut:] if cut else chunk
                control.append(mux.data_header(stream.id, offset + cut, len(piece)))
                control.append(piece)
            offset += n
        if stream.fin_sent:
            control.append(mux.encode_fin(stream.id, stream.sent))

    # -- streams: the application side ----------------------------------------------------
    def open(self, address: bytes) -> int:
        """Worker: a new stream to ``address`` (SOCKS5 ATYP/address/port bytes). Bytes may be
        sent on it at once (optimistic); the exit's answer comes as :class:`Answered`."""
        if self.role != WORKER:
            raise RuntimeError("only the worker opens streams")
        mux.check_address(address)
        sid = self._next_id
        if sid > mux.MAX_STREAM:
            raise RuntimeError("stream ids exhausted: start a new session")
        self._next_id += 1
        stream = _Stream(sid, _OPENING, address)
        self.streams[sid] = stream
        self._bind(stream, self._pick())
        return sid

    def answer(self, sid: int, code: int, address: bytes = b"\x01\0\0\0\0\0\0") -> None:
        """Exit: answer an :class:`Opened` stream; a code other than 0 refuses it."""
        stream = self.streams.get(sid)
        if stream is None or stream.state != _OPENING or self.role != EXIT:
            return
        frame = mux.encode_reply(sid, code, address)
        if code == 0:
            stream.state = _OPEN
            stream.address = address
            stream.ack_hold = False
            self._control(stream, frame)
            self._maybe_ack(stream)
        else:
            self._gone(stream, frame)  # kept until the worker's RST answers it

    def send(self, sid: int, data: Chunk) -> bool:
        """Queue application bytes; returns True when the application side should pause
        (the stream's credit and queue are used up) until :class:`Writable`."""
        stream = self.streams.get(sid)
        if stream is None or stream.state == _GONE or stream.fin_queued:
            return False
        if data:
            stream.pending.append(data)
            stream.pending_len += len(data)
            self.buffered += len(data)
            carrier = self.carriers.get(stream.carrier) if stream.carrier is not None else None
            if carrier is not None and not stream.in_ring and self._credit(stream) > 0:
                stream.in_ring = True
                carrier.ring.append(stream)
                self._wake(carrier.id)
        full = stream.pending_len + stream.sent - stream.acked >= self._limit(stream)
        if full:
            stream.paused = True
        return full

    def send_fin(self, sid: int) -> None:
        """The application half-closed: FIN after the bytes already queued."""
        stream = self.streams.get(sid)
        if stream is None or stream.state == _GONE or stream.fin_queued:
            return
        stream.fin_queued = True
        if not stream.pending:
            self._emit_fin(stream)

    def _emit_fin(self, stream: _Stream) -> None:
        stream.fin_sent = True
        self._control(stream, mux.encode_fin(stream.id, stream.sent))

    def reset(self, sid: int, code: int, reason: str) -> None:
        """The application side failed or closed: reset the stream at the peer."""
        stream = self.streams.get(sid)
        if stream is None or stream.state == _GONE:
            return
        self._gone(stream, mux.encode_reset(sid, code, reason))

    def ack_now(self, sid: int) -> bool:
        """Acknowledge what the stream received at once, not at the next tick.

        For a carrier whose transport cannot acknowledge a small read itself (an ``ssh``
        process: the login node's sshd holds its next small packet until the last one is
        acknowledged, up to the receiver's delayed-ACK timeout): the frame carries the TCP
        acknowledgement. False when there is nothing the ACK could go out for."""
        stream = self.streams.get(sid)
        if stream is None or stream.state == _GONE or stream.ack_hold:
            return False
        if stream.carrier is None or stream.carrier not in self.carriers:
            return False
        self._send_ack(stream)
        return True

    def hold_acks(self, sid: int, held: bool) -> None:
        """The application is not taking bytes (its socket is full): acknowledge nothing
        more, so the peer runs out of credit for this stream only."""
        stream = self.streams.get(sid)
        if stream is None:
            return
        stream.ack_hold = held
        if not held:
            self._maybe_ack(stream)

    def _drop_buffers(self, stream: _Stream) -> None:
        self.buffered -= stream.pending_len + stream.sent - stream.acked
        stream.pending.clear()
        stream.pending_len = 0
        stream.replay.clear()
        stream.acked = stream.sent

    def _gone(self, stream: _Stream, frame: bytes) -> None:
        stream.state = _GONE
        stream.gone_frame = frame
        stream.gone_at = self._now
        if self.tombstone_ttl:
            self._graves.append(stream)
        self._drop_buffers(stream)
        self._ack_due.discard(stream)
        self._control(stream, frame)

    def _forget(self, stream: _Stream) -> None:
        self.streams.pop(stream.id, None)
        self._ack_due.discard(stream)
        carrier = self.carriers.get(stream.carrier) if stream.carrier is not None else None
        if carrier is not None:
            carrier.streams -= 1
        stream.carrier = None
        self._drop_buffers(stream)

    def _limit(self, stream: _Stream) -> int:
        return UNCONFIRMED_WINDOW if stream.state == _OPENING else self.window

    def _credit(self, stream: _Stream) -> int:
        return self._limit(stream) - (stream.sent - stream.acked)

    def _control(self, stream: _Stream, frame: Chunk) -> None:
        carrier = self.carriers.get(stream.carrier) if stream.carrier is not None else None
        if carrier is not None:
            carrier.control.append(frame)
            self._wake(carrier.id)

    def _ready(self, stream: _Stream, carrier: _Carrier) -> None:
        if (
            stream.pending
            and not stream.in_ring
            and stream.state != _GONE
            and self._credit(stream) > 0
        ):
            stream.in_ring = True
            carrier.ring.append(stream)

    def _wake(self, cid: int) -> None:
        if self.on_output is not None:
            self.on_output(cid)

    # -- output ---------------------------------------------------------------------------
    def output(self, cid: int, now: float, budget: int = 256 * 1024) -> list[Chunk]:
        """Wire bytes for carrier ``cid``: control frames, then one DATA frame per stream in
        turn until about ``budget`` bytes; a frame of DATA_STEP while other streams wait, of up
        to MAX_DATA when the stream is the only one. Sealed when the carrier has a sealer."""
        carrier = self.carriers.get(cid)
        if carrier is None:
            return []
        frames = carrier.control
        carrier.control = []
        size = 0
        for frame in frames:
            size += len(frame)
        ring = carrier.ring
        header = mux.data_header
        alone, step = mux.MAX_DATA, mux.DATA_STEP
        while ring and size < budget:
            stream = ring.popleft()
            stream.in_ring = False
            if stream.carrier != cid or stream.state == _GONE:
                continue
            credit = self._credit(stream)
            if credit <= 0:
                self.credit_stalls += 1
                continue
            take = min(credit, step if ring else alone)
            pending = stream.pending
            head = pending[0]
            if len(head) <= take:
                pending.popleft()
                piece = head
            else:
                piece = memoryview(head)[:take]
                pending[0] = memoryview(head)[take:]
            n = len(piece)
            stream.pending_len -= n
            frames.append(header(stream.id, stream.sent, n))
            frames.append(piece)
            stream.replay.append(piece)
            stream.sent += n
            size += n + mux.DATA_OVERHEAD
            if pending:
                if credit > n:
                    stream.in_ring = True
                    ring.append(stream)
                else:
                    self.credit_stalls += 1
            elif stream.fin_queued and not stream.fin_sent:
                stream.fin_sent = True
                frames.append(mux.encode_fin(stream.id, stream.sent))
        if not frames:
            return []
        self.frames_out += len(frames)
        carrier.last_send = now
        sealer = carrier.sealer
        if sealer is None:
            return frames
        return sealer.seal(frames)  # type: ignore[attr-defined]

    def has_output(self, cid: int) -> bool:
        carrier = self.carriers.get(cid)
        return carrier is not None and bool(carrier.control or carrier.ring)

    # -- input ----------------------------------------------------------------------------
    def receive(self, cid: int, data: bytes, now: float) -> list[Event]:
        """Carrier bytes in, events out. A :class:`ProtocolError` means the carrier is
        broken (bad framing or failed authentication): close it; its streams move on."""
        carrier = self.carriers.get(cid)
        if carrier is None:
            return []
        carrier.last_recv = now
        self._now = now
        unsealer = carrier.unsealer
        if unsealer is None:
            frames = carrier.decoder.feed(data)
        else:
            frames = []
            for record in unsealer.feed(data):  # type: ignore[attr-defined]
                frames.extend(carrier.decoder.feed(record))
        events: list[Event] = []
        self.frames_in += len(frames)
        for frame in frames:
            kind = type(frame)
            if kind is mux.Data:
                self._on_data(frame, events)  # type: ignore[arg-type]
            elif kind is mux.Ack:
                self._on_ack(frame, events)  # type: ignore[arg-type]
            elif kind is mux.Ping:
                carrier.control.append(mux.encode_pong(frame.token))  # type: ignore[union-attr]
                self._wake(cid)
            elif kind is mux.Pong:
                rtt = now - frame.token / 1e6  # type: ignore[union-attr]
                if 0 <= rtt < 3600:
                    events.append(Rtt(cid, rtt))
            else:
                self._on_other(carrier, frame, events, now)
        return events

    def _stream_error(self, stream: _Stream, why: str, events: list[Event]) -> None:
        self._gone(stream, mux.encode_reset(stream.id, mux.RST_PROTOCOL, why))
        events.append(Reset(stream.id, mux.RST_PROTOCOL, why))

    def _on_data(self, frame: mux.Data, events: list[Event]) -> None:
        stream = self.streams.get(frame.stream)
        if stream is None or stream.state == _GONE:
            return
        if self.role == WORKER and stream.state == _OPENING:
            self._stream_error(stream, "DATA before the exit's answer", events)
            return
        payload = frame.payload
        start = frame.offset
        end = start + len(payload)
        recv = stream.recv
        if end <= recv:
            return  # replayed bytes we have
        if start > recv:
            self._stream_error(stream, f"DATA at {start}, expected {recv}", events)
            return
        if stream.fin_at is not None and end > stream.fin_at:
            self._stream_error(stream, "DATA beyond FIN", events)
            return
        if start < recv:
            payload = memoryview(payload)[recv - start :]
        stream.recv = end
        events.append(Received(stream.id, payload))
        if stream.fin_at == end:
            self._fin_arrived(stream, events)
        elif not stream.ack_hold:
            self._maybe_ack(stream)

    def _fin_arrived(self, stream: _Stream, events: list[Event]) -> None:
        stream.fin_received = True
        events.append(Ended(stream.id))
        self._maybe_ack(stream)
        self._maybe_finished(stream, events)

    def _maybe_ack(self, stream: _Stream) -> None:
        """ACK now when a quarter window (or a FIN) waits, else at the carrier's next tick."""
        if stream.ack_hold or stream.state == _GONE:
            return
        if (stream.fin_received and not stream.fin_ack_sent) or (
            stream.recv - stream.ack_sent >= self.ack_every
        ):
            self._send_ack(stream)
        elif stream.recv != stream.ack_sent:
            self._ack_due.add(stream)

    def _send_ack(self, stream: _Stream) -> None:
        self._ack_due.discard(stream)
        carrier = self.carriers.get(stream.carrier) if stream.carrier is not None else None
        if carrier is None:
            return  # the SYNC or the exit's ACK after a move carries it
        stream.ack_sent = stream.recv
        stream.fin_ack_sent = stream.fin_received
        carrier.control.append(mux.encode_ack(stream.id, stream.recv, stream.fin_received))
        self._wake(carrier.id)

    def _on_ack(self, frame: mux.Ack, events: list[Event]) -> None:
        stream = self.streams.get(frame.stream)
        if stream is None or stream.state == _GONE:
            return
        self._take_ack(stream, frame.offset, frame.fin, events)

    def _take_ack(self, stream: _Stream, offset: int, fin: bool, events: list[Event]) -> bool:
        if offset > stream.sent:
            self._stream_error(stream, f"ACK of {offset}, only {stream.sent} sent", events)
            return False
        if fin:
            if not stream.fin_sent or offset != stream.sent:
                self._stream_error(stream, "ACK of a FIN that was not sent", events)
                return False
            stream.fin_acked = True
        if offset > stream.acked:
            drop = offset - stream.acked
            replay = stream.replay
            while drop:
                head = replay[0]
                if len(head) <= drop:
                    drop -= len(head)
                    replay.popleft()
                else:
                    replay[0] = memoryview(head)[drop:]
                    drop = 0
            self.buffered -= offset - stream.acked
            stream.acked = offset
            carrier = self.carriers.get(stream.carrier) if stream.carrier is not None else None
            if carrier is not None:
                self._ready(stream, carrier)
                if stream.in_ring:
                    self._wake(carrier.id)
            if stream.paused and stream.pending_len + stream.sent - offset < self._limit(stream):
                stream.paused = False
                events.append(Writable(stream.id))
        self._maybe_finished(stream, events)
        return True

    def _maybe_finished(self, stream: _Stream, events: list[Event]) -> None:
        if stream.fin_acked and stream.fin_received and stream.fin_ack_sent:
            self._forget(stream)
            events.append(Finished(stream.id))

    def _on_other(
        self, carrier: _Carrier, frame: mux.Frame, events: list[Event], now: float
    ) -> None:
        kind = type(frame)
        if kind is mux.Fin:
            stream = self.streams.get(frame.stream)  # type: ignore[union-attr]
            if stream is None:
                # A FIN sent again for a stream we finished and forgot: say so, so that the
                # peer may forget it too (see _on_reset).
                carrier.control.append(
                    mux.encode_reset(frame.stream, mux.RST_UNKNOWN_STREAM, "stream not known")  # type: ignore[union-attr]
                )
                self._wake(carrier.id)
                return
            if stream.state == _GONE:
                return
            offset = frame.offset  # type: ignore[union-attr]
            if offset < stream.recv or (stream.fin_at is not None and stream.fin_at != offset):
                self._stream_error(stream, f"FIN at {offset}, {stream.recv} received", events)
                return
            if stream.fin_at is None:
                stream.fin_at = offset
                if stream.recv == offset:
                    self._fin_arrived(stream, events)
        elif kind is mux.Reset:
            self._on_reset(carrier, frame, events)  # type: ignore[arg-type]
        elif kind is mux.Open:
            self._on_open(carrier, frame, events)  # type: ignore[arg-type]
        elif kind is mux.Reply:
            self._on_reply(carrier, frame, events)  # type: ignore[arg-type]
        elif kind is mux.Sync:
            self._on_sync(carrier, frame, events)  # type: ignore[arg-type]
        elif kind is mux.GoAway and self.role == WORKER and not self.draining:
            self.draining = True
            events.append(Draining(frame.reason))  # type: ignore[union-attr]
        del now

    def _on_reset(self, carrier: _Carrier, frame: mux.Reset, events: list[Event]) -> None:
        stream = self.streams.get(frame.stream)
        if stream is not None and stream.state == _GONE:
            # The peer's RST answers ours, or crossed it (then ours may have been lost with
            # a carrier: answer, so that the peer need not keep its own).
            self._forget(stream)
            if frame.code != mux.RST_ANSWER:
                self._answer_reset(frame.stream, carrier.id)
            return
        if stream is None:
            # The peer reset a stream we never knew or already forgot; answer so that it
            # can forget it too (answers are never answered).
            if frame.code != mux.RST_ANSWER:
                self._answer_reset(frame.stream, carrier.id)
            return
        if frame.code == mux.RST_UNKNOWN_STREAM and stream.fin_sent and stream.fin_received:
            # The peer forgot a stream whose FINs were both sent: it forgets one only after
            # our FIN, so after all our bytes, arrived. Only our last ACK of its FIN or its
            # ACK of ours was lost with a carrier.
            self._forget(stream)
            events.append(Finished(stream.id))
            return
        self._forget(stream)
        if frame.code != mux.RST_ANSWER:
            self._answer_reset(frame.stream, carrier.id)
        events.append(Reset(frame.stream, frame.code, frame.reason))

    def _answer_reset(self, sid: int, cid: int) -> None:
        """Answer on the carrier the peer's frame came on: it is alive."""
        carrier = self.carriers.get(cid)
        if carrier is not None:
            carrier.control.append(mux.encode_reset(sid, mux.RST_ANSWER, ""))
            self._wake(carrier.id)

    def _on_open(self, carrier: _Carrier, frame: mux.Open, events: list[Event]) -> None:
        if self.role != EXIT:
            raise ProtocolError("OPEN sent to the worker")
        stream = self.streams.get(frame.stream)
        if stream is None:
            if self.draining:
                carrier.control.append(
                    mux.encode_reset(frame.stream, mux.RST_SHUTDOWN, "exit is draining")
                )
                self._wake(carrier.id)
                return
            stream = _Stream(frame.stream, _OPENING, frame.address)
            stream.ack_hold = True
            self.streams[frame.stream] = stream
            stream.carrier = carrier.id
            carrier.streams += 1
            events.append(Opened(frame.stream, frame.address))
            return
        # OPEN again: the worker never saw our answer; it received nothing from us.
        self._rebind(carrier, stream, 0, False, events, answer=True)

    def _on_sync(self, carrier: _Carrier, frame: mux.Sync, events: list[Event]) -> None:
        if self.role != EXIT:
            raise ProtocolError("SYNC sent to the worker")
        stream = self.streams.get(frame.stream)
        if stream is None:
            carrier.control.append(
                mux.encode_reset(frame.stream, mux.RST_UNKNOWN_STREAM, "stream not known")
            )
            self._wake(carrier.id)
            return
        self._rebind(carrier, stream, frame.offset, frame.fin, events)

    def _rebind(
        self,
        carrier: _Carrier,
        stream: _Stream,
        offset: int,
        fin: bool,
        events: list[Event],
        answer: bool = False,
    ) -> None:
        """Exit: the worker continues ``stream`` on ``carrier`` having received ``offset``."""
        old = self.carriers.get(stream.carrier) if stream.carrier is not None else None
        if old is not None:
            old.streams -= 1
        stream.carrier = carrier.id
        carrier.streams += 1
        stream.in_ring = False
        control = carrier.control
        if stream.state == _GONE:
            control.append(stream.gone_frame)
            self._wake(carrier.id)
            return
        if offset < stream.acked or offset > stream.sent:
            self._stream_error(
                stream, f"resume at {offset}, outside [{stream.acked}, {stream.sent}]", events
            )
            return
        if answer and stream.state == _OPEN:
            control.append(mux.encode_reply(stream.id, 0, stream.address))
        if not self._take_ack(stream, offset, fin and stream.fin_sent, events):
            return
        if stream.id not in self.streams:
            return  # finished by this very ACK
        if not stream.ack_hold:
            stream.ack_sent = stream.recv
            stream.fin_ack_sent = stream.fin_received
            control.append(mux.encode_ack(stream.id, stream.recv, stream.fin_received))
        self._replay(stream, control, offset)
        self._ready(stream, carrier)
        events.append(Resumed(stream.id, carrier.id))
        self._wake(carrier.id)

    def _on_reply(self, carrier: _Carrier, frame: mux.Reply, events: list[Event]) -> None:
        if self.role != WORKER:
            raise ProtocolError("REPLY sent to the exit")
        stream = self.streams.get(frame.stream)
        if stream is None:
            # A stream we gave up (or a refusal already answered): let the exit forget it.
            self._answer_reset(frame.stream, carrier.id)
            return
        if stream.state != _OPENING:
            return  # gone, or the same answer again after a move
        if frame.code != 0:
            self._forget(stream)
            self._answer_reset(frame.stream, carrier.id)
            events.append(Answered(frame.stream, frame.code, frame.address))
            return
        stream.state = _OPEN
        events.append(Answered(frame.stream, 0, frame.address))
        bound = self.carriers.get(stream.carrier) if stream.carrier is not None else None
        if bound is not None:
            self._ready(stream, bound)
            if stream.in_ring:
                self._wake(bound.id)
        if stream.paused and stream.pending_len + stream.sent - stream.acked < self.window:
            stream.paused = False
            events.append(Writable(stream.id))

    # -- time -----------------------------------------------------------------------------
    def tick(self, now: float) -> list[int]:
        """Heartbeat duty; returns the carriers that are dead (no frame for ``heartbeat *
        misses``). The caller closes them and calls :meth:`remove_carrier`."""
        self._now = now
        dead: list[int] = []
        step = self.heartbeat / 4
        for carrier in self.carriers.values():
            if now - carrier.last_recv >= self.heartbeat * self.misses:
                dead.append(carrier.id)
                continue
            if now - carrier.last_send >= self._ping_after - step:
                carrier.control.append(mux.encode_ping(int(now * 1e6)))
                self._wake(carrier.id)
        if self._ack_due:
            due, self._ack_due = self._ack_due, set()
            for stream in due:
                if stream.id in self.streams and not stream.ack_hold:
                    self._send_ack(stream)
        graves = self._graves
        while graves and now - graves[0].gone_at > self.tombstone_ttl:
            stream = graves.popleft()
            if stream.state == _GONE and self.streams.get(stream.id) is stream:
                self._forget(stream)
        return dead

    def next_tick(self, now: float) -> float:
        """When :meth:`tick` should run next: a quarter heartbeat from now at the latest."""
        return now + self.heartbeat / 4

    # -- drain ----------------------------------------------------------------------------
    def goaway(self, reason: str) -> None:
        """Exit: ask the worker to open no new streams here; later OPENs are refused."""
        self.draining = True
        for carrier in self.carriers.values():
            carrier.control.append(mux.encode_goaway(reason))
            self._wake(carrier.id)

    # -- introspection --------------------------------------------------------------------
    def stream_carrier(self, sid: int) -> Optional[int]:
        stream = self.streams.get(sid)
        return None if stream is None else stream.carrier

    def replay_bytes(self, sid: int) -> int:
        stream = self.streams.get(sid)
        return 0 if stream is None else stream.sent - stream.acked + stream.pending_len

    def live_streams(self) -> int:
        return sum(1 for s in self.streams.values() if s.state != _GONE)
