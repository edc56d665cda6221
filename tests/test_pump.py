"""The byte pump on real sockets: what the carrier delivers reaches the plain side in order,
the payloads of one loop callback in one write, and FIN only after them."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from relay.metrics import Metrics
from relay.proto import frames as fr
from relay.proto.stream import TunnelStream
from relay.pump import PlainProtocol, ReplayTally, StreamInfo, TunnelPump


class _Carrier:
    """The carrier end as the pump sees it: where frames to the peer go."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def writelines(self, pieces: Any) -> None:
        self.sent.extend(bytes(p) for p in pieces)

    def write(self, data: bytes) -> None:
        self.sent.append(bytes(data))

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


async def test_payloads_of_one_callback_leave_in_one_write_and_fin_follows_them() -> None:
    loop = asyncio.get_running_loop()
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
    stream = TunnelStream(heartbeat=30.0, now=loop.time())
    pump = TunnelPump(stream, StreamInfo("t", "x:1"), Metrics("worker"), plain_is_client=True)
    pump.attach_plain(plain)
    carrier = _Carrier()
    pump.attach_carrier(carrier)
    pieces = [os.urandom(32 * 1024) for _ in range(8)]
    for piece in pieces:  # as asyncssh delivers them: one SSH packet per call
        pump.carrier_data(fr.data_header(len(piece)) + piece)
    pump.carrier_data(fr.encode_fin(sum(map(len, pieces))))
    received = bytearray()
    while True:
        data = await loop.sock_recv(theirs, 1 << 20)
        if not data:
            break
        received += data
    assert bytes(received) == b"".join(pieces)
    assert writes == [8]
    theirs.close()
    pump.shutdown()
    transport.close()


async def test_the_replay_tally_follows_sends_acks_and_the_end() -> None:
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    transport, plain = await loop.create_connection(PlainProtocol, sock=ours)
    tally = ReplayTally()
    stream = TunnelStream(heartbeat=30.0, now=loop.time())
    pump = TunnelPump(
        stream, StreamInfo("t", "x:1"), Metrics("exit"), plain_is_client=False, tally=tally
    )
    pump.attach_plain(plain)
    pump.plain_data(b"x" * 1000)  # no carrier yet: kept for the next one
    assert tally.bytes == 1000
    carrier = _Carrier()
    pump.attach_carrier(carrier, peer_offset=0)
    pump.plain_data(b"y" * 500)
    assert tally.bytes == 1500 == stream.replay_bytes
    pump.carrier_data(fr.encode_ack(1200))
    assert tally.bytes == 300 == stream.replay_bytes
    pump.shutdown()
    assert tally.bytes == 0
    theirs.close()
    transport.close()
