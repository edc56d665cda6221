"""Carriers: the worker's connections to the exit, one per stream, over SSH or plain TCP.

A carrier first runs the opening handshake (:class:`relay.proto.opener.TunnelOpener`), then
hands every byte to its stream's pump. Bytes that arrive between the two are held so the
pump sees the stream from its first byte.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Optional

import asyncssh

from relay.proto import ProtocolError
from relay.proto import hello as hl
from relay.proto.opener import Connected, Established, Refused, TunnelOpener
from relay.pump import TunnelPump


class TunnelRefused(ConnectionError):
    """The exit refused the tunnel method or our HELLO."""

    def __init__(self, stage: str, status: int) -> None:
        self.stage = stage
        self.status = status
        super().__init__(f"exit refused {stage}: {hl.STATUS_NAMES.get(status, status)}")


class Opened:
    """Result of a completed opening handshake."""

    def __init__(self, established: Established, connected: Optional[Connected]) -> None:
        self.established = established
        self.connected = connected


class CarrierBase:
    """Shared behaviour of SSH-channel and TCP carriers; ``self.link`` is the byte pipe."""

    link: Any

    def _init_carrier(self) -> None:
        self.opener: Optional[TunnelOpener] = None
        self.opened: asyncio.Future[Opened] = asyncio.get_running_loop().create_future()
        self.pump: Optional[TunnelPump] = None
        self._established: Optional[Established] = None
        self._held: list[bytes] = []
        self._lost: Optional[str] = None

    @property
    def established(self) -> Optional[Established]:
        """The exit's accepted HELLO, once it came (it has a session for us from then on)."""
        return self._established

    def start(self, opener: TunnelOpener) -> None:
        self.opener = opener
        self.link.write(opener.first_flight())

    def attach(self, pump: TunnelPump, peer_offset: int = 0) -> int:
        """Give the data phase to ``pump`` (also after a resume onto this carrier).

        Returns the bytes the pump sent again because the peer had not received them.
        """
        self.pump = pump
        replayed = pump.attach_carrier(self.link, self._take_held(), peer_offset)
        if self._lost is not None:
            pump.carrier_lost(self._lost, self.link)
        return replayed

    def hand_over(self, pump: TunnelPump) -> None:
        """Give the data phase to ``pump``, which has sent on this carrier since right after
        the first flight (optimistic data): nothing is sent again, held bytes go to it."""
        self.pump = pump
        pump.carrier_confirmed(self._take_held())
        if self._lost is not None:
            pump.carrier_lost(self._lost, self.link)

    def _take_held(self) -> bytes:
        """What arrived after the handshake, in order: the opener's rest, then held reads."""
        held = b"".join(self._held)
        self._held.clear()
        if self.opener is not None:
            held = self.opener.trailing() + held
            self.opener = None
        return held

    def _current(self) -> bool:
        """True while this carrier is the one its stream uses (not one replaced by a resume)."""
        return self.pump is not None and self.pump.carrier is self.link

    def _on_bytes(self, data: bytes) -> None:
        if self.pump is not None:
            if self.pump.carrier is self.link:
                self.pump.carrier_data(data)
            return
        if self.opened.done():
            self._held.append(data)
            self.link.pause_reading()
            return
        opener = self.opener
        if opener is None:
            return
        try:
            events = opener.receive(data)
        except ProtocolError as exc:
            self._fail(exc)
            return
        for event in events:
            if isinstance(event, Refused):
                self._fail(TunnelRefused(event.stage, event.status))
                return
            if isinstance(event, Established):
                self._established = event
                if opener.is_resume:
                    self.opened.set_result(Opened(event, None))
            elif isinstance(event, Connected):
                assert self._established is not None
                self.opened.set_result(Opened(self._established, event))

    def _on_closed(self, why: str) -> None:
        if self.pump is not None:
            self.pump.carrier_lost(why, self.link)
        elif not self.opened.done():
            self.opened.set_exception(ConnectionError(f"carrier closed during handshake: {why}"))
        else:
            self._lost = why

    def _fail(self, exc: Exception) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc)
        self.link.close()

    def _pause(self) -> None:
        if self._current():
            assert self.pump is not None
            self.pump.carrier_pause_writing()

    def _resume(self) -> None:
        if self._current():
            assert self.pump is not None
            self.pump.carrier_resume_writing()


class SshCarrier(CarrierBase, asyncssh.SSHTCPSession[bytes]):
    """A direct-tcpip channel through the login node to the exit."""

    def __init__(self) -> None:
        self._init_carrier()

    def connection_made(self, chan: Any) -> None:
        self.link = chan

    def data_received(self, data: bytes, datatype: Any) -> None:
        self._on_bytes(data)

    def eof_received(self) -> bool:
        self._on_closed("carrier closed without FIN")
        return False

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._on_closed(str(exc) if exc else "carrier closed")

    def pause_writing(self) -> None:
        self._pause()

    def resume_writing(self) -> None:
        self._resume()


class TcpCarrier(CarrierBase, asyncio.Protocol):
    """A plain TCP connection to the exit, for when no login node is in between."""

    def __init__(self) -> None:
        self._init_carrier()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.link = transport

    def data_received(self, data: bytes) -> None:
        self._on_bytes(data)

    def eof_received(self) -> bool:
        self._on_closed("carrier closed without FIN")
        return False

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._on_closed(str(exc) if exc else "carrier closed")

    def pause_writing(self) -> None:
        self._pause()

    def resume_writing(self) -> None:
        self._resume()


def new_opener(
    secret: bytes, key_id: str, heartbeat: float, destination: tuple[str, int]
) -> TunnelOpener:
    return TunnelOpener(
        key=secret,
        key_id=key_id,
        now_ms=int(time.time() * 1000),
        nonce=os.urandom(hl.NONCE_SIZE),
        heartbeat_ms=int(heartbeat * 1000),
        destination=destination,
    )


def resume_opener(
    session_key: bytes, key_id: str, heartbeat: float, session_id: bytes, recv_offset: int
) -> TunnelOpener:
    """HELLO for an existing session, signed with its session key; no CONNECT follows."""
    return TunnelOpener(
        key=session_key,
        key_id=key_id,
        now_ms=int(time.time() * 1000),
        nonce=os.urandom(hl.NONCE_SIZE),
        heartbeat_ms=int(heartbeat * 1000),
        session_id=session_id,
        recv_offset=recv_offset,
    )
