"""Protocol v2 through real daemons on loopback (carriers straight to the exit): streams
share carriers without blocking each other, and a draining exit sends new streams elsewhere
while its own finish."""

from __future__ import annotations

import asyncio
import os

import pytest
from python_socks.async_.asyncio import Proxy

from relay.config.values import HostPort
from relay.exit.daemon import RelayExit
from relay.worker.daemon import RelayWorker
from tests.support.helpers import (
    PASSWORD,
    USER,
    Servers,
    echo_handler,
    exit_settings,
    metric,
    wait_for,
    worker_settings,
)


async def _open(
    worker: RelayWorker, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    url = f"socks5://{USER}:{PASSWORD}@127.0.0.1:{worker.address[1]}"
    sock = await Proxy.from_url(url).connect("127.0.0.1", port, timeout=10)
    return await asyncio.open_connection(sock=sock)


async def test_a_stalled_destination_blocks_its_own_stream_only() -> None:
    """A destination that reads nothing: its stream runs out of credit, the client's writes
    back up, and another stream on the same carrier keeps working."""
    servers = Servers()
    stalled_in = asyncio.Event()

    async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stalled_in.set()
        await asyncio.sleep(3600)

    stall_port = await servers.start(never_reads)
    echo_port = await servers.start(echo_handler)
    relay_exit = RelayExit(exit_settings(replay_buffer=256 * 1024))
    await relay_exit.start()
    worker = RelayWorker(worker_settings(None, relay_exit.address, carriers=1,
                                         replay_buffer=256 * 1024))  # fmt: skip
    await worker.start()
    try:
        _, stalled = await _open(worker, stall_port)
        await asyncio.wait_for(stalled_in.wait(), 10)
        stalled.write(os.urandom(32 << 20))  # far more than credit and socket buffers hold
        assert await wait_for(
            lambda: metric(worker.metrics, "relay_credit_stalls_total") >= 1, timeout=20
        )
        reader, writer = await _open(worker, echo_port)
        for i in range(20):
            writer.write(b"ping %d\n" % i)
            assert await asyncio.wait_for(reader.readline(), 10) == b"ping %d\n" % i
        assert stalled.transport.get_write_buffer_size() > 0  # still backed up
        assert metric(worker.metrics, "relay_carriers_active") == 1
        writer.close()
        stalled.transport.abort()
    finally:
        await worker.stop()
        await relay_exit.stop()
        await servers.close()


async def test_draining_exit_finishes_its_streams_and_new_ones_go_elsewhere() -> None:
    servers = Servers()
    port = await servers.start(echo_handler)
    first = RelayExit(exit_settings())
    second = RelayExit(exit_settings())
    await first.start()
    await second.start()
    worker = RelayWorker(worker_settings(None, first.address))
    await worker.start()
    try:
        reader, writer = await _open(worker, port)
        writer.write(b"before\n")
        assert await reader.readline() == b"before\n"
        first_address = first.address
        worker.settings.exit += (HostPort(*second.address),)
        drain = asyncio.ensure_future(first.drain(30))
        assert await wait_for(lambda: not worker.exits[first_address].usable)
        for _ in range(3):  # new streams: on the other exit
            r2, w2 = await _open(worker, port)
            w2.write(b"new\n")
            assert await r2.readline() == b"new\n"
            w2.close()
        assert await wait_for(
            lambda: metric(second.metrics, "relay_streams_total", result="ok") == 3
        )
        writer.write(b"still here\n")  # the old stream goes on on the draining exit
        assert await reader.readline() == b"still here\n"
        writer.write_eof()
        assert await reader.read() == b""
        writer.close()
        await asyncio.wait_for(drain, 10)  # its last stream ended: the drain is over early
        assert metric(first.metrics, "relay_streams_total", result="ok") == 1
    finally:
        await worker.stop()
        await first.stop()
        await second.stop()
        await servers.close()


async def test_streams_of_a_draining_exit_that_goes_away_are_reset() -> None:
    """The exit drains, then dies before its streams end (killed, or its drain timed out):
    nothing can resume a draining session, so its streams end with a reset, not a hang."""
    servers = Servers()
    port = await servers.start(echo_handler)
    relay_exit = RelayExit(exit_settings())
    await relay_exit.start()
    worker = RelayWorker(worker_settings(None, relay_exit.address))
    await worker.start()
    try:
        reader, writer = await _open(worker, port)
        writer.write(b"before\n")
        assert await reader.readline() == b"before\n"
        address = relay_exit.address
        drain = asyncio.ensure_future(relay_exit.drain(30))
        assert await wait_for(lambda: not worker.exits[address].usable)
        for conn in list(relay_exit.connections):
            conn.abort()  # the process is gone: its carriers end without a word
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(reader.readexactly(1), 10)
        assert await wait_for(
            lambda: metric(worker.metrics, "relay_streams_total", result="resume-failed") == 1
        )
        writer.close()
        drain.cancel()
    finally:
        await worker.stop()
        await relay_exit.stop()
        await servers.close()
