"""The exit's limits hold against floods and hostile clients, and each refuses only what is
over it: a stream over the per-key or total stream limit gets REPLY 01 on its own stream
while the carrier and the session's other streams go on (also under a concurrent flood, and
against a worker that opens and resets streams to wear the count down); a HELLO over the
carrier limits gets status busy; the memory budget over all sessions holds destinations back;
the handshake limit evicts silent clients; the handshake byte cap; and 1000 slow or silent
connections against a real relay-exit process while workers open streams and carriers
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

from relay.exit.daemon import RelayExit
from relay.proto import hello as hl
from relay.proto import mux
from relay.proto import socks5 as s5
from relay.worker.daemon import RelayWorker
from tests.loopback.test_abuse import HandCarrier, answered_reset
from tests.support.helpers import (
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
from tests.support.proc import terminate
from tests.support.relays import parse_samples, write_config
from tests.support.sshd import Sshd

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


def carriers_at_exit(relay_exit: RelayExit) -> int:
    return sum(len(m.conns) for m in relay_exit.sessions.values())


# -- stream limits: one stream refused, nothing else ------------------------------------------


@pytest.mark.parametrize("limit", ["streams", "streams-per-key"])
async def test_a_stream_over_the_limit_gets_reply_01_and_nothing_else_changes(
    limit: str,
) -> None:
    """At the limit an OPEN is answered REPLY 01 on its stream; the carrier stays, the open
    streams echo on, the refusal is counted, and a slot that frees up is usable at once."""
    overrides = {"max_streams": 2} if limit == "streams" else {"max_streams_per_key": 2}
    relay_exit = RelayExit(exit_settings(**overrides))
    await relay_exit.start()
    servers = Servers()
    carrier = await HandCarrier.open(relay_exit.address)
    try:
        port = await servers.start(echo_handler)
        for sid in (1, 3):
            carrier.open_stream(sid, "127.0.0.1", port, b"open %d\n" % sid)
            assert (await carrier.reply(sid)).code == s5.SUCCEEDED
            assert await carrier.read(sid, 7) == b"open %d\n" % sid
        carrier.open_stream(5, "127.0.0.1", port, b"one too many\n")
        assert (await carrier.reply(5)).code == s5.GENERAL_FAILURE
        answered_reset(carrier, 5)
        assert metric(relay_exit.metrics, "relay_limit_hits_total", limit=limit) == 1
        assert metric(relay_exit.metrics, "relay_streams_total", result="limit") == 1
        for sid in (1, 3):  # the others never noticed
            assert await carrier.echo(sid, b"still %d\n" % sid) == b"still %d\n" % sid
        assert not carrier.closed and carriers_at_exit(relay_exit) == 1
        assert len(servers.writers) == 2  # the refused stream was never dialled
        # stream 1 ends (a reset from the worker): its slot is free for the next OPEN
        carrier.send(mux.encode_reset(1, mux.RST_PEER_RESET, "done"))
        assert await wait_for(lambda: relay_exit.streams_per_key[KEY_ID] == 1)
        carrier.open_stream(7, "127.0.0.1", port, b"seven\n")
        assert (await carrier.reply(7)).code == s5.SUCCEEDED
        assert await carrier.read(7, 6) == b"seven\n"
        assert relay_exit.opening == 0 and len(relay_exit.pumps) == 2
    finally:
        carrier.close()
        await relay_exit.stop()
        await servers.close()


async def test_opening_and_resetting_streams_does_not_wear_the_key_limit_down() -> None:
    """OPEN and RST in one record (the worker gave the stream up while the exit dials), again
    and again: each releases its own slot once, so the limit still counts the live streams."""
    relay_exit = RelayExit(exit_settings(max_streams_per_key=3))
    await relay_exit.start()
    servers = Servers()
    carrier = await HandCarrier.open(relay_exit.address)
    try:
        port = await servers.start(echo_handler)
        for sid in (1, 3, 5):
            carrier.open_stream(sid, "127.0.0.1", port, b"live\n")
            assert await carrier.read(sid, 5) == b"live\n"
        address = s5.encode_address("127.0.0.1", port)
        for sid in range(7, 27, 2):
            carrier.send(mux.encode_open(sid, address), mux.encode_reset(sid, 1, "gave up"))
        for sid in range(7, 27, 2):  # the exit answers each give-up ...
            await carrier.expect(lambda f, sid=sid: isinstance(f, mux.Reset) and f.stream == sid)
        assert await wait_for(lambda: relay_exit.opening == 0)  # ... and ends its dial
        # the three live streams still hold their slots: a fourth is refused
        carrier.open_stream(101, "127.0.0.1", port, b"over\n")
        assert (await carrier.reply(101)).code == s5.GENERAL_FAILURE
        assert relay_exit.streams_per_key[KEY_ID] == 3 and relay_exit.opening == 0
        for sid in (1, 3, 5):
            assert await carrier.echo(sid, b"ok\n") == b"ok\n"
    finally:
        carrier.close()
        await relay_exit.stop()
        await servers.close()


async def test_stream_flood_from_one_key_is_refused_clearly_others_unaffected(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    relay_exit = RelayExit(
        exit_settings(secrets={KEY_ID: SECRET, OTHER_KEY: OTHER_SECRET}, max_streams_per_key=5)
    )
    await relay_exit.start()
    # refusals as SOCKS5 replies (the exit's REPLY code), not resets
    flooder = RelayWorker(worker_settings(None, relay_exit.address, no_optimistic=True))
    other = RelayWorker(
        worker_settings(None, relay_exit.address, key_id=OTHER_KEY, secret=OTHER_SECRET)
    )
    await flooder.start()
    await other.start()
    servers = Servers()
    streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        port = await servers.start(echo_handler)
        assert await wait_for(lambda: carriers_at_exit(relay_exit) == 4)
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
        # no carrier was closed for it (both workers still have the two they started with)
        assert carriers_at_exit(relay_exit) == 4
        assert metric(flooder.metrics, "relay_carriers_total", result="ok") == 2
        assert metric(flooder.metrics, "relay_reconnects_total") == 0
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


# -- carrier limits: a HELLO refused with status busy ----------------------------------------


async def test_carrier_limits_refuse_a_hello_with_busy_and_nothing_else() -> None:
    relay_exit = RelayExit(
        exit_settings(
            secrets={KEY_ID: SECRET, OTHER_KEY: OTHER_SECRET},
            max_carriers=3,
            max_carriers_per_key=2,
        )
    )
    await relay_exit.start()
    servers = Servers()
    carriers: list[HandCarrier] = []
    try:
        port = await servers.start(echo_handler)
        first = await HandCarrier.open(relay_exit.address)
        carriers.append(first)
        carriers.append(await HandCarrier.open(relay_exit.address, join=first))
        assert [c.status for c in carriers] == [hl.OK, hl.OK]
        first.open_stream(1, "127.0.0.1", port, b"up\n")
        assert await first.read(1, 3) == b"up\n"
        # the key has its 2 carriers: a third is refused, whether it joins or starts anew
        for join in (first, None):
            refused = await HandCarrier.open(relay_exit.address, join=join)
            assert refused.status == hl.BUSY and refused.est is None
            assert await refused.closed_by_exit()
        assert metric(relay_exit.metrics, "relay_limit_hits_total", limit="carriers-per-key") == 2
        # another key still gets in, up to the total of 3 carriers
        other = await HandCarrier.open(relay_exit.address, key_id=OTHER_KEY, secret=OTHER_SECRET)
        carriers.append(other)
        assert other.status == hl.OK
        refused = await HandCarrier.open(relay_exit.address, key_id=OTHER_KEY, secret=OTHER_SECRET)
        assert refused.status == hl.BUSY
        assert metric(relay_exit.metrics, "relay_limit_hits_total", limit="carriers") == 1
        # refusals are limits, not failed authentication; the stream never noticed
        assert metric(relay_exit.metrics, "relay_auth_failures_total", reason="carriers") == 0
        assert await first.echo(1, b"still\n") == b"still\n"
        assert relay_exit.carriers == 3 and relay_exit.carriers_per_key[KEY_ID] == 2
        # a carrier that goes makes room for the next
        carriers[1].close()
        assert await wait_for(lambda: relay_exit.carriers == 2)
        again = await HandCarrier.open(relay_exit.address, join=first)
        carriers.append(again)
        assert again.status == hl.OK
    finally:
        for carrier in carriers:
            carrier.close()
        await relay_exit.stop()
        await servers.close()
    assert relay_exit.carriers == 0 and not relay_exit.carriers_per_key


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


async def test_buffered_bytes_stay_near_the_budget_and_every_byte_arrives(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Workers that acknowledge nothing (one session each): the exit holds at most a window
    per stream, and over --max-buffered it stops reading destinations altogether."""
    caplog.set_level(logging.INFO, logger="relay")
    budget, window = 1 << 20, 512 * 1024
    relay_exit = RelayExit(exit_settings(max_buffered=budget, replay_buffer=window, heartbeat=30))
    await relay_exit.start()
    servers = Servers()
    size = 3 * 1024 * 1024
    silent: list[HandCarrier] = []

    def scanned() -> int:
        return sum(
            m.driver.session.replay_bytes(sid)
            for m in relay_exit.sessions.values()
            for sid in m.driver.session.streams
        )

    async def silent_worker() -> HandCarrier:
        carrier = await HandCarrier.open(relay_exit.address)
        carrier.open_stream(1, "127.0.0.1", port, b"GET\n")
        assert (await carrier.reply(1)).code == s5.SUCCEEDED
        silent.append(carrier)
        return carrier

    try:
        port = await servers.start(sender(size))
        # Nobody acknowledges: three windows fill (1.5 MiB) and trip the 1 MiB budget ...
        for _ in range(3):
            await silent_worker()
        assert await wait_for(lambda: relay_exit.over_budget, 15)
        # ... and streams that start now do not read from their destinations at all.
        for _ in range(9):
            await silent_worker()
        peak = 0
        for _ in range(10):
            peak = max(peak, relay_exit.check_buffers())
            await asyncio.sleep(0.1)
        # each of the three may overshoot its window by one read (256 KiB); the nine held
        # streams hold nothing, where twelve streams could hold 6 MiB and more
        assert budget < peak <= 3 * (window + 256 * 1024), peak
        holding = [m for m in relay_exit.sessions.values() if m.driver.session.replay_bytes(1)]
        assert len(relay_exit.pumps) == 12 and len(holding) == 3
        # the running tally the budget check reads is the sum over the streams
        assert relay_exit.buffered() == scanned()

        async def check(carrier: HandCarrier) -> bool:
            data = await carrier.read_to_fin(1)
            body, digest = data[:-64], data[-64:]
            return len(body) == size and hashlib.sha256(body).hexdigest().encode() == digest

        assert all(await asyncio.gather(*(check(c) for c in silent)))
        assert await wait_for(lambda: not relay_exit.over_budget)
        assert relay_exit.buffered() == scanned()
        assert metric(relay_exit.metrics, "relay_limit_hits_total", limit="buffered") >= 1
        assert any("over --max-buffered" in r.message for r in caplog.records)
        assert any("back under --max-buffered" in r.message for r in caplog.records)
    finally:
        for carrier in silent:
            carrier.close()
        await relay_exit.stop()
        await servers.close()


# -- handshakes ----------------------------------------------------------------------------


async def test_full_handshake_table_evicts_the_oldest_unauthenticated() -> None:
    relay_exit = RelayExit(exit_settings(max_handshakes=10))
    await relay_exit.start()
    servers = Servers()
    silent: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    carriers: list[HandCarrier] = []
    try:
        port = await servers.start(echo_handler)
        for i in range(3):  # each worker's carrier pushes the oldest silent client out
            while len(silent) < 10 + i:
                silent.append(await asyncio.open_connection(*relay_exit.address))
            assert await wait_for(lambda: relay_exit.handshakes == 10)
            carrier = await HandCarrier.open(relay_exit.address)
            carriers.append(carrier)
            assert carrier.status == hl.OK
            carrier.open_stream(1, "127.0.0.1", port, b"in\n")
            assert await carrier.read(1, 3) == b"in\n"
            with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(silent[i][0].readexactly(1), 5)
        assert metric(relay_exit.metrics, "relay_limit_hits_total", limit="handshakes") == 3
        assert relay_exit.handshakes == 9
    finally:
        for _, writer in silent:
            writer.close()
        for carrier in carriers:
            carrier.close()
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
    """Nothing a client sends before its carrier (or plain stream) starts is buffered beyond
    the cap: not a HELLO followed by a flood in the same read, not a plain SOCKS5 client
    that keeps sending while the exit dials."""
    from relay.exit.connection import HANDSHAKE_BYTES_MAX, ExitConnection

    relay_exit = RelayExit(exit_settings(allow_plain=True))
    hello = hl.encode_hello(SECRET, KEY_ID, int(time.time() * 1000), os.urandom(16))
    plain = (
        b"\x05\x01\x02"
        + s5.Socks5Client.userpass(KEY_ID, SECRET.decode())
        + s5.Socks5Client.request(s5.CMD_CONNECT, "127.0.0.1", 9)
    )
    half = bytes(HANDSHAKE_BYTES_MAX // 2)
    carrier_flood = [b"\x05\x01\x80" + hello + bytes(HANDSHAKE_BYTES_MAX)]
    for flights in (carrier_flood, [plain, half, half]):
        conn = ExitConnection(relay_exit)
        transport = FakeTransport()
        conn.connection_made(transport)
        for flight in flights:
            conn.data_received(flight)
        assert transport.aborted and not conn.in_handshake and relay_exit.handshakes == 0
        assert conn.mux is None and not relay_exit.sessions
        conn.connection_lost(None)
    assert metric(relay_exit.metrics, "relay_limit_hits_total", limit="handshake-bytes") == 2
    # the plain client's dial task finds the connection gone and gives its slot back
    assert await wait_for(lambda: relay_exit.opening == 0 and not relay_exit.streams_per_key)
    assert not relay_exit.pumps


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
    late = RelayWorker(worker_settings(sshd, ("127.0.0.1", port)))
    servers = Servers()
    hostile: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        echo_port = await servers.start(echo_handler)
        # The subject is hostile clients, not the first login: wait for the carriers (a
        # first attempt that fails is retried), and say why if they never come.
        client = worker.exits[("127.0.0.1", port)]
        try:
            await asyncio.wait_for(client.ready.wait(), 30)
        except asyncio.TimeoutError:
            pytest.fail(f"the worker got no carrier in 30 s: {client.why}")
        await legit_latencies(worker, echo_port, 3)  # warm up: code paths
        await asyncio.sleep(0.5)
        baseline_fds = fd_count(proc.pid)
        quiet = await legit_latencies(worker, echo_port, 30)

        # 500 clients send one byte of a greeting and stall, 500 connect and send nothing
        async def connect(one_byte: bool) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if one_byte:
                writer.write(b"\x05")
            return reader, writer

        async def new_worker_in() -> float:
            """A worker that starts now: its carriers' HELLOs must get past the hostile
            handshakes (evicting them, as the table is full); seconds to its first echo."""
            begun = time.monotonic()
            await late.start()
            await legit_latencies(late, echo_port, 1)
            return time.monotonic() - begun

        started = time.monotonic()
        for batch in range(10):
            hostile += await asyncio.gather(*(connect(batch % 2 == 0) for _ in range(100)))
        opened_in = time.monotonic() - started
        late_in = asyncio.ensure_future(new_worker_in())
        loaded = await legit_latencies(worker, echo_port, 30)
        late_seconds = await asyncio.wait_for(late_in, 30)
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
        await late.stop()  # its carriers go: the exit's descriptors can settle
        samples = scrape(metrics_port)
        timeouts = samples.get('relay_protocol_errors_total{stage="handshake-timeout"}', 0.0)
        evicted = samples.get('relay_limit_hits_total{limit="handshakes"}', 0.0)
        assert timeouts + evicted == 1000, samples
        assert samples.get('relay_limit_hits_total{limit="handshake-timeout"}') == timeouts
        assert samples['relay_streams_total{result="ok"}'] >= 60
        # the first worker's, through it all (the late worker's leave as the exit reads their
        # close, which may be after this scrape)
        assert await asyncio.to_thread(_carriers_settle, metrics_port, 2.0) == 2.0
        assert metric(worker.metrics, "relay_reconnects_total") == 0
        assert await asyncio.to_thread(_settles, proc.pid, baseline_fds)
        RESULTS.update(
            quiet=summary(quiet),
            under_load=summary(loaded),
            hostile_open_s=round(opened_in, 2),
            measured_within_s=round(measured_in, 2),
            new_worker_first_echo_s=round(late_seconds, 2),
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
        await late.stop()
        await worker.stop()
        await servers.close()


def _carriers_settle(port: int, want: float, timeout: float = 10.0) -> float:
    deadline = time.monotonic() + timeout
    while True:
        active = scrape(port)["relay_carriers_active"]
        if active == want or time.monotonic() > deadline:
            return active
        time.sleep(0.1)


def _settles(pid: int, baseline: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fd_count(pid) <= baseline:
            return True
        time.sleep(0.1)
    return fd_count(pid) <= baseline
