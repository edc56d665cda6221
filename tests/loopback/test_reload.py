"""Key rotation under load against a real relay-exit process: streams of two keys flowing,
the keys file rewritten without one and SIGHUP sent. The kept key's streams go on, the
revoked key's streams end and it can open no more; a bad new file is refused with a log
line and the keys in force stay; a key added later works at once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from python_socks import ProxyError
from python_socks.async_.asyncio import Proxy

from relay.worker.daemon import RelayWorker
from tests.support.helpers import (
    KEY_ID,
    PASSWORD,
    SECRET,
    USER,
    Servers,
    echo_handler,
    wait_for,
    worker_settings,
)
from tests.support.proc import terminate
from tests.support.relays import write_config

BIN = Path(sys.executable).parent
KEPT, KEPT_SECRET = KEY_ID, SECRET.decode()
REVOKED, REVOKED_SECRET = "worker-2", "fedcba9876543210fedcba9876543210"


@dataclass
class ExitProcess:
    proc: subprocess.Popen[bytes]
    port: int
    keys: Path
    log: Path

    def lines(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far (a line still being written is left out)."""
        out = []
        for line in self.log.read_text(errors="replace").splitlines(keepends=True):
            if line.startswith("{") and line.endswith("\n"):
                out.append(json.loads(line))
        return out

    def write_keys(self, text: str, mode: int = 0o600) -> None:
        """Replace the keys file the way an operator's tooling does: new file, rename."""
        fresh = self.keys.with_suffix(".new")
        fresh.write_text(text)
        fresh.chmod(mode)
        fresh.replace(self.keys)

    def reload(self) -> dict[str, Any]:
        """SIGHUP, and wait for the daemon to log its verdict; returns that log line."""
        before = len(self.lines())
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            lines = self.lines()
            for index in range(before, len(lines)):
                if lines[index]["msg"] == "reloaded" or "reload refused" in lines[index]["msg"]:
                    return lines[index]
            time.sleep(0.05)
        raise AssertionError("no reload verdict in the log")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def exit_process(tmp_path: Path) -> Iterator[ExitProcess]:
    keys = tmp_path / "exit.keys"
    port = free_port()
    config = write_config(tmp_path / "exit.toml", "exit", {
        "listen": f"127.0.0.1:{port}", "keys": str(keys), "allow": ["127.0.0.1/32:*"],
        "heartbeat": 1.0, "log_format": "json",
    })  # fmt: skip
    log = tmp_path / "exit.log"
    handle = log.open("wb")
    exit_process = ExitProcess(None, port, keys, log)  # type: ignore[arg-type]
    exit_process.write_keys(f"{KEPT} {KEPT_SECRET}\n{REVOKED} {REVOKED_SECRET}\n")
    proc = subprocess.Popen([str(BIN / "relay-exit"), "--config", str(config)], stderr=handle)
    exit_process.proc = proc
    try:
        deadline = time.monotonic() + 15
        while not any(line["msg"] == "listening" for line in exit_process.lines()):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield exit_process
    finally:
        terminate(popens=[proc])
        handle.close()


class Flow:
    """One stream kept busy: a message every few milliseconds, each echo checked."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.echoed = 0
        self.ended: BaseException | None = None
        self.stopping = False
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            # the flag as well as the cancel: on 3.11 asyncio.wait_for() can swallow a
            # cancel that arrives as the read completes, and the flow would echo forever
            while not self.stopping:
                message = os.urandom(2048)
                self.writer.write(message)
                got = await asyncio.wait_for(self.reader.readexactly(len(message)), 10)
                assert got == message
                self.echoed += 1
                await asyncio.sleep(0.005)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            self.ended = exc

    def close(self) -> None:
        self.stopping = True
        self.task.cancel()
        self.writer.close()

    async def finish(self) -> None:
        """End the stream cleanly: stop, half-close, read the rest up to the far end's
        half-close, close (so that it ends as ``ok`` at both ends)."""
        self.stopping = True
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
            self.writer.write_eof()
            while await asyncio.wait_for(self.reader.read(1 << 16), 10):
                pass
        self.writer.close()


async def open_flows(worker: RelayWorker, port: int, count: int) -> list[Flow]:
    proxy = Proxy.from_url(f"socks5://{USER}:{PASSWORD}@127.0.0.1:{worker.address[1]}")
    flows = []
    for _ in range(count):
        sock = await proxy.connect("127.0.0.1", port, timeout=20)
        flows.append(Flow(*await asyncio.open_connection(sock=sock)))
    return flows


async def can_open(worker: RelayWorker, port: int) -> bool:
    """A stream to the echo server opens and echoes (a refusal is a SOCKS5 error or, with
    optimistic data, a reset after the reply)."""
    proxy = Proxy.from_url(f"socks5://{USER}:{PASSWORD}@127.0.0.1:{worker.address[1]}")
    try:
        sock = await proxy.connect("127.0.0.1", port, timeout=20)
    except ProxyError:
        return False
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(b"?")
        return await asyncio.wait_for(reader.read(1), 20) == b"?"
    except ConnectionError:
        return False
    finally:
        writer.close()


async def comes_back(worker: RelayWorker, port: int, within: float = 20.0) -> bool:
    """A worker refused by the exit opens a stream again after its next carrier attempt."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await can_open(worker, port):
            return True
        await asyncio.sleep(0.2)
    return False


async def progress(flows: list[Flow], seconds: float) -> bool:
    """Every flow echoes more within ``seconds`` and none ended."""
    before = [f.echoed for f in flows]
    await asyncio.sleep(seconds)
    return all(f.ended is None and f.echoed > b for f, b in zip(flows, before))


async def test_sighup_revokes_a_key_under_load_and_refuses_a_bad_file(
    exit_process: ExitProcess,
) -> None:
    ex = exit_process
    servers = Servers()
    kept = RelayWorker(worker_settings(None, ("127.0.0.1", ex.port)))
    revoked = RelayWorker(
        worker_settings(
            None,
            ("127.0.0.1", ex.port),
            key_id=REVOKED,
            secret=REVOKED_SECRET.encode(),
            reconnect_max=1.0,  # a refused HELLO is retried after --reconnect-max
        )
    )
    await kept.start()
    await revoked.start()
    flows: list[Flow] = []
    try:
        port = await servers.start(echo_handler)
        kept_flows = await open_flows(kept, port, 4)
        revoked_flows = await open_flows(revoked, port, 4)
        flows = kept_flows + revoked_flows
        assert await progress(flows, 0.3)

        # the rotation: the file without one key, then SIGHUP
        ex.write_keys(f"# rotated\n{KEPT} {KEPT_SECRET}\n")
        verdict = await asyncio.to_thread(ex.reload)
        assert verdict["msg"] == "reloaded" and verdict["keys"] == 1
        assert verdict["revoked_streams"] == 4
        ended = (ConnectionError, asyncio.IncompleteReadError)
        assert await wait_for(lambda: all(isinstance(f.ended, ended) for f in revoked_flows))
        assert await progress(kept_flows, 0.5)
        assert not await can_open(revoked, port)
        assert await can_open(kept, port)

        # bad new files: refused with a log line naming the problem; the keys in force stay
        for text, mode, why in [
            (f"{KEPT} {KEPT_SECRET}\n{REVOKED} {REVOKED_SECRET}\n", 0o644, "readable by"),
            (f"{KEPT} {KEPT_SECRET}\n{REVOKED} short\n", 0o600, "shorter than"),
            (f"{KEPT}\n{REVOKED} {REVOKED_SECRET}\n", 0o600, "expected 'KEY_ID SECRET'"),
        ]:
            ex.write_keys(text, mode)
            line = await asyncio.to_thread(ex.reload)
            assert line["level"] == "error" and "reload refused" in line["msg"], line
            assert why in line["msg"] and str(ex.keys) in line["msg"], line
            assert REVOKED_SECRET not in line["msg"] and KEPT_SECRET not in line["msg"]
            assert await progress(kept_flows, 0.2)
            assert not await can_open(revoked, port)  # not let back in by a refused file
            assert await can_open(kept, port)

        # a key added by a good file works at once, and the kept streams never noticed
        ex.write_keys(f"{KEPT} {KEPT_SECRET}\n{REVOKED} {REVOKED_SECRET}\n")
        assert (await asyncio.to_thread(ex.reload))["msg"] == "reloaded"
        assert await comes_back(revoked, port)
        assert await progress(kept_flows, 0.2)
        assert ex.proc.poll() is None
    finally:
        for flow in flows:
            flow.close()
        await kept.stop()
        await revoked.stop()
        await servers.close()
