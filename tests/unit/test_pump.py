"""The multiplexed stream's pump on real sockets: what the carrier delivers reaches the plain
side in order, the payloads of one loop callback in one write, and FIN only after them; the
session's buffered-bytes tally follows sends, acknowledgements and the end."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from relay.metrics import Metrics
from relay.net.muxpump import MuxDriver, MuxPump
from relay.net.pump import PlainProtocol, StreamInfo
from relay.proto import session as ms

ADDRESS = b"\x01\x7f\x00\x00\x01\x25\x92"
SESSION: dict[str, Any] = {"misses": 3, "window": 4 * 1024 * 1024, "tombstone_ttl": 600.0}


class _Link:
    """The carrier as the driver sees it: what it writes is kept for the peer."""

    def __init__(self) -> None:
        self.sent = bytearray()

    def writelines(self, pieces: Any) -> None:
        for piece in pieces:
            self.sent += piece

    def take(self) -> bytes:
        data, self.sent = bytes(self.sent), bytearray()
        return data

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


async def _pair(role: str) -> tuple[MuxDriver, ms.Session, _Link]:
    """A driver for ``role`` on one unsealed carrier, and the peer's in-memory session."""
    loop = asyncio.get_running_loop()
    peer_role = ms.EXIT if role == ms.WORKER else ms.WORKER
    driver = MuxDriver(ms.Session(role, heartbeat=30.0, now=loop.time(), **SESSION), Metrics(role))
    peer = ms.Session(peer_role, heartbeat=30.0, now=loop.time(), **SESSION)
    link = _Link()
    driver.add_link(1, link, None, None, b"")
    peer.add_carrier(1, None, None, loop.time())
    return driver, peer, link


def _to_peer(peer: ms.Session, link: _Link, now: float) -> list[ms.Event]:
    return peer.receive(1, link.take(), now)


def _from_peer(peer: ms.Session, now: float) -> bytes:
    return b"".join(bytes(p) for p in peer.output(1, now, budget=1 << 30))


async def test_payloads_of_one_callback_leave_in_one_write_and_fin_follows_them() -> None:
    loop = asyncio.get_running_loop()
    driver, peer, link = await _pair(ms.WORKER)
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    transport, plain = await loop.create_connection(PlainProtocol, sock=ours)
    writes: list[int] = []
    real_writelines = transport.writelines

    def counting(chunks: Any) -> None:
        chunks = list(chunks)
        writes.append(len(chunks))
        real_writelines(chunks)

    transport.writelines = counting  # type: ignore[method-assign]
    sid = driver.session.open(ADDRESS)
    pump = MuxPump(driver, sid, StreamInfo("t", "x:1"), plain_is_client=True)
    pump.attach_plain(plain)
    driver.flush_now()
    (opened,) = _to_peer(peer, link, loop.time())
    assert opened == ms.Opened(sid, ADDRESS)
    peer.answer(sid, 0)
    driver.link_data(1, _from_peer(peer, loop.time()))
    pieces = [os.urandom(32 * 1024) for _ in range(8)]
    for piece in pieces:
        peer.send(sid, piece)
    peer.send_fin(sid)
    wire = _from_peer(peer, loop.time())
    step = len(wire) // 8
    for start in range(0, len(wire), step):  # as asyncssh delivers them: a packet per call
        driver.link_data(1, wire[start : start + step])
    received = bytearray()
    while True:
        data = await loop.sock_recv(theirs, 1 << 20)
        if not data:
            break
        received += data
    assert bytes(received) == b"".join(pieces)
    assert len(writes) == 1, writes  # one write for everything delivered in this callback
    theirs.close()
    pump.shutdown()
    transport.close()
    driver.close("test over")


async def test_the_buffered_tally_follows_sends_acks_and_the_end() -> None:
    loop = asyncio.get_running_loop()
    driver, peer, link = await _pair(ms.EXIT)
    ours, theirs = socket.socketpair()
    transport, plain = await loop.create_connection(PlainProtocol, sock=ours)
    sid = peer.open(ADDRESS)
    driver.link_data(1, _from_peer(peer, loop.time()))
    pump = MuxPump(driver, sid, StreamInfo("t", "x:1"), plain_is_client=False)
    pump.attach_plain(plain)
    driver.session.answer(sid, 0)
    pump.plain_data(b"x" * 1000)
    pump.plain_data(b"y" * 500)
    assert driver.session.buffered == 1500
    driver.flush_now()
    events = _to_peer(peer, link, loop.time())
    got = b"".join(bytes(e.payload) for e in events if isinstance(e, ms.Received))
    assert got == b"x" * 1000 + b"y" * 500
    assert driver.session.buffered == 1500  # sent, not acknowledged yet
    peer.tick(loop.time())  # the peer acknowledges what it delivered at its next tick
    driver.link_data(1, _from_peer(peer, loop.time()))
    assert driver.session.buffered == 0
    pump.plain_data(b"z" * 300)
    assert driver.session.buffered == 300
    pump.shutdown()
    assert driver.session.buffered == 0
    theirs.close()
    transport.close()
    driver.close("test over")
