"""Data-phase state machine of one tunnelled stream, the same at both ends.

It frames outgoing bytes, keeps them in a bounded replay buffer until the peer acknowledges
them (a full buffer is back-pressure), acknowledges what it delivers, sends PING when it has
sent nothing for the heartbeat interval, answers PING with PONG, tracks FIN in both
directions, and decides when the carrier is dead. Time is passed in; nothing here sleeps.
"""

from __future__ import annotations

import math
from collections import deque
from typing import NamedTuple, Union

from relay.proto import ProtocolError
from relay.proto import frames as fr

Chunk = Union[bytes, memoryview]

HEARTBEAT_GRID = 4
"""Heartbeat timers fire on a shared grid of interval / HEARTBEAT_GRID."""


class Rtt(NamedTuple):
    """A PONG answered one of our PINGs after ``seconds``."""

    seconds: float


class WindowOpen(NamedTuple):
    """The peer acknowledged bytes, so the replay buffer has room again."""

    window: int


StreamEvent = Union[fr.Data, fr.Fin, fr.Reset, Rtt, WindowOpen]


class TunnelStream:
    """One direction-pair of a tunnelled stream: offsets, replay buffer, heartbeats, FIN/RST."""

    def __init__(
        self,
        *,
        heartbeat: float,
        now: float,
        misses: int = 3,
        replay_limit: int = 4 * 1024 * 1024,
        ack_every: int | None = None,
        leads_heartbeat: bool = True,
    ) -> None:
        if heartbeat <= 0 or misses < 1 or replay_limit < fr.MAX_DATA:
            raise ValueError("heartbeat > 0, misses >= 1, replay_limit >= MAX_DATA")
        self.heartbeat = heartbeat
        self.misses = misses
        self.replay_limit = replay_limit
        self.ack_every = ack_every or max(64 * 1024, replay_limit // 4)
        self.send_offset = 0
        """Bytes handed to the stream for sending."""
        self.acked_offset = 0
        """Bytes the peer has acknowledged; everything in between is in the replay buffer."""
        self.recv_offset = 0
        """Bytes received and delivered."""
        self.ack_sent_offset = 0
        self.fin_sent = False
        self.fin_acked = False
        self.fin_received = False
        self.fin_ack_sent = False
        self.reset_seen = False
        self._replay: deque[Chunk] = deque()
        self._decoder = fr.FrameDecoder()
        self.last_send = now
        self.last_recv = now
        self.leads_heartbeat = leads_heartbeat
        """The worker leads; the exit only pings when the worker's PINGs stop coming."""

    # -- outbound -------------------------------------------------------------------------
    @property
    def window(self) -> int:
        """Bytes that may still be sent before the replay buffer is full."""
        return self.replay_limit - (self.send_offset - self.acked_offset)

    def send(self, payload: Chunk, now: float) -> list[Chunk]:
        """Frame ``payload``; returns pieces to write in order (headers and payload views)."""
        if self.fin_sent:
            raise RuntimeError("send after FIN")
        out: list[Chunk] = []
        n = len(payload)
        if n == 0:
            return out
        if n <= fr.MAX_DATA:
            out.append(fr.data_header(n))
            out.append(payload)
            self._replay.append(payload)
        else:
            view = memoryview(payload)
            for start in range(0, n, fr.MAX_DATA):
                piece = view[start : start + fr.MAX_DATA]
                out.append(fr.data_header(len(piece)))
                out.append(piece)
                self._replay.append(piece)
        self.send_offset += n
        self.last_send = now
        return out

    def send_fin(self, now: float) -> bytes:
        if self.fin_sent:
            return b""
        self.fin_sent = True
        self.last_send = now
        return fr.encode_fin(self.send_offset)

    def send_reset(self, code: int, reason: str = "") -> bytes:
        self.reset_seen = True
        return fr.encode_reset(code, reason)

    @property
    def finished(self) -> bool:
        """Both directions closed with FIN and everything we sent is acknowledged."""
        return self.fin_sent and self.fin_acked and self.fin_received and self.fin_ack_sent

    # -- inbound --------------------------------------------------------------------------
    def receive(self, data: bytes, now: float) -> tuple[list[StreamEvent], bytes]:
        """Decode carrier bytes; returns events for the application side and bytes to send."""
        self.last_recv = now
        events: list[StreamEvent] = []
        reply = b""
        for frame in self._decoder.feed(data):
            if type(frame) is fr.Data:
                if self.fin_received:
                    raise ProtocolError("DATA after FIN")
                self.recv_offset += len(frame.payload)
                events.append(frame)
            elif type(frame) is fr.Ack:
                self._on_ack(frame, events)
            elif type(frame) is fr.Ping:
                reply += fr.encode_pong(frame.token)
            elif type(frame) is fr.Pong:
                rtt = now - frame.token / 1e6
                if 0 <= rtt < 3600:
                    events.append(Rtt(rtt))
            elif type(frame) is fr.Fin:
                if self.fin_received:
                    continue
                if frame.offset != self.recv_offset:
                    raise ProtocolError(
                        f"FIN at offset {frame.offset}, but {self.recv_offset} bytes received"
                    )
                self.fin_received = True
                events.append(frame)
            elif isinstance(frame, fr.Reset):
                self.reset_seen = True
                events.append(frame)
                break
        if (self.fin_received and not self.fin_ack_sent) or (
            self.recv_offset - self.ack_sent_offset >= self.ack_every
        ):
            reply += self._ack()
        if reply:
            self.last_send = now
        return events, reply

    def _ack(self) -> bytes:
        self.ack_sent_offset = self.recv_offset
        if self.fin_received:
            self.fin_ack_sent = True
        return fr.encode_ack(self.recv_offset, self.fin_received)

    def _on_ack(self, ack: fr.Ack, events: list[StreamEvent]) -> None:
        if ack.offset > self.send_offset:
            raise ProtocolError(f"ACK for offset {ack.offset} beyond {self.send_offset} sent")
        if ack.fin:
            if not self.fin_sent or ack.offset != self.send_offset:
                raise ProtocolError("ACK of a FIN that was not sent")
            self.fin_acked = True
        if ack.offset > self.acked_offset:
            self._trim(ack.offset)
            events.append(WindowOpen(self.window))

    def _trim(self, offset: int) -> None:
        drop = offset - self.acked_offset
        replay = self._replay
        while drop:
            head = replay[0]
            if len(head) <= drop:
                drop -= len(head)
                replay.popleft()
            else:
                replay[0] = memoryview(head)[drop:]
                drop = 0
        self.acked_offset = offset

    # -- time -----------------------------------------------------------------------------
    @property
    def deadline(self) -> float:
        """When :meth:`poll` next has something to do."""
        return min(self.last_send + self._ping_after, self.last_recv + self.heartbeat * self.misses)

    @property
    def _ping_after(self) -> float:
        # The side that does not lead waits longer than the leader's interval: while the
        # leader's PINGs arrive, its PONGs keep the carrier busy, and the two never race to
        # ping at the same instant (timers of both sides share the heartbeat grid).
        return self.heartbeat if self.leads_heartbeat else self.heartbeat * 1.5

    def is_dead(self, now: float) -> bool:
        """No frame for ``heartbeat * misses``: the carrier is gone even if TCP has not noticed."""
        return now - self.last_recv >= self.heartbeat * self.misses

    @property
    def _grid(self) -> float:
        return self.heartbeat / HEARTBEAT_GRID

    def wake_at(self, now: float) -> float:
        """When the caller's timer should fire: :attr:`deadline` moved back onto a grid of
        a quarter interval shared by every stream, unless that is already past.

        Idle streams then ping in bursts instead of one by one, and sshd, whose cost per
        wake-up grows with its number of channels, wakes up once for many of them.
        """
        exact = self.deadline
        aligned = min(exact, math.floor(exact / self._grid) * self._grid)  # float rounding
        return aligned if aligned > now else exact

    def poll(self, now: float) -> bytes:
        """Heartbeat duty: PING (plus a pending ACK) when nothing was sent for an interval.

        Up to one grid step early (see :meth:`wake_at`), never late: the gap between two
        frames sent stays at most the interval.
        """
        if now - self.last_send < self._ping_after - self._grid:
            return b""
        out = b""
        if self.recv_offset != self.ack_sent_offset or (
            self.fin_received and not self.fin_ack_sent
        ):
            out += self._ack()
        out += fr.encode_ping(int(now * 1e6))
        self.last_send = now
        return out

    # -- resume ---------------------------------------------------------------------------
    def resume(self, peer_offset: int, now: float) -> list[Chunk]:
        """Continue on a new carrier: replay everything the peer has not received."""
        if not self.acked_offset <= peer_offset <= self.send_offset:
            raise ProtocolError(
                f"peer resumes at {peer_offset}, outside [{self.acked_offset}, {self.send_offset}]"
            )
        self._trim(peer_offset)
        self._decoder = fr.FrameDecoder()
        out: list[Chunk] = []
        for chunk in self._replay:
            out.append(fr.data_header(len(chunk)))
            out.append(chunk)
        if self.fin_sent:
            out.append(fr.encode_fin(self.send_offset))
        self.ack_sent_offset = self.recv_offset
        self.fin_ack_sent = False
        if self.fin_received:
            out.append(self._ack())
        self.last_send = self.last_recv = now
        return out

    @property
    def replay_bytes(self) -> int:
        return self.send_offset - self.acked_offset

    @property
    def mid_frame(self) -> bool:
        return self._decoder.mid_frame
