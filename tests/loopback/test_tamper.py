"""An on-path party on the login->exit leg (port 80, no TLS) that flips, injects or replays
bytes on a carrier: the sealed frames fail authentication, that carrier is closed, its
streams move to another carrier, and the applications receive exactly the bytes sent."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from tests.loopback.test_resume import both_ways_handler, close_rig, make_rig
from tests.support.helpers import metric

SIZE = 12 * 1024 * 1024


@pytest.mark.parametrize("direction", [0, 1], ids=["to-exit", "to-worker"])
@pytest.mark.parametrize("how", ["flip", "inject", "replay"])
async def test_tampered_carrier_never_alters_application_bytes(how: str, direction: int) -> None:
    rig = await make_rig()
    try:
        down = os.urandom(SIZE)
        up = os.urandom(SIZE)
        received: asyncio.Queue[str] = asyncio.Queue()
        port = await rig.servers.start(both_ways_handler(down, received))
        reader, writer = await rig.open(port)
        rig.cutter.tamper(how, direction, after=1 << 20)

        async def send() -> None:
            for start in range(0, SIZE, 1 << 18):
                writer.write(up[start : start + (1 << 18)])
                await writer.drain()
            writer.write_eof()

        sender = asyncio.ensure_future(send())
        got = bytearray()
        while data := await asyncio.wait_for(reader.read(1 << 18), 30):
            got += data
        await sender
        assert rig.cutter.tampered == [how]
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(down).hexdigest()
        assert await asyncio.wait_for(received.get(), 30) == hashlib.sha256(up).hexdigest()
        side = rig.exit if direction == 0 else rig.worker
        assert metric(side.metrics, "relay_protocol_errors_total", stage="carrier") >= 1
        assert metric(rig.worker.metrics, "relay_streams_total", result="ok") == 1
        writer.close()
    finally:
        await close_rig(rig)
