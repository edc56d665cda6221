"""The exit's limits hold against floods and hostile clients: per-key stream limit under a
concurrent flood (clear refusal, other keys unaffected), the memory budget over all replay
buffers, the handshake limit that evicts silent clients, the handshake byte cap, and 1000
slow or silent connections against a real relay-exit process while a worker opens streams
(latency measured and reported, descriptors back to baseline)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from python_socks import ProxyError
from python_socks.async_.asyncio import Proxy

from relay.carrier import new_opener
from relay.exit import RelayExit
from relay.proto import frames as fr
from relay.proto import hello as hl
from relay.proto import socks5 as s5
from relay.proto.opener import Connected
from relay.proto.stream import TunnelStream
from relay.worker import RelayWorker
from tests.helpers import (
    KEY_ID,
    PASSWORD,
    SECRET,
    USER,
    Servers,
    echo_handler,
    exit_settings,
    metric,
    wait_for,
    worker_settings,
)
from tests.lab._proc import terminate
from tests.lab.relays import parse_samples, write_config
from tests.lab.sshd import Sshd

BIN = Path(sys.executable).parent
OTHER_KEY, OTHER_SECRET = "worker-2", b"fedcba9876543210fedcba9876543210"
RESULTS: dict[str, Any] = {}


def proxy(worker: RelayWorker) -> Proxy:
    return Proxy.from_url(f"socks5://{USER}:{PASSWORD}@127.0.0.1:{worker.address[1]}")


async def open_stream(
    worker: RelayWorker, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = await proxy(worker).connect("127.0.0.1", port, timeout=20)
    return await asyncio.open_connection(sock=sock)


async def echo(pair: tuple[asyncio.StreamReader, asyncio.StreamWriter], data: bytes) -> bytes:
    reader, writer = pair
    writer.write(data)
    return await asyncio.wait_for(reader.readexactly(len(data)), 10)


# -- a stream flood from one key -------------------------------------------------------------


async def test_stream_flood_from_one_key_is_refused_clearly_others_unaffected(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    relay_exit = RelayExit(
        exit_settings(keys={KEY_ID: SECRET, OTHER_KEY: OTHER_SECRET}, max_streams_per_key=5)
    )
    await relay_exit.start()
    # refusals as SOCKS5 replies, not resets
    flooder = RelayWorker(worker_settings(None, relay_exit.address, optimistic=False))
    other = RelayWorker(
        worker_settings(None, relay_exit.address, key_id=OTHER_KEY, secret=OTHER_SECRET)
    )
    await flooder.start()
    await other.start()
    servers = Servers()
    streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        port = await servers.start(echo_handler)
        # 30 stream requests at once: exactly 5 pass, however the requests interleave
        results = await asyncio.gather(
            *(open_stream(flooder, port) for _ in range(30)), return_exceptions=True
        )
        opened = [r for r in results if isinstance(r, tuple)]
        refused = [r for r in results if isinstance(r, ProxyError)]
        assert len(opened) == 5 and len(refused) == 25, results
        assert {r.error_code for r in refused} == {s5.GENERAL_FAILURE}
        streams += opened
        limit = metric(relay_exit.metrics, "relay_limit_hits_total", limit="streams-per-key")
        assert limit == 25
        assert metric(relay_exit.metrics, "relay_streams_total", result="limit") == 25
        lines = [r for r in caplog.records if r.message == "stream limit reached"]
        assert len(lines) == 25 and "streams-per-key" in str(lines[0].__dict__["fields"])
        # the other key is unaffected, and the flooder's open streams still work
        mine = [await open_stream(other, port) for _ in range(5)]
        streams += mine
        for i, pair in enumerate(mine + opened):
            assert await echo(pair, b"still fine %d\n" % i) == b"still fine %d\n" % i
        # a slot comes back when a stream ends
        opened[0][1].close()
        await wait_for(lambda: relay_exit.streams_per_key[KEY_ID] == 4)
        streams.append(await open_stream(flooder, port))
        assert relay_exit.streams_per_key == {KEY_ID: 5, OTHER_KEY: 5}
        assert relay_exit.opening == 0
    finally:
        for _, writer in streams:
            writer.close()
        await flooder.stop()
        await other.stop()
        await relay_exit.stop()
        await servers.close()


# -- the memory budget ------------------------------------------------------------------------


def sender(size: int) -> Any:
    """A destination that answers a request line with ``size`` random bytes and their digest."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        data = os.urandom(size)
        for start in range(0, size, 1 << 18):
            writer.write(data[start : start + (1 << 18)])
            await writer.drain()
        writer.write(hashlib.sha256(data).hexdigest().encode())
        await writer.drain()
        writer.write_eof()

    return handle


class SilentWorker:
    """One tunnel stream spoken by hand with the project's sans-IO cores: it acknowledges
    nothing until told to read, so the exit's replay buffer fills whatever the kernel holds."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.stream = TunnelStream(
            heartbeat=30.0, now=asyncio.get_running_loop().time(), replay_limit=512 * 1024
        )
        self.early = b""

    @classmethod
    async def open(cls, address: tuple[str, int], port: int, request: bytes) -> SilentWorker:
        opener = new_opener(SECRET, KEY_ID, 30.0, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(*address)
        writer.write(opener.first_flight())
        events: list[Any] = []
        while not any(isinstance(e, Connected) for e in events):
            data = await asyncio.wait_for(reader.read(4096), 10)
            assert data, events
            events += opener.receive(data)
        assert events[-1].code == s5.SUCCEEDED, events
        worker = cls(reader, writer)
        worker.early = opener.trailing()
        now = asyncio.get_running_loop().time()
        writer.writelines(worker.stream.send(request, now))
        return worker

    async def read_all(self) -> bytes:
        """Read and acknowledge until the exit's FIN."""
        got = bytearray()
        data, self.early = self.early, b""
        loop = asyncio.get_running_loop()
        while True:
            events, reply = self.stream.receive(data, loop.time())
            for event in events:
                if isinstance(event, fr.Data):
                    got += event.payload
            if reply:
                self.writer.write(reply)
            if self.stream.fin_received:
                return bytes(got)
            data = await asyncio.wait_for(self.reader.read(1 << 18), 30)
            assert data, "exit closed before FIN"


async def test_buffered_bytes_stay_near_the_budget_and_every_byte_arrives(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    budget, replay = 1 << 20, 512 * 1024
    relay_exit = RelayExit(exit_settings(max_buffered=budget, replay_buffer=replay, heartbeat=30))
    await relay_exit.start()
    servers = Servers()
    size = 3 * 1024 * 1024
    workers: list[SilentWorker] = []
    try:
        port = await servers.start(sender(size))
        # Nobody reads: three replay buffers fill (1.5 MiB) and trip the 1 MiB budget ...
        for _ in range(3):
            workers.append(await SilentWorker.open(relay_exit.address, port, b"GET\n"))
        assert await wait_for(lambda: relay_exit.over_budget, 15)
        # ... and streams that start now do not read from their destinations at all.
        for _ in range(9):
            workers.append(await SilentWorker.open(relay_exit.address, port, b"GET\n"))
        peak = 0
        for _ in range(10):
            peak = max(peak, relay_exit.check_buffers())
            await asyncio.sleep(0.1)
        # each of the three may overshoot its replay buffer by one read (256 KiB); the nine
        # held streams hold nothing, where twelve streams could hold 6 MiB and more
        assert budget < peak <= 3 * (replay + 256 * 1024), peak
        holding = [p for p in relay_exit.pumps if p.stream.replay_bytes]  # type: ignore[union-attr]
        assert len(relay_exit.pumps) == 12 and len(holding) == 3
        # the running tally the budget check reads is the sum over the streams
        scanned = sum(p.stream.replay_bytes for p in relay_exit.pumps)  # type: ignore[union-attr]
        assert relay_exit.replay_tally.bytes == scanned

        async def check(worker: SilentWorker) -> bool:
            data = await worker.read_all()
            body, digest = data[:-64], data[-64:]
            return len(body) == size and hashlib.sha256(body).hexdigest().encode() == digest

        assert all(await asyncio.gather(*(check(w) for w in workers)))
        assert not relay_exit.over_budget
        scanned = sum(p.stream.replay_bytes for p in relay_exit.pumps)  # type: ignore[union-attr]
        assert relay_exit.replay_tally.bytes == scanned
        assert metric(relay_exit.metrics, "relay_limit_hits_total", limit="buffered") >= 1
        assert any("over --max-buffered" in r.message for r in caplog.records)
        assert any("back under --max-buffered" in r.message for r in caplog.records)
    finally:
        for worker in workers:
            worker.writer.close()
        await relay_exit.stop()
        await servers.close()


# -- handshakes ----------------------------------------------------------------------------


async def test_full_handshake_table_evicts_the_oldest_unauthenticated() -> None:
    relay_exit = RelayExit(exit_settings(max_handshakes=10))
    await relay_exit.start()
    worker = RelayWorker(worker_settings(None, relay_exit.address))
    await worker.start()
    servers = Servers()
    silent: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        port = await servers.start(echo_handler)
        for i in range(3):  # each legitimate stream pushes the oldest silent client out
            while len(silent) < 10 + i:
                silent.append(await asyncio.open_connection(*relay_exit.address))
            assert await wait_for(lambda: relay_exit.handshakes == 10)
            pair = await open_stream(worker, port)
            assert await echo(pair, b"in\n") == b"in\n"
            pair[1].close()
            with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(silent[i][0].readexactly(1), 5)
        assert metric(relay_exit.metrics, "relay_limit_hits_total", limit="handshakes") == 3
        assert relay_exit.handshakes == 9
    finally:
        for _, writer in silent:
            writer.close()
        await worker.stop()
        await relay_exit.stop()
        await servers.close()


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.aborted = False
        self.paused = False

    def write(self, data: Any) -> None:
        self.written += bytes(data)

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("192.0.2.7", 1234) if name == "peername" else default


async def test_handshake_byte_cap() -> None:
    """Nothing a client sends before its stream starts is buffered beyond the cap."""
    from relay.exit import HANDSHAKE_BYTES_MAX, ExitConnection

    relay_exit = RelayExit(exit_settings())
    conn = ExitConnection(relay_exit)
    transport = FakeTransport()
    conn.connection_made(transport)
    flight = (
        b"\x05\x01\x80"
        + hl.encode_hello(SECRET, KEY_ID, int(time.time() * 1000), os.urandom(16))
        + s5.Socks5Client.request(s5.CMD_CONNECT, "127.0.0.1", 9)
    )
    conn.data_received(flight + bytes(HANDSHAKE_BYTES_MAX))
    assert transport.aborted and not conn.in_handshake and relay_exit.handshakes == 0
    assert metric(relay_exit.metrics, "relay_limit_hits_total", limit="handshake-bytes") == 1
    conn.connection_lost(None)


# -- slow and hostile clients against a real relay-exit ------------------------------------------


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture
def nofile() -> Iterator[None]:
    """Enough descriptors for 1000 hostile clients plus the chain, in this process and the exit
    it starts (CI may run with a soft limit of 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 8192 if hard == resource.RLIM_INFINITY else min(8192, hard)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def exit_process(
    tmp_path: Path, nofile: None
) -> Iterator[tuple[subprocess.Popen[bytes], int, int]]:
    """relay-exit as a process (defaults but a 4 s handshake timeout); (proc, port, metrics)."""
    keys = tmp_path / "exit.keys"
    keys.write_text(f"{KEY_ID} {SECRET.decode()}\n")
    keys.chmod(0o600)
    port, metrics_port = free_port(), free_port()
    config = write_config(tmp_path / "exit.toml", "exit", {
        "listen": f"127.0.0.1:{port}", "keys": str(keys), "allow": ["127.0.0.1/32:*"],
        "metrics": f"127.0.0.1:{metrics_port}", "handshake_timeout": 4.0, "heartbeat": 1.0,
        "log_level": "warning",
    })  # fmt: skip
    log = (tmp_path / "exit.log").open("wb")
    proc = subprocess.Popen([str(BIN / "relay-exit"), "--config", str(config)], stderr=log)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "exit.log").read_text()
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield proc, port, metrics_port
    finally:
        terminate(popens=[proc])
        log.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return parse_samples(response.read().decode())


async def legit_latencies(worker: RelayWorker, port: int, count: int) -> list[float]:
    """Open ``count`` streams one after the other; seconds from SOCKS5 connect to echo."""
    times = []
    for i in range(count):
        started = time.monotonic()
        pair = await open_stream(worker, port)
        assert await echo(pair, b"%d\n" % i) == b"%d\n" % i
        times.append(time.monotonic() - started)
        pair[1].close()
    return times


def summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "n": len(ordered),
        "p50_ms": round(statistics.median(ordered) * 1000, 1),
        "p95_ms": round(ordered[int(len(ordered) * 0.95) - 1] * 1000, 1),
        "max_ms": round(ordered[-1] * 1000, 1),
    }


async def test_hostile_clients_do_not_keep_a_worker_out(
    exit_process: tuple[subprocess.Popen[bytes], int, int], sshd: Sshd
) -> None:
    proc, port, metrics_port = exit_process
    worker = RelayWorker(worker_settings(sshd, ("127.0.0.1", port)))
    await worker.start()
    servers = Servers()
    hostile: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        echo_port = await servers.start(echo_handler)
        await legit_latencies(worker, echo_port, 3)  # warm up: SSH connection, code paths
        await asyncio.sleep(0.5)
        baseline_fds = fd_count(proc.pid)
        quiet = await legit_latencies(worker, echo_port, 30)

        # 500 clients send one byte of a greeting and stall, 500 connect and send nothing
        async def connect(one_byte: bool) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if one_byte:
                writer.write(b"\x05")
            return reader, writer

        started = time.monotonic()
        for batch in range(10):
            hostile += await asyncio.gather(*(connect(batch % 2 == 0) for _ in range(100)))
        opened_in = time.monotonic() - started
        loaded = await legit_latencies(worker, echo_port, 30)
        measured_in = time.monotonic() - started
        samples = scrape(metrics_port)
        timeouts_during = samples.get('relay_protocol_errors_total{stage="handshake-timeout"}', 0.0)

        async def closed_after(reader: asyncio.StreamReader) -> float:
            with contextlib.suppress(ConnectionResetError):
                await asyncio.wait_for(reader.read(), 15)
            return time.monotonic() - started

        closed = await asyncio.gather(*(closed_after(r) for r, _ in hostile))
        for _, writer in hostile:
            writer.close()
        samples = scrape(metrics_port)
        timeouts = samples.get('relay_protocol_errors_total{stage="handshake-timeout"}', 0.0)
        evicted = samples.get('relay_limit_hits_total{limit="handshakes"}', 0.0)
        assert timeouts + evicted == 1000, samples
        assert samples.get('relay_limit_hits_total{limit="handshake-timeout"}') == timeouts
        assert samples['relay_streams_total{result="ok"}'] >= 60
        assert await asyncio.to_thread(_settles, proc.pid, baseline_fds)
        RESULTS.update(
            quiet=summary(quiet),
            under_load=summary(loaded),
            hostile_open_s=round(opened_in, 2),
            measured_within_s=round(measured_in, 2),
            timeouts_while_measuring=timeouts_during,
            hostile_closed_s={"first": round(min(closed), 2), "last": round(max(closed), 2)},
            timeouts=timeouts,
            evicted=evicted,
            exit_fds={"baseline": baseline_fds, "after": fd_count(proc.pid)},
        )
        print("\nhostile-clients " + json.dumps(RESULTS))
    finally:
        for _, writer in hostile:
            writer.close()
        await worker.stop()
        await servers.close()


def _settles(pid: int, baseline: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fd_count(pid) <= baseline:
            return True
        time.sleep(0.1)
    return fd_count(pid) <= baseline
