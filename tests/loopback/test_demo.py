"""``relay demo`` end to end, and its idle-killing middlebox on its own.

The demo is the project's one-command proof that heartbeats beat the firewall, so the test
checks the story it tells (relay answers after idle, plain SOCKS5 does not) and that it leaves
nothing behind (tasks, sockets), since it runs inside other processes' event loops too.
"""

from __future__ import annotations

import asyncio
import os
import re
from io import StringIO
from pathlib import Path

import asyncssh
import pytest

from relay.tools.demo import (
    PLAIN,
    RELAY,
    EchoServer,
    LoginNode,
    Middlebox,
    main,
    run_demo,
)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _other_tasks() -> list[asyncio.Task[object]]:
    me = asyncio.current_task()
    return [t for t in asyncio.all_tasks() if t is not me and not t.done()]


def _table_row(output: str, name: str) -> str:
    rows = [line for line in output.splitlines() if line.strip().startswith(name + "  ")]
    assert len(rows) == 1, output
    return rows[0]


def _relay_rows(output: str, streams: int) -> list[str]:
    return [_table_row(output, f"{RELAY} stream {n}") for n in range(1, streams + 1)]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
async def test_demo_relay_survives_idle_and_plain_does_not() -> None:
    fds_before = _open_fds()
    out = StringIO()

    rc = await run_demo(idle=5, blackhole_after=2, heartbeat=0.5, out=out, streams=3, carriers=2)

    text = out.getvalue()
    assert rc == 0, text
    plain_row = _table_row(text, PLAIN)
    # columns: path, first exchange, after idle
    for row in _relay_rows(text, 3):
        assert row.count("answered in") == 2, row
    assert plain_row.count("answered in") == 1, plain_row
    assert "no answer within 3 s" in plain_row, plain_row
    assert "verdict: OK" in text
    assert "unexpectedly" not in text
    assert "\r" not in text  # not a terminal: one progress line per second, no overdrawing
    # Three streams, but the firewall only ever saw the worker's two carriers and the plain
    # client's own connection; the carriers' heartbeats kept both alive.
    assert "idle 5/5 s  middlebox has black-holed 1 of 3 connection(s)" in text, text
    assert "middlebox: 3 connections seen, 1 black-holed (timeout 2 s)" in text, text
    assert "plain SOCKS5: 1 stream, 1 connection of its own, black-holed" in text, text
    assert (
        f"{RELAY}: 3 streams rode 2 carriers (2 connections through the middlebox, "
        "none black-holed)" in text
    ), text
    # The worker's PINGs were answered; the exit, hearing them, never needed its own.
    answered = re.search(r"the exit answered (\d+) \(mean RTT", text)
    assert answered and int(answered.group(1)) >= 2 * 5, text
    assert "the exit pings only when the worker's pings stop: 0 of its own answered" in text

    assert _other_tasks() == []
    await asyncio.sleep(0.05)  # any close still in flight would show up as an fd below
    assert _open_fds() <= fds_before + 1, os.listdir("/proc/self/fd")


async def test_demo_fails_when_heartbeat_is_slower_than_the_firewall() -> None:
    """The exit status really depends on the relay path: make the relay lose too."""
    out = StringIO()
    rc = await run_demo(idle=2.5, blackhole_after=1, heartbeat=3, out=out, streams=2, carriers=1)
    text = out.getvalue()
    assert rc == 1, text
    assert "verdict: FAILED - 2 of 2 hpc-relay streams did not answer" in text
    assert "hint: the heartbeat" in text
    for row in _relay_rows(text, 2):
        assert "answered in" not in row.split("  ")[-1], row
    assert (
        f"{RELAY}: 2 streams rode 1 carrier (1 connection through the middlebox, black-holed)"
        in text
    ), text
    assert _other_tasks() == []


async def test_run_demo_rejects_bad_values() -> None:
    for kwargs in ({"streams": 0}, {"carriers": 0}, {"heartbeat": 0}, {"idle": -1}):
        with pytest.raises(ValueError):
            await run_demo(out=StringIO(), **kwargs)
    assert _other_tasks() == []


class _Destination:
    """Echo server that also tells whether the middlebox ever passed on a FIN."""

    def __init__(self) -> None:
        self.eof = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        host, port = self.server.sockets[0].getsockname()[:2]
        return host, port

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            while line := await reader.readline():
                writer.write(b"echo: " + line)
                await writer.drain()
            self.eof.set()
        except OSError:
            self.eof.set()
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()
        await asyncio.sleep(0.05)


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes, timeout: float
) -> bytes:
    writer.write(line + b"\n")
    await writer.drain()
    return await asyncio.wait_for(reader.readline(), timeout)


async def test_middlebox_blackholes_idle_connection_and_passes_active_one() -> None:
    dest = _Destination()
    target = await dest.start()
    box = Middlebox(target, blackhole_after=1.0)
    await box.start()
    try:
        active = await asyncio.open_connection(*box.address)
        idle = await asyncio.open_connection(*box.address)
        for reader, writer in (active, idle):
            assert await _exchange(reader, writer, b"hi", 1) == b"echo: hi\n"

        # The active connection never pauses longer than the timeout: it keeps working.
        for n in range(7):
            await asyncio.sleep(0.25)
            assert await _exchange(*active, b"x%d" % n, 1) == b"echo: x%d\n" % n
        assert box.blackholed == 1  # by now the silent one has been expired

        # The idle one: no answer, and neither EOF nor reset, just silence.
        reader, writer = idle
        with pytest.raises(asyncio.TimeoutError):
            await _exchange(reader, writer, b"anyone?", 0.7)
        assert not reader.at_eof()
        assert box.connections == 2 and box.blackholed == 1
        assert await _exchange(*active, b"still", 1) == b"echo: still\n"
        # Our FIN is swallowed as well: the destination never learns the client left.
        writer.write_eof()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(dest.eof.wait(), 0.5)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.3)

        for _, w in (active, idle):
            w.close()
    finally:
        await box.stop()
        await dest.stop()
    assert _other_tasks() == []


async def test_echo_server_stop_ends_open_connections() -> None:
    echo = EchoServer()
    await echo.start()
    reader, writer = await asyncio.open_connection(*echo.address)
    assert await _exchange(reader, writer, b"ping", 1) == b"echo: ping\n"
    await echo.stop()
    assert await asyncio.wait_for(reader.read(), 1) == b""
    writer.close()
    assert _other_tasks() == []


async def test_login_node_forwards_only_to_the_middlebox_and_runs_nothing(tmp_path: Path) -> None:
    echo = EchoServer()
    await echo.start()
    allowed = echo.address  # stands in for the middlebox
    other = EchoServer()
    await other.start()
    node = LoginNode(allowed, tmp_path)
    await node.start()
    try:
        for path in (node.client_key_path, node.known_hosts):
            assert path.stat().st_mode & 0o777 == 0o600
        async with await node.connect() as conn:
            reader, writer = await conn.open_connection(*allowed)
            writer.write(b"via ssh\n")
            assert await asyncio.wait_for(reader.readline(), 2) == b"echo: via ssh\n"
            writer.close()
            with pytest.raises(asyncssh.ChannelOpenError, match="only to the middlebox"):
                await conn.open_connection(*other.address)
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.run("true")
        stranger = asyncssh.generate_private_key("ssh-ed25519")
        with pytest.raises(asyncssh.PermissionDenied):
            await asyncssh.connect(
                node.host,
                node.address[1],
                username="glidein",
                client_keys=[stranger],
                known_hosts=str(node.known_hosts),
                agent_path=None,
                config=None,
            )
    finally:
        await node.stop()
        await other.stop()
        await echo.stop()
    assert _other_tasks() == []


def test_main_rejects_bad_values(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["--idle", "-1"],
        ["--heartbeat", "0"],
        ["--blackhole-after", "nan"],
        ["--streams", "0"],
        ["--carriers", "two"],
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "must be" in err and "not a whole number: 'two'" in err
