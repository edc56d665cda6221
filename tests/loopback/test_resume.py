"""Streams survive a dying carrier: resume after resets and black holes, exit parking,
refused resumes, several exits. On loopback with direct carriers through a Cutter; the
SSH and firewall versions are in test_resume_lab.py."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from relay.config.values import HostPort, LoginTarget
from relay.exit.daemon import RelayExit
from relay.proto import hello as hl
from relay.worker.daemon import RelayWorker
from tests.support.cutter import Cutter
from tests.support.helpers import (
    KEY_ID,
    PASSWORD,
    USER,
    Servers,
    echo_handler,
    exit_settings,
    metric,
    wait_for,
    worker_settings,
)
from tests.support.sshd import Sshd, start_sshd


def both_ways_handler(payload: bytes, received: asyncio.Queue[str]) -> Any:
    """Send ``payload`` and read the client's bytes at the same time; report their digest."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def send() -> None:
            view = memoryview(payload)
            for start in range(0, len(view), 1 << 18):
                writer.write(view[start : start + (1 << 18)])
                await writer.drain()
            writer.write_eof()

        sender = asyncio.ensure_future(send())
        digest = hashlib.sha256()
        while data := await reader.read(1 << 18):
            digest.update(data)
        received.put_nowait(digest.hexdigest())
        await sender

    return handle


@dataclass
class Rig:
    exit: RelayExit
    worker: RelayWorker
    cutter: Cutter
    servers: Servers

    async def open(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        from python_socks.async_.asyncio import Proxy

        url = f"socks5://{USER}:{PASSWORD}@127.0.0.1:{self.worker.address[1]}"
        sock = await Proxy.from_url(url).connect("127.0.0.1", port, timeout=20)
        return await asyncio.open_connection(sock=sock)


async def make_rig(exit_overrides: dict[str, Any] | None = None, sshd: Sshd | None = None,
                   **worker_overrides: Any) -> Rig:  # fmt: skip
    relay_exit = RelayExit(exit_settings(heartbeat=0.5, **(exit_overrides or {})))
    await relay_exit.start()
    cutter = Cutter(relay_exit.address)
    await cutter.start()
    # A carrier black-holed during its HELLO holds recovery until connect_timeout.
    options: dict[str, Any] = {"heartbeat": 0.5, "reconnect_max": 0.5, "connect_timeout": 5.0}
    options.update(worker_overrides)
    worker = RelayWorker(worker_settings(sshd, cutter.address, **options))
    await worker.start()
    await _session_up(worker)
    return Rig(relay_exit, worker, cutter, Servers())


async def _session_up(worker: RelayWorker) -> None:
    """Wait for the worker's first session: a stream that arrives within a second of a failed
    first carrier attempt is refused at once (with the reason) rather than kept waiting, and
    these tests are about what happens after the start."""
    assert await wait_for(lambda: any(c.usable for c in worker.exits.values()), timeout=30)


async def close_rig(rig: Rig) -> None:
    await rig.worker.stop()
    await rig.cutter.close()
    await rig.exit.stop()
    await rig.servers.close()


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    r = await make_rig()
    try:
        yield r
    finally:
        await close_rig(r)


@pytest.mark.parametrize("via", ["direct", "ssh"])
async def test_bulk_both_ways_survives_resets_and_black_holes(via: str, sshd: Sshd) -> None:
    rig = await make_rig(sshd=sshd if via == "ssh" else None)
    try:
        await _bulk_both_ways(rig)
    finally:
        await close_rig(rig)


async def _bulk_both_ways(rig: Rig) -> None:
    size = 24 * 1024 * 1024
    down = os.urandom(size)
    up = os.urandom(size)
    received: asyncio.Queue[str] = asyncio.Queue()
    port = await rig.servers.start(both_ways_handler(down, received))
    reader, writer = await rig.open(port)
    # A small receive buffer keeps the download from racing ahead into kernel buffers, so
    # the stream is still in flight at every cut.
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)

    async def send() -> None:
        view = memoryview(up)
        for start in range(0, len(view), 1 << 16):
            writer.write(view[start : start + (1 << 16)])
            await writer.drain()
        writer.write_eof()

    kinds = ["reset", "blackhole", "reset", "blackhole", "reset"]
    random.shuffle(kinds)
    marks = sorted(random.sample(range(size // 10, size * 6 // 10), len(kinds)))
    performed: list[str] = []

    async def receive() -> bytes:
        """Read slowly and break the carrier when the download crosses each mark."""
        got = bytearray()
        while data := await reader.read(1 << 16):
            got += data
            if marks and len(got) >= marks[0]:
                marks.pop(0)
                kind = kinds[len(performed)]
                # wait until the previous cut was resumed (bytes may still be buffered) and a
                # carrier is up through the cutter (the stream may have moved to a carrier
                # that the same black hole took, before its replacement came)
                for _ in range(300):
                    resumed = metric(rig.worker.metrics, "relay_resumes_total", result="ok")
                    if resumed >= len(performed) and any(
                        not link.blackholed for link in rig.cutter.links
                    ):
                        break
                    await asyncio.sleep(0.05)
                count = rig.cutter.reset_all() if kind == "reset" else rig.cutter.blackhole_all()
                assert count >= 1, (
                    performed,
                    kind,
                    len(got),
                )
                performed.append(kind)
            await asyncio.sleep(0.002)  # a slow reader: back-pressure keeps the stream busy
        return bytes(got)

    sender = asyncio.ensure_future(send())
    got = await asyncio.wait_for(receive(), 120)
    await sender
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(down).hexdigest()
    assert await asyncio.wait_for(received.get(), 30) == hashlib.sha256(up).hexdigest()
    assert len(performed) == 5, performed
    # Each fault moved the stream to another carrier at least once (more when the carrier
    # it moved to died in the same fault).
    assert metric(rig.worker.metrics, "relay_resumes_total", result="ok") >= 5
    # The exit counts each stream it saw come back on another carrier; two faults close
    # together can be one move for it.
    assert metric(rig.exit.metrics, "relay_resumes_total", result="ok") >= 1
    writer.close()


async def test_idle_connection_survives_a_kill_while_idle_and_one_mid_message(rig: Rig) -> None:
    port = await rig.servers.start(echo_handler)
    reader, writer = await rig.open(port)
    writer.write(b"first\n")
    assert await reader.readline() == b"first\n"
    await asyncio.sleep(1.0)
    assert rig.cutter.reset_all() == 2  # both carriers die while the connection is idle
    await asyncio.sleep(1.0)
    writer.write(b"after idle\n")
    assert await asyncio.wait_for(reader.readline(), 10) == b"after idle\n"
    message = os.urandom(100_000)
    writer.write(message)  # the carrier dies while this is in flight
    rig.cutter.blackhole_all()
    assert await asyncio.wait_for(reader.readexactly(len(message)), 15) == message
    assert metric(rig.worker.metrics, "relay_resumes_total", result="ok") >= 2
    assert metric(rig.exit.metrics, "relay_parked_sessions") == 0
    writer.close()


async def test_exit_restart_resets_affected_connections_and_new_ones_work() -> None:
    rig = await make_rig()
    try:
        port = await rig.servers.start(echo_handler)
        reader, writer = await rig.open(port)
        writer.write(b"one\n")
        assert await reader.readline() == b"one\n"
        rig.cutter.refusing = True  # the worker cannot come back while the exit restarts
        rig.cutter.reset_all()
        await asyncio.sleep(0.3)
        address = rig.exit.address
        await rig.exit.stop()  # the parked session is gone with the process
        fresh = RelayExit(exit_settings(heartbeat=0.5, listen=HostPort("127.0.0.1", address[1])))
        await fresh.start()
        rig.exit = fresh
        rig.cutter.refusing = False
        started = time.monotonic()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(100), 15)
        assert time.monotonic() - started < 5
        assert metric(fresh.metrics, "relay_resumes_total", result="unknown") == 1
        assert metric(rig.worker.metrics, "relay_resumes_total", result="refused") == 1
        writer.close()
        reader, writer = await rig.open(port)
        writer.write(b"two\n")
        assert await reader.readline() == b"two\n"
        writer.close()
    finally:
        await close_rig(rig)


async def test_park_expires_and_late_resume_is_refused_as_expired() -> None:
    rig = await make_rig({"resume_timeout": 1.0})
    try:
        port = await rig.servers.start(echo_handler)
        reader, writer = await rig.open(port)
        writer.write(b"one\n")
        assert await reader.readline() == b"one\n"
        rig.cutter.refusing = True
        rig.cutter.reset_all()
        await asyncio.sleep(0.3)
        assert metric(rig.exit.metrics, "relay_parked_sessions") == 1
        await asyncio.sleep(1.5)
        assert metric(rig.exit.metrics, "relay_parked_sessions") == 0
        rig.cutter.refusing = False
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(100), 15)
        assert metric(rig.exit.metrics, "relay_resumes_total", result="expired") == 2
        writer.close()
    finally:
        await close_rig(rig)


async def _resume_answer(address: tuple[str, int], hello: bytes) -> int:
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(b"\x05\x01\x80" + hello)
        assert await reader.readexactly(2) == b"\x05\x80"
        decoded = hl.decode_reply(await reader.readexactly(hl.REPLY_SIZE))
        assert decoded is not None
        return decoded[0].status
    finally:
        writer.close()


async def test_resume_with_wrong_key_or_replayed_is_refused(rig: Rig) -> None:
    port = await rig.servers.start(echo_handler)
    reader, writer = await rig.open(port)
    writer.write(b"one\n")
    assert await reader.readline() == b"one\n"
    (session,) = rig.worker.exits.values()
    now = int(time.time() * 1000)
    wrong = hl.encode_hello(b"w" * 32, KEY_ID, now, os.urandom(16), session.session_id, 0)
    assert await _resume_answer(rig.exit.address, wrong) == hl.BAD_AUTH
    # Somebody who knows the secret of the key but not the session key gets no further.
    secret_signed = hl.encode_hello(
        exit_settings().secrets[KEY_ID], KEY_ID, now, os.urandom(16), session.session_id, 0
    )
    assert await _resume_answer(rig.exit.address, secret_signed) == hl.BAD_AUTH
    assert metric(rig.exit.metrics, "relay_resumes_total", result="bad-auth") == 2
    # A recorded, valid resume replayed: the nonce was seen.
    valid = hl.encode_hello(session.session_key, KEY_ID, now, os.urandom(16), session.session_id,
                            0)  # fmt: skip
    await _resume_answer(rig.exit.address, valid)
    assert await _resume_answer(rig.exit.address, valid) == hl.REPLAY
    assert metric(rig.exit.metrics, "relay_resumes_total", result="replay") == 1
    writer.close()


async def test_two_exits_losing_one_leaves_the_other_untouched() -> None:
    rig = await make_rig()
    second = RelayExit(exit_settings(heartbeat=0.5))
    await second.start()
    rig.worker.settings.exit += (HostPort(*second.address),)
    try:
        port = await rig.servers.start(echo_handler)
        streams = [await rig.open(port) for _ in range(4)]
        for i, (reader, writer) in enumerate(streams):
            writer.write(b"up %d\n" % i)
            assert await asyncio.wait_for(reader.readline(), 10) == b"up %d\n" % i
        assert metric(rig.exit.metrics, "relay_streams_active") == 2
        assert metric(second.metrics, "relay_streams_active") == 2
        await rig.exit.stop()  # the first exit goes away, resetting its own streams
        outcomes = []
        for i, (reader, writer) in enumerate(streams):
            writer.write(b"ping %d\n" % i)
            try:
                outcomes.append(await asyncio.wait_for(reader.readline(), 10))
            except (ConnectionError, asyncio.IncompleteReadError):
                outcomes.append(b"reset")
        assert sorted(outcomes).count(b"reset") == 2
        assert len([o for o in outcomes if o.startswith(b"ping")]) == 2
        for _ in range(3):  # new streams go to the survivor
            reader, writer = await rig.open(port)
            writer.write(b"new\n")
            assert await reader.readline() == b"new\n"
            writer.close()
        assert metric(second.metrics, "relay_streams_total", result="ok") >= 2
        for _, writer in streams:
            writer.close()
    finally:
        await second.stop()
        await close_rig(rig)


async def test_login_node_failover_resumes_streams(tmp_path) -> None:
    first = start_sshd(tmp_path / "login1")
    second = start_sshd(tmp_path / "login2", client_key=first.client_key)
    known = tmp_path / "known_hosts"
    known.write_text(first.known_hosts.read_text() + second.known_hosts.read_text())
    relay_exit = RelayExit(exit_settings(heartbeat=0.5))
    await relay_exit.start()
    servers = Servers()
    worker = RelayWorker(worker_settings(
        first, relay_exit.address, known_hosts=known, heartbeat=0.5, reconnect_max=0.5,
        login=(LoginTarget(first.user, first.host, first.port),
               LoginTarget(second.user, second.host, second.port)),
    ))  # fmt: skip
    await worker.start()
    try:
        await _session_up(worker)
        port = await servers.start(echo_handler)
        rig = Rig(relay_exit, worker, Cutter(relay_exit.address), servers)
        pairs = [await rig.open(port) for _ in range(3)]
        for reader, writer in pairs:
            writer.write(b"before\n")
            assert await reader.readline() == b"before\n"
        first.stop()  # the first login node goes away with its SSH connection
        for reader, writer in pairs:
            writer.write(b"after\n")
            assert await asyncio.wait_for(reader.readline(), 20) == b"after\n"
        assert worker.ssh is not None and worker.ssh.current is not None
        assert worker.ssh.current.port == second.port
        assert metric(worker.metrics, "relay_resumes_total", result="ok") >= 3
        for _, writer in pairs:
            writer.close()
    finally:
        await worker.stop()
        await relay_exit.stop()
        await servers.close()
        first.stop()
        second.stop()
