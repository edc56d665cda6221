"""Warm carriers: streams that take a carrier whose HELLO is done, the pool that refills and
keeps them alive with keep-warms, and the exit's side (warm timeout, limits, refusals).
Real relay-exit and relay-worker on loopback, through OpenSSH sshd or a Cutter."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from typing import Any

from relay.exit import ExitConnection, RelayExit
from relay.proto import hello as hl
from relay.proto import socks5 as s5
from relay.worker import RelayWorker
from tests.cutter import Cutter
from tests.helpers import KEY_ID, SECRET, Servers, exit_settings, metric, wait_for, worker_settings
from tests.lab.sshd import Sshd
from tests.test_resume import Rig, both_ways_handler, close_rig

HB = 0.3  # short heartbeat: several keep-warm intervals pass in a second


def warm(worker: RelayWorker) -> float:
    return metric(worker.metrics, "relay_warm_carriers")


def used(worker: RelayWorker, carrier: str) -> float:
    return metric(worker.metrics, "relay_stream_carriers_total", carrier=carrier)


def failures(worker: RelayWorker, reason: str) -> float:
    return metric(worker.metrics, "relay_keep_warm_failures_total", reason=reason)


async def warm_rig(
    size: int = 2, sshd: Sshd | None = None, exit_overrides: dict[str, Any] | None = None
) -> Rig:
    """exit <- Cutter <- worker (through ``sshd`` when given), heartbeat HB on both."""
    relay_exit = RelayExit(exit_settings(heartbeat=HB, **(exit_overrides or {})))
    await relay_exit.start()
    cutter = Cutter(relay_exit.address)
    await cutter.start()
    worker = RelayWorker(
        worker_settings(sshd, cutter.address, heartbeat=HB, reconnect_max=0.5, warm_carriers=size)
    )
    await worker.start()
    return Rig(relay_exit, worker, cutter, Servers())


async def both_ways(rig: Rig, size: int = 4 * 1024 * 1024) -> None:
    """``size`` random bytes each way through one stream; both digests must match."""
    down, up = os.urandom(size), os.urandom(size)
    received: asyncio.Queue[str] = asyncio.Queue()
    port = await rig.servers.start(both_ways_handler(down, received))
    reader, writer = await rig.open(port)

    async def send() -> None:
        writer.write(up)
        await writer.drain()
        writer.write_eof()

    sender = asyncio.ensure_future(send())
    got = await asyncio.wait_for(reader.read(-1), 60)
    await sender
    writer.close()
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(down).hexdigest()
    assert await asyncio.wait_for(received.get(), 30) == hashlib.sha256(up).hexdigest()


async def test_stream_over_a_warm_carrier_through_sshd_and_refill(sshd: Sshd) -> None:
    rig = await warm_rig(sshd=sshd)
    try:
        await asyncio.sleep(0.5)
        # The pool never opens the SSH connection by itself.
        assert metric(rig.worker.metrics, "relay_ssh_connections_active") == 0
        assert warm(rig.worker) == 0
        await both_ways(rig)  # dialled: the SSH connection comes up with this stream
        assert used(rig.worker, "dialled") == 1
        assert await wait_for(lambda: warm(rig.worker) == 2)
        assert metric(rig.exit.metrics, "relay_warm_carriers") == 2
        await both_ways(rig)
        assert used(rig.worker, "warm") == 1 and used(rig.worker, "dialled") == 1
        assert await wait_for(lambda: warm(rig.worker) == 2)  # refilled
        assert await wait_for(lambda: metric(rig.exit.metrics, "relay_warm_carriers") == 2)
        # One SSH connection carried all of it.
        assert metric(rig.worker.metrics, "relay_ssh_connections_active") == 1
        login = f"{sshd.user}@{sshd.host}:{sshd.port}"
        ok = metric(rig.worker.metrics, "relay_ssh_connects_total", login=login, result="ok")
        assert ok == 1
        assert failures(rig.worker, "lost") == 0 and failures(rig.worker, "missed") == 0
    finally:
        await close_rig(rig)


async def test_keep_warm_keeps_carriers_alive_then_a_black_hole_replaces_them() -> None:
    rig = await warm_rig()
    try:
        assert await wait_for(lambda: warm(rig.worker) == 2)
        accepted = rig.cutter.accepted
        await asyncio.sleep(10 * HB)  # well past the exit's warm timeout (3 intervals)
        assert rig.cutter.accepted == accepted  # the same two carriers, still warm
        assert warm(rig.worker) == 2
        assert metric(rig.exit.metrics, "relay_warm_carriers") == 2
        assert metric(rig.exit.metrics, "relay_protocol_errors_total", stage="warm-timeout") == 0
        # keep-warm round trips are timed like heartbeats
        assert metric(rig.worker.metrics, "relay_heartbeat_rtt_seconds_count") >= 4
        assert rig.cutter.blackhole_all() == 2
        # Both ends notice that the keep-warms stopped; the pool opens two new carriers.
        assert await wait_for(lambda: failures(rig.worker, "missed") == 2)
        assert await wait_for(
            lambda: (
                metric(rig.exit.metrics, "relay_protocol_errors_total", stage="warm-timeout") == 2
            )
        )
        assert await wait_for(lambda: warm(rig.worker) == 2 and rig.cutter.accepted >= 4)
        await both_ways(rig, 1 << 20)
        assert used(rig.worker, "warm") == 1
    finally:
        await close_rig(rig)


async def test_exit_warm_timeout_closes_a_silent_warm_carrier() -> None:
    relay_exit = RelayExit(exit_settings(heartbeat=HB))
    await relay_exit.start()
    try:
        reader, writer = await asyncio.open_connection(*relay_exit.address)
        writer.write(hello_flight() + s5.KEEP_WARM)
        answer = await asyncio.wait_for(reader.readexactly(2 + hl.REPLY_SIZE + 10), 5)
        assert answer[:2] == b"\x05\x80" and answer[3] == hl.OK
        assert answer[-10:] == s5.KEEP_WARM_REPLY
        assert metric(relay_exit.metrics, "relay_warm_carriers") == 1
        assert relay_exit.handshakes == 0 and not relay_exit.unauthenticated
        for _ in range(4):  # kept warm across several intervals
            await asyncio.sleep(HB)
            writer.write(s5.KEEP_WARM)
            assert await asyncio.wait_for(reader.readexactly(10), 5) == s5.KEEP_WARM_REPLY
        # then silence: the exit closes it after heartbeat * misses
        assert await asyncio.wait_for(reader.read(), 10) == b""
        assert metric(relay_exit.metrics, "relay_warm_carriers") == 0
        assert metric(relay_exit.metrics, "relay_protocol_errors_total", stage="warm-timeout") == 1
        writer.close()
    finally:
        await relay_exit.stop()


def hello_flight() -> bytes:
    hello = hl.encode_hello(
        SECRET, KEY_ID, int(time.time() * 1000), os.urandom(16), hl.NEW_SESSION, 0, int(HB * 1000)
    )
    return b"\x05\x01\x80" + hello


async def raw_exchange(address: tuple[str, int], data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def test_exit_refuses_keep_warm_before_hello_and_from_plain_socks5() -> None:
    relay_exit = RelayExit(exit_settings(heartbeat=HB, allow_plain=True))
    await relay_exit.start()
    try:
        # In place of the HELLO: not a HELLO, the connection is closed.
        assert await raw_exchange(relay_exit.address, b"\x05\x01\x80" + s5.KEEP_WARM) == b"\x05\x80"
        # A plain SOCKS5 client: command not supported, as for any unknown command.
        plain = b"\x05\x01\x02" + s5.Socks5Client.userpass(KEY_ID, SECRET.decode()) + s5.KEEP_WARM
        answer = await raw_exchange(relay_exit.address, plain)
        assert answer == b"\x05\x02\x01\x00" + b"\x05\x07\x00\x01" + bytes(6)
        # After HELLO, but with an address: command not supported either.
        other = s5.Socks5Client.request(s5.CMD_KEEP_WARM, "192.0.2.1", 80)
        answer = await raw_exchange(relay_exit.address, hello_flight() + other)
        assert answer[2 + hl.REPLY_SIZE :] == b"\x05\x07\x00\x01" + bytes(6)
        assert metric(relay_exit.metrics, "relay_warm_carriers") == 0
        assert metric(relay_exit.metrics, "relay_protocol_errors_total", stage="hello") == 1
        assert (
            metric(relay_exit.metrics, "relay_streams_total", result="command-not-supported") == 2
        )
        assert await wait_for(lambda: relay_exit.handshakes == 0)
    finally:
        await relay_exit.stop()


async def test_warm_limits_are_counted_and_streams_still_work() -> None:
    rig = await warm_rig(size=3, exit_overrides={"max_warm_carriers_per_key": 1})
    try:
        assert await wait_for(lambda: failures(rig.worker, "refused") >= 1)
        hits = metric(rig.exit.metrics, "relay_limit_hits_total", limit="warm-carriers-per-key")
        assert hits >= 1
        assert warm(rig.worker) == 1 and metric(rig.exit.metrics, "relay_warm_carriers") == 1
        await both_ways(rig, 1 << 20)
        await both_ways(rig, 1 << 20)
        assert (
            used(rig.worker, "warm") >= 1
            and used(rig.worker, "warm") + used(rig.worker, "dialled") == 2
        )
    finally:
        await close_rig(rig)
    rig = await warm_rig(size=1, exit_overrides={"max_warm_carriers": 0})
    try:
        assert await wait_for(lambda: failures(rig.worker, "refused") >= 1)
        assert metric(rig.exit.metrics, "relay_limit_hits_total", limit="warm-carriers") >= 1
        await both_ways(rig, 1 << 20)
        assert used(rig.worker, "dialled") == 1 and used(rig.worker, "warm") == 0
    finally:
        await close_rig(rig)


async def test_warm_stream_resumes_after_its_carrier_is_killed() -> None:
    rig = await warm_rig()
    try:
        assert await wait_for(lambda: warm(rig.worker) == 2)
        port = await rig.servers.start(echo_handler_lines)
        reader, writer = await rig.open(port)
        first = os.urandom(300_000)
        writer.write(first)
        assert await asyncio.wait_for(reader.readexactly(len(first)), 10) == first
        assert used(rig.worker, "warm") == 1
        assert rig.cutter.reset_all() >= 1  # the stream's carrier (and the warm ones) die
        second = os.urandom(300_000)
        writer.write(second)
        assert await asyncio.wait_for(reader.readexactly(len(second)), 15) == second
        assert metric(rig.worker.metrics, "relay_resumes_total", result="ok") == 1
        assert metric(rig.exit.metrics, "relay_resumes_total", result="ok") == 1
        writer.close()
        assert await wait_for(lambda: warm(rig.worker) == 2)  # the pool came back too
    finally:
        await close_rig(rig)


async def echo_handler_lines(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1 << 16):
        writer.write(data)
        await writer.drain()


async def test_exit_without_keep_warm_makes_the_pool_step_aside(monkeypatch) -> None:
    """An exit that answers keep-warm with 07 (an older one): streams dial as before."""
    monkeypatch.setattr(ExitConnection, "_may_keep_warm", lambda self, request: False)
    rig = await warm_rig()
    try:
        assert await wait_for(lambda: failures(rig.worker, "unsupported") >= 1)
        await asyncio.sleep(3 * HB)
        assert failures(rig.worker, "unsupported") == 1  # asked once, not again and again
        await both_ways(rig, 1 << 20)
        assert used(rig.worker, "dialled") == 1 and warm(rig.worker) == 0
    finally:
        await close_rig(rig)


async def test_drain_closes_the_pool_on_both_ends() -> None:
    rig = await warm_rig()
    try:
        assert await wait_for(lambda: warm(rig.worker) == 2)
        await rig.worker.drain(0.1)
        assert warm(rig.worker) == 0
        assert await wait_for(lambda: metric(rig.exit.metrics, "relay_warm_carriers") == 0)
        assert metric(rig.exit.metrics, "relay_protocol_errors_total", stage="handshake") == 0
    finally:
        await close_rig(rig)


async def test_exit_drain_closes_its_warm_carriers() -> None:
    rig = await warm_rig()
    try:
        assert await wait_for(lambda: warm(rig.worker) == 2)
        await rig.exit.drain(0.1)
        assert metric(rig.exit.metrics, "relay_warm_carriers") == 0
        assert await wait_for(lambda: failures(rig.worker, "lost") >= 2)
    finally:
        await close_rig(rig)


def test_settings_default() -> None:
    assert worker_settings(None, ("127.0.0.1", 1), warm_carriers=2).warm_carriers == 2
    from relay.worker import WorkerSettings

    assert WorkerSettings().warm_carriers == 2


async def test_reload_that_removes_the_key_closes_its_warm_carriers() -> None:
    rig = await warm_rig()
    try:
        assert await wait_for(lambda: warm(rig.worker) == 2)
        rig.exit.reload({"someone-else": SECRET}, rig.exit.settings.policy)
        assert metric(rig.exit.metrics, "relay_warm_carriers") == 0
        assert await wait_for(lambda: failures(rig.worker, "lost") >= 2)
        # the pool tries again, but the exit no longer knows the key
        assert await wait_for(lambda: failures(rig.worker, "open-failed") >= 1)
        assert metric(rig.worker.metrics, "relay_auth_failures_total", reason="exit-hello") >= 1
        assert warm(rig.worker) == 0
    finally:
        await close_rig(rig)
