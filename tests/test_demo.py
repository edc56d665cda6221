"""``relay demo`` end to end, and its idle-killing middlebox on its own.

The demo is the project's one-command proof that heartbeats beat the firewall, so the test
checks the story it tells (relay answers after idle, plain SOCKS5 does not) and that it leaves
nothing behind (tasks, sockets), since it runs inside other processes' event loops too.
"""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
from io import StringIO
from pathlib import Path

import asyncssh
import pytest

from relay.demo import (
    PLAIN,
    RELAY,
    EchoServer,
    LoginNode,
    Middlebox,
    _heartbeat_lines,
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


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
async def test_demo_relay_survives_idle_and_plain_does_not() -> None:
    fds_before = _open_fds()
    out = StringIO()

    rc = await run_demo(idle=5, blackhole_after=2, heartbeat=0.5, out=out)

    text = out.getvalue()
    assert rc == 0, text
    relay_row = _table_row(text, RELAY)
    plain_row = _table_row(text, PLAIN)
    # columns: path, first exchange, after idle
    assert relay_row.count("answered in") == 2, relay_row
    assert plain_row.count("answered in") == 1, plain_row
    assert "no answer within 3 s" in plain_row, plain_row
    assert "verdict: OK" in text
    assert "unexpectedly" not in text
    assert "\r" not in text  # not a terminal: one progress line per second, no overdrawing
    assert "idle 5/5 s  middlebox has black-holed 1 of 2 connection(s)" in text, text

    assert _other_tasks() == []
    await asyncio.sleep(0.05)  # any close still in flight would show up as an fd below
    assert _open_fds() <= fds_before + 1, os.listdir("/proc/self/fd")


async def test_demo_fails_when_heartbeat_is_slower_than_the_firewall() -> None:
    """The exit status really depends on the relay path: make the relay lose too."""
    out = StringIO()
    rc = await run_demo(idle=2.5, blackhole_after=1, heartbeat=3, out=out)
    text = out.getvalue()
    assert rc == 1, text
    assert "verdict: FAILED" in text
    assert "hint: the heartbeat" in text
    assert "answered in" not in _table_row(text, RELAY).split("  ")[-1]
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
    for argv in (["--idle", "-1"], ["--heartbeat", "0"], ["--blackhole-after", "nan"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    assert "must be" in capsys.readouterr().err


def _typical_descriptor_limit() -> None:
    """A login shell's usual soft limit (this machine's may be higher)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))


def test_relay_demo_command_prints_no_warning_and_explains_the_heartbeats() -> None:
    """What a user sees from `relay demo`: nothing on stderr they would have to act on, and
    a heartbeat summary that says who pinged whom."""
    proc = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "relay"), "demo",
         "--idle", "3", "--blackhole-after", "1.5", "--heartbeat", "0.5"],
        capture_output=True, text=True, timeout=60, check=False,
        preexec_fn=_typical_descriptor_limit,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("heartbeats: "))
    assert "the worker pinged after each 0.5 s without traffic and the exit answered" in lines[at]
    assert "answered none" not in lines[at] and "mean round trip" in lines[at]
    assert "RTT 0.0 ms" not in proc.stdout
    assert lines[at + 1].strip() == (
        "the exit pings only when the worker's PINGs stop coming: it sent none"
    )


def test_heartbeat_lines_when_the_exit_pinged_and_when_nothing_was_answered() -> None:
    first, second = _heartbeat_lines(0, 0.0, 3, 2.25, 1.0)
    assert first.endswith("the exit answered none;")
    assert second.strip() == (
        "the exit pinged too when the worker's PINGs stopped coming, answered 3 times "
        "(mean round trip 2.2 ms)"
    )
