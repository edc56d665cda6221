"""bench.soak_traffic and bench.soak_sink on loopback, through a small SOCKS5 proxy defined
here: every kind of stream ends ok; a flipped byte is caught as corrupt (exit 3); the sink's
SIGUSR1 resets only flaky streams; its SIGUSR2 makes them hang (exit 4); SIGTERM finishes
gracefully, a second one aborts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import struct
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest

from bench.soak_sink import BLOCK, Checker, first_difference, pattern, pattern_chunks
from bench.soak_traffic import KINDS, parse_mix, share_slots

ROOT = Path(__file__).resolve().parents[2]
USER, PASSWORD = "glidein", "soak-pass"
BULK_SIZE = 1 << 20


def rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class Socks5:
    """SOCKS5, username/password, CONNECT only; half-closes and resets passed on. With
    ``corrupt_port``, the first connection to that port gets byte ``flip_at`` of its
    downstream flipped."""

    def __init__(self, corrupt_port: Optional[int] = None, flip_at: int = 20) -> None:
        self.corrupt_port = corrupt_port
        self.flip_at = flip_at
        self.flipped = False
        self.port = 0
        self.server: Optional[asyncio.AbstractServer] = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0, backlog=1024)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        up: Optional[asyncio.StreamWriter] = None
        try:
            _, n = await r.readexactly(2)
            if 2 not in await r.readexactly(n):
                w.write(b"\x05\xff")
                return
            w.write(b"\x05\x02")
            _, n = await r.readexactly(2)
            user = await r.readexactly(n)
            password = await r.readexactly((await r.readexactly(1))[0])
            if (user, password) != (USER.encode(), PASSWORD.encode()):
                w.write(b"\x01\x01")
                return
            w.write(b"\x01\x00")
            _, cmd, _, atyp = await r.readexactly(4)
            assert cmd == 1 and atyp == 1
            host = socket.inet_ntoa(await r.readexactly(4))
            port = int.from_bytes(await r.readexactly(2), "big")
            try:
                ur, up = await asyncio.open_connection(host, port)
            except OSError:
                w.write(b"\x05\x05\x00\x01" + bytes(6))
                return
            w.write(b"\x05\x00\x00\x01" + bytes(6))
            flip = None
            if port == self.corrupt_port and not self.flipped:
                self.flipped = True
                flip = self.flip_at
            await asyncio.gather(self.pipe(r, up), self.pipe(ur, w, flip))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()
            if up is not None:
                up.close()

    @staticmethod
    async def pipe(
        src: asyncio.StreamReader, dst: asyncio.StreamWriter, flip: Optional[int] = None
    ) -> None:
        seen = 0
        try:
            while data := await src.read(1 << 16):
                if flip is not None and seen <= flip < seen + len(data):
                    i = flip - seen
                    data = data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]
                seen += len(data)
                dst.write(data)
                await dst.drain()
            if dst.can_write_eof() and not dst.is_closing():
                dst.write_eof()
        except OSError:
            rst(dst)


@dataclass
class SinkProc:
    proc: asyncio.subprocess.Process
    ready: dict[str, Any]
    status_file: Path

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = json.loads(self.status_file.read_text())
        return status


@pytest.fixture
async def sink(tmp_path: Path) -> AsyncIterator[SinkProc]:
    status_file = tmp_path / "sink.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.soak_sink", "--host", "127.0.0.1",
        "--echo-port", "0", "--bulk-port", "0", "--flaky-port", "0",
        "--status-file", str(status_file),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 10))
        assert ready["ready"], ready
        yield SinkProc(proc, ready, status_file)
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.communicate(), 10)


@dataclass
class Run:
    code: int
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    stdout: list[dict[str, Any]]

    def outcomes(self, kind: Optional[str] = None) -> dict[str, int]:
        counts: dict[str, int] = {}
        for rec in self.records:
            if kind is None or rec["kind"] == kind:
                counts[rec["outcome"]] = counts.get(rec["outcome"], 0) + 1
        return counts


async def start_traffic(
    sink: SinkProc, proxy: Socks5, out: Path, *extra: str, streams: int = 50,
    duration: float = 4.0, interval: float = 0.3,
    mix: str = "idle=0.5,rr=0.2,bulk=0.1,flaky=0.2",
) -> asyncio.subprocess.Process:  # fmt: skip
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.soak_traffic",
        "--socks", f"127.0.0.1:{proxy.port}", "--auth", f"{USER}:{PASSWORD}",
        "--sink-host", "127.0.0.1", "--echo-port", str(sink.ready["echo_port"]),
        "--bulk-port", str(sink.ready["bulk_port"]),
        "--flaky-port", str(sink.ready["flaky_port"]),
        "--streams", str(streams), "--duration", str(duration),
        "--idle-interval", str(interval), "--bulk-size", str(BULK_SIZE), "--mix", mix,
        "--out", str(out), "--seed", "7", "--ramp", "0.5", "--retry-pause", "0.2",
        "--status-interval", "1", *extra,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def finish_traffic(proc: asyncio.subprocess.Process, out: Path) -> Run:
    stdout, _ = await asyncio.wait_for(proc.communicate(), 30)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines and lines[-1].get("summary"), lines[-3:]
    code = proc.returncode
    assert code is not None
    printed = [json.loads(line) for line in stdout.decode().splitlines()]
    assert printed[-1] == lines[-1]
    return Run(code, lines[:-1], lines[-1], printed)


@pytest.fixture
async def proxy() -> AsyncIterator[Socks5]:
    p = Socks5()
    await p.start()
    yield p
    await p.close()


async def test_every_kind_of_stream_ends_ok(sink: SinkProc, proxy: Socks5, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    run = await finish_traffic(await start_traffic(sink, proxy, out), out)
    assert run.code == 0, run.summary
    assert run.outcomes() == {"ok": len(run.records)}, [
        r for r in run.records if r["outcome"] != "ok"
    ][:5]
    for kind in KINDS:
        assert run.outcomes(kind).get("ok", 0) >= 1, kind
    assert run.summary["totals"]["ok"] == len(run.records)
    assert run.summary["unexpected_errors"] == 0
    assert run.summary["slots"] == {"idle": 25, "rr": 10, "bulk": 5, "flaky": 10}
    assert len({r["id"] for r in run.records}) == len(run.records)
    for r in run.records:
        assert r["started"] <= r["ended"] and r["phase"] == "done" and r["error"] == ""
        if r["kind"] == "bulk":
            assert r["bytes_verified"] == BULK_SIZE and r["dir"] in ("up", "down")
        else:
            assert r["bytes_verified"] == r["bytes_sent"] > 0
    assert {r["dir"] for r in run.records if r["kind"] == "bulk"} == {"up", "down"}
    statuses = [s for s in run.stdout if s.get("status")]
    assert statuses and max(s["active"] for s in statuses) > 40
    status = sink.status()
    assert status["bulk_bad"] == 0 and status["bulk_up_ok"] >= 1 and status["bulk_down_done"] >= 1


async def test_a_flipped_byte_is_corrupt_and_exits_3(sink: SinkProc, tmp_path: Path) -> None:
    proxy = Socks5(corrupt_port=sink.ready["echo_port"])
    await proxy.start()
    out = tmp_path / "out.jsonl"
    proc = await start_traffic(sink, proxy, out, streams=20, duration=2.0, mix="idle=1,rr=1")
    run = await finish_traffic(proc, out)
    await proxy.close()
    assert proxy.flipped
    assert run.code == 3, run.summary
    bad = [r for r in run.records if r["outcome"] != "ok"]
    assert len(bad) == 1, bad
    assert bad[0]["outcome"] == "corrupt", bad[0]
    assert bad[0]["error"].startswith("echo 0: byte 20 of "), bad[0]
    assert bad[0]["kind"] in ("idle", "rr") and bad[0]["phase"] == "echo"
    assert run.summary["totals"]["corrupt"] == 1


async def test_sink_resets_only_flaky_streams(
    sink: SinkProc, proxy: Socks5, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    proc = await start_traffic(sink, proxy, out, streams=40, duration=3.0)
    await asyncio.sleep(1.5)
    sink.signal(signal.SIGUSR1)
    run = await finish_traffic(proc, out)
    assert run.code == 0, run.summary
    for kind in ("idle", "rr", "bulk"):
        assert set(run.outcomes(kind)) == {"ok"}, (kind, run.outcomes(kind))
    flaky = run.outcomes("flaky")
    assert set(flaky) == {"ok", "reset"} and flaky["reset"] >= 1, flaky
    assert run.summary["unexpected_errors"] == 0
    status = sink.status()
    assert status["flaky_reset_signals"] == 1 and status["flaky_resets"] >= flaky["reset"]


async def test_silent_destination_makes_flaky_streams_hang(
    sink: SinkProc, proxy: Socks5, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    proc = await start_traffic(
        sink, proxy, out, "--hang-after", "0.8", streams=10, duration=2.5, interval=0.2,
        mix="idle=1,flaky=1",
    )  # fmt: skip
    await asyncio.sleep(1.0)
    sink.signal(signal.SIGUSR2)
    run = await finish_traffic(proc, out)
    sink.signal(signal.SIGUSR2)
    assert run.code == 4, run.summary
    assert set(run.outcomes("idle")) == {"ok"}
    hung = [r for r in run.records if r["outcome"] == "hung"]
    assert hung and {r["kind"] for r in hung} == {"flaky"}
    assert {r["phase"] for r in hung} <= {"echo", "close"}, hung
    assert all(r["error"].startswith("no progress for") for r in hung)
    assert run.outcomes("flaky").keys() <= {"ok", "hung"}


async def test_sigterm_finishes_running_streams(
    sink: SinkProc, proxy: Socks5, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    proc = await start_traffic(
        sink, proxy, out, "--socks-pipeline", streams=30, duration=60, interval=0.5
    )
    await asyncio.sleep(1.5)
    proc.terminate()
    run = await finish_traffic(proc, out)
    assert run.code == 0, run.summary
    assert run.outcomes() == {"ok": len(run.records)}
    assert run.summary["stopped"] is not None
    assert run.summary["ended"] - run.summary["stopped"] < 5
    # Streams running at the signal ended after it, with their last exchange.
    last = [r for r in run.records if r["ended"] >= run.summary["stopped"]]
    assert len(last) >= 20


async def test_a_second_sigterm_aborts_what_is_left(
    sink: SinkProc, proxy: Socks5, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    proc = await start_traffic(
        sink, proxy, out, streams=6, duration=60, interval=0.2, mix="idle=1,flaky=1"
    )
    await asyncio.sleep(1.0)
    sink.signal(signal.SIGUSR2)
    await asyncio.sleep(0.3)
    proc.terminate()
    await asyncio.sleep(0.5)
    proc.terminate()
    run = await finish_traffic(proc, out)
    sink.signal(signal.SIGUSR2)
    assert run.code == 4, run.summary
    assert run.summary["aborted"] is True
    aborted = [r for r in run.records if r["outcome"] == "hung"]
    assert len(aborted) == 3 and {r["kind"] for r in aborted} == {"flaky"}, aborted
    assert {r["error"] for r in aborted} == {"aborted"}
    assert set(run.outcomes("idle")) == {"ok"}


async def test_sink_bulk_protocol(sink: SinkProc) -> None:
    host, port = "127.0.0.1", sink.ready["bulk_port"]
    r, w = await asyncio.open_connection(host, port)
    w.write(b'{"dir": "down", "size": 200000, "seed": 5}\n')
    w.write_eof()
    got = await r.read()
    assert got == b"".join(pattern_chunks(5, 200000))
    w.close()

    async def up(data: bytes, size: int) -> bytes:
        r, w = await asyncio.open_connection(host, port)
        w.write(json.dumps({"dir": "up", "size": size, "seed": 9}).encode() + b"\n" + data)
        w.write_eof()
        answer = await r.read()
        w.close()
        return answer

    good = pattern(9, 0, 300000)
    assert await up(good, 300000) == b"OK\n"
    bad = good[:123456] + b"x" + good[123457:]
    assert (await up(bad, 300000)).startswith(b"BAD byte 123456 of 300000 differs")
    assert await up(good + b"more", 300000) == b"OK\nBAD 4 extra bytes after 300000\n"
    await asyncio.sleep(1.2)
    assert sink.status()["bulk_bad"] == 2


def test_stream_pattern_catches_drops_repeats_and_shifts() -> None:
    size = 5 * BLOCK + 777
    data = b"".join(pattern_chunks(3, size))
    assert len(data) == size and data == pattern(3, 0, size)
    assert pattern(3, BLOCK - 5, 10) == data[BLOCK - 5 : BLOCK + 5]
    assert data != b"".join(pattern_chunks(4, size))

    def check(stream: bytes) -> Optional[str]:
        checker = Checker(3, size)
        for i in range(0, len(stream), 10000):
            error = checker.feed(stream[i : i + 10000])
            if error:
                return error
        return None if checker.pos == size else f"short {checker.pos}"

    assert check(data) is None
    repeated = data[: 2 * BLOCK] + data[BLOCK : 2 * BLOCK] + data[2 * BLOCK :]
    assert check(repeated) == check(repeated[:size]) is not None
    assert (check(data[:BLOCK] + data[2 * BLOCK :] + data[:BLOCK]) or "").startswith(
        f"byte {BLOCK} "
    )
    assert (check(data[1:] + b"\0") or "").startswith("byte 0 ")
    assert check(data + b"!") == f"1 bytes beyond the {size} of the stream"
    assert first_difference(b"abcdef", b"abcxef") == 3
    assert first_difference(b"abc", b"abc") == 3


def test_slots_follow_the_mix() -> None:
    mix = parse_mix("idle=0.9,rr=0.08,bulk=0.01,flaky=0.01")
    assert share_slots(1250, mix) == {"idle": 1125, "rr": 100, "bulk": 13, "flaky": 12}
    assert share_slots(50, mix) == {"idle": 44, "rr": 4, "bulk": 1, "flaky": 1}
    assert share_slots(3, parse_mix("idle=1")) == {"idle": 3, "rr": 0, "bulk": 0, "flaky": 0}
    with pytest.raises(Exception, match="unknown"):
        parse_mix("idle=1,bogus=1")
