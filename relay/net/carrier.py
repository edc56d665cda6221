"""Carriers: the worker's long-lived connections to an exit, over SSH or plain TCP (or TLS).

A carrier first runs the opening handshake (:class:`relay.proto.opener.CarrierOpener`), then
joins its session's driver (relay.muxpump), which reads and writes sealed frames on it. Bytes
that arrive between the two are held, so the session sees the carrier from its first byte.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Optional

import asyncssh

from relay.errors import ChannelRefused
from relay.net.muxpump import MuxDriver
from relay.net.openssh import OpenSshConnection
from relay.net.sockopts import QUICKACK_BELOW
from relay.proto import ProtocolError, seal
from relay.proto import hello as hl
from relay.proto.errors import RelayError
from relay.proto.opener import CarrierOpener, Established, Refused


class TunnelRefused(RelayError, ConnectionError):
    """The exit refused the tunnel method or our HELLO: ``code`` (also ``status``) is the
    HELLO status it answered, ``reason`` the worker's auth-failure label (``exit-method``,
    ``exit-hello``)."""

    def __init__(self, stage: str, status: int) -> None:
        self.stage = stage
        self.status = status
        super().__init__(
            f"exit refused {stage}: {hl.STATUS_NAMES.get(status, status)}",
            code=status,
            reason=f"exit-{stage}",
        )


class CarrierBase:
    """Shared behaviour of SSH-channel and TCP carriers; ``self.link`` is the byte pipe."""

    link: Any

    def _init_carrier(self) -> None:
        self.opener: Optional[CarrierOpener] = None
        self.established: asyncio.Future[Established] = asyncio.get_running_loop().create_future()
        self.driver: Optional[MuxDriver] = None
        self.cid = 0
        self._held: list[bytes] = []
        self._lost: Optional[str] = None
        self.via: Optional[OpenSshConnection] = None
        """The ssh process whose forward this carrier is, if any."""
        self._since = time.monotonic()

    async def channel_failure(self) -> Optional[ChannelRefused]:
        """The login node's refusal of this carrier's channel, if ssh logged one."""
        if self.via is None:
            return None
        why = await self.via.channel_failure(self._since)
        return ChannelRefused(why) if why is not None else None

    def start(self, opener: CarrierOpener) -> None:
        self.opener = opener
        if self.link.is_closing():
            # Closed before its first byte (an ssh forward whose channel the login node
            # refused at once): the handshake fails with the reason connection_lost gave.
            return
        self.link.write(opener.first_flight())

    def join(self, driver: MuxDriver, cid: int, est: Established) -> None:
        """Hand the carrier to its session: frames are sealed with keys of this HELLO."""
        self.driver = driver
        self.cid = cid
        to_exit, to_worker = seal.derive_keys(est.session_key, est.worker_nonce, est.exit_nonce)
        early = b"".join(self._held)
        self._held.clear()
        if self.opener is not None:
            early = self.opener.trailing() + early
            self.opener = None
        driver.add_link(
            cid,
            self.link,
            seal.Sealer(to_exit),
            seal.Unsealer(to_worker),
            early,
            # ACK frames only where the worker cannot acknowledge on ssh's socket itself
            ack_small_reads=self.via is not None and self.via.login_socket is None,
        )
        if self._lost is not None:
            driver.drop_link(cid, self._lost)
        else:
            self.link.resume_reading()

    def _on_bytes(self, data: bytes) -> None:
        if self.via is not None and len(data) < QUICKACK_BELOW:
            self.via.acknowledge()
        driver = self.driver
        if driver is not None:
            driver.link_data(self.cid, data)
            return
        if self.established.done():
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
            self.established.set_result(event)
            trailing = opener.trailing()
            if trailing:
                self._held.append(trailing)
            self.opener = None
            self.link.pause_reading()  # until the session takes the carrier

    def _on_closed(self, why: str) -> None:
        if self.driver is not None:
            self.driver.drop_link(self.cid, why)
        elif not self.established.done():
            self.established.set_exception(
                ConnectionError(f"carrier closed during handshake: {why}")
            )
        else:
            self._lost = why

    def _fail(self, exc: Exception) -> None:
        if not self.established.done():
            self.established.set_exception(exc)
        self.link.close()

    def close(self) -> None:
        self.link.close()

    def _pause(self) -> None:
        if self.driver is not None:
            self.driver.pause_link(self.cid)

    def _resume(self) -> None:
        if self.driver is not None:
            self.driver.resume_link(self.cid)


class SshCarrier(CarrierBase, asyncssh.SSHTCPSession[bytes]):
    """A direct-tcpip channel through the login node to the exit."""

    def __init__(self) -> None:
        self._init_carrier()

    def connection_made(self, chan: Any) -> None:
        self.link = chan

    def data_received(self, data: bytes, datatype: Any) -> None:
        self._on_bytes(data)

    def eof_received(self) -> bool:
        self._on_closed("carrier closed by the exit")
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
        self._on_closed("carrier closed by the exit")
        return False

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._on_closed(str(exc) if exc else "carrier closed")

    def pause_writing(self) -> None:
        self._pause()

    def resume_writing(self) -> None:
        self._resume()


def carrier_opener(
    key: bytes, key_id: str, heartbeat: float, session_id: bytes = hl.NEW_SESSION
) -> CarrierOpener:
    """First flight of a carrier: a new session (``key`` = the key's secret) or a join
    (``key`` = the session key)."""
    return CarrierOpener(
        key=key,
        key_id=key_id,
        now_ms=int(time.time() * 1000),
        nonce=os.urandom(hl.NONCE_SIZE),
        heartbeat_ms=int(heartbeat * 1000),
        session_id=session_id,
    )
