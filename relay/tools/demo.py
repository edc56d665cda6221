"""``relay demo``: the whole chain on loopback, next to the chain it replaces.

Everything runs in one process on 127.0.0.1 with ephemeral ports: an embedded SSH server
plays the login node, a small forwarder plays the site firewall that silently drops idle
connections, and client connections cross both. One speaks plain SOCKS5 through an SSH port
forward (what ``ssh -D`` + dante did): one connection through the firewall per stream. The
others are streams through relay-worker and relay-exit, multiplexed on the worker's few
long-lived carriers (``--carriers``), so the firewall sees those carriers and not the streams.
After a quiet period only the relay's streams still answer, because the worker's heartbeat on
each carrier keeps the firewall's state alive. That is the prototype's "lost jobs" bug, and its
fix, in about fifteen seconds on a laptop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, TextIO

import asyncssh
from python_socks.async_.asyncio import Proxy

from relay.config.values import HostPort, LoginTarget, parse_rule
from relay.exit.daemon import RelayExit
from relay.exit.settings import ExitSettings
from relay.logs import setup_logging
from relay.metrics import Metrics
from relay.worker.daemon import RelayWorker
from relay.worker.settings import WorkerSettings

log = logging.getLogger("relay.demo")

HOST = "127.0.0.1"
SSH_USER = "glidein"
KEY_ID = "demo"
ANSWER_TIMEOUT = 3.0
"""How long a client waits for the echo of one line."""
SETUP_TIMEOUT = 10.0
ECHO_PREFIX = b"echo: "

DEMO_LIMITS = {
    "max_streams": 256,
    "max_streams_per_key": 256,
    "max_handshakes": 64,
    "max_carriers": 64,
    "max_carriers_per_key": 64,
    "max_parked": 16,
}
"""The exit's limits in the demo: a laptop's, so that it asks for a laptop's share of
descriptors (its defaults hold a production VM's load)."""

PLAIN = "plain SOCKS5 (ssh -D + dante style)"
RELAY = "hpc-relay"


async def _settle(tasks: Iterable[asyncio.Task[None]], timeout: float = 2.0) -> None:
    """Wait for handler tasks to end on their own (their sockets were just aborted).

    Cancelling is only the fallback: Python 3.11's ``start_server`` logs a cancelled handler
    as an error, which would be noise in a demo's output.
    """
    pending = [task for task in tasks if not task.done()]
    if pending:
        _, pending_set = await asyncio.wait(pending, timeout=timeout)
        for task in pending_set:
            task.cancel()
        if pending_set:
            await asyncio.wait(pending_set, timeout=timeout)


# -- the destination --------------------------------------------------------------------------
class EchoServer:
    """The destination (schedd, shadow, ...): answers each line with a prefix."""

    def __init__(self, host: str = HOST) -> None:
        self.host = host
        self._server: Optional[asyncio.Server] = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, 0)

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                writer.write(ECHO_PREFIX + line)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await _settle(list(self._tasks))
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2)


# -- the firewall ---------------------------------------------------------------------------
class _Flow:
    """One connection through the middlebox: both legs and its idle clock."""

    def __init__(self, client: asyncio.StreamWriter, now: float) -> None:
        self.writers: list[asyncio.StreamWriter] = [client]
        self.last_activity = now
        self.blackholed = False


class Middlebox:
    """A stateful firewall with a short established timeout, as an asyncio TCP forwarder.

    A connection that has carried no byte in either direction for more than
    ``blackhole_after`` seconds loses its state: from then on every byte, in both directions,
    is read and dropped, and neither side ever sees a FIN or RST (both sockets stay open until
    :meth:`stop`). Exactly what FZJ's firewall did to the shadow connection: the peers only
    find out when they next expect an answer.
    """

    def __init__(self, target: tuple[str, int], blackhole_after: float, host: str = HOST) -> None:
        if blackhole_after <= 0:
            raise ValueError("blackhole_after must be > 0")
        self.target = target
        self.blackhole_after = blackhole_after
        self.host = host
        self.flows: list[_Flow] = []
        self._server: Optional[asyncio.Server] = None
        self._sweeper: Optional[asyncio.Task[None]] = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping: Optional[asyncio.Event] = None

    @property
    def connections(self) -> int:
        """Connections accepted so far."""
        return len(self.flows)

    @property
    def blackholed(self) -> int:
        """Connections whose state has been dropped so far."""
        return sum(1 for flow in self.flows if flow.blackholed)

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def start(self) -> None:
        self._stopping = asyncio.Event()
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self._sweeper = asyncio.ensure_future(self._sweep())

    async def stop(self) -> None:
        """Close everything, black-holed connections included (the only close they see)."""
        if self._server is not None:
            self._server.close()
        if self._stopping is not None:
            self._stopping.set()
        if self._sweeper is not None:
            self._sweeper.cancel()
            await _settle([self._sweeper])
        for flow in self.flows:
            for writer in flow.writers:
                writer.transport.abort()
        await _settle(list(self._tasks))
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def _expire(self, flow: _Flow, now: float) -> None:
        if not flow.blackholed and now - flow.last_activity > self.blackhole_after:
            flow.blackholed = True
            log.info(
                "middlebox dropped an idle connection's state",
                extra={"fields": {"idle": now - flow.last_activity, "flows": len(self.flows)}},
            )

    async def _sweep(self) -> None:
        """Expire idle flows on time, so the count is right even while nobody sends."""
        loop = asyncio.get_running_loop()
        step = min(0.1, self.blackhole_after / 4)
        while True:
            await asyncio.sleep(step)
            now = loop.time()
            for flow in self.flows:
                self._expire(flow, now)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None and self._stopping is not None
        self._tasks.add(task)
        loop = asyncio.get_running_loop()
        flow = _Flow(writer, loop.time())
        self.flows.append(flow)
        try:
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(*self.target), SETUP_TIMEOUT
                )
            except (OSError, asyncio.TimeoutError) as exc:
                log.info("middlebox cannot reach its target: %s", exc)
                return
            flow.writers.append(up_writer)
            await asyncio.gather(
                self._copy(flow, reader, up_writer), self._copy(flow, up_reader, writer)
            )
            if flow.blackholed:
                await self._stopping.wait()  # a dead flow is never closed, only forgotten
        finally:
            self._tasks.discard(task)
            for each in flow.writers:
                each.transport.abort()

    async def _copy(
        self, flow: _Flow, src: asyncio.StreamReader, dst: asyncio.StreamWriter
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await src.read(65536)
            except OSError:
                if not flow.blackholed:
                    dst.transport.abort()  # a reset passes a live firewall entry as a reset
                return
            self._expire(flow, loop.time())
            if flow.blackholed:
                if not data:
                    return  # the FIN is swallowed too
                continue
            if not data:
                if dst.can_write_eof():
                    with contextlib.suppress(OSError):
                        dst.write_eof()
                return
            flow.last_activity = loop.time()
            dst.write(data)
            try:
                await dst.drain()
            except OSError:
                return


# -- the login node ---------------------------------------------------------------------------
class _LoginServer(asyncssh.SSHServer):
    """sshd as a login node is configured for this: one key, forwarding to one place only."""

    def __init__(self, node: LoginNode) -> None:
        self.node = node
        self.conn: Optional[asyncssh.SSHServerConnection] = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        self.node.connections.add(conn)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self.conn is not None:
            self.node.connections.discard(self.conn)

    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        assert self.node.client_key is not None
        return username == SSH_USER and key.public_data == self.node.client_key.public_data

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> bool:
        if (dest_host, dest_port) == self.node.allowed:
            self.node.forwards += 1
            return True
        log.info("login node refused a forward to %s:%s", dest_host, dest_port)
        raise asyncssh.ChannelOpenError(
            asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
            "this login node forwards only to the middlebox",
        )


class LoginNode:
    """An embedded asyncssh server standing in for the login node's OpenSSH.

    Keys are generated in memory; the client key and a known_hosts line go to ``workdir``
    (mode 0600) because the worker reads them from files, as it does on a real site.
    """

    def __init__(self, allowed: tuple[str, int], workdir: Path, host: str = HOST) -> None:
        self.allowed = allowed
        self.workdir = workdir
        self.host = host
        self.client_key: Optional[asyncssh.SSHKey] = None
        self.client_key_path = workdir / "id_ed25519"
        self.known_hosts = workdir / "known_hosts"
        self.connections: set[asyncssh.SSHServerConnection] = set()
        self.forwards = 0
        self._acceptor: Optional[asyncssh.SSHAcceptor] = None

    @property
    def address(self) -> tuple[str, int]:
        assert self._acceptor is not None
        return self.host, int(self._acceptor.get_port())

    async def start(self) -> None:
        host_key = asyncssh.generate_private_key("ssh-ed25519", comment="demo-login-node")
        self.client_key = asyncssh.generate_private_key("ssh-ed25519", comment="demo-worker")
        self._acceptor = await asyncssh.create_server(
            lambda: _LoginServer(self),
            self.host,
            0,
            server_host_keys=[host_key],
            allow_pty=False,
            x11_forwarding=False,
            agent_forwarding=False,
        )
        _write_private(self.client_key_path, self.client_key.export_private_key())
        public = host_key.export_public_key("openssh").decode().strip()
        _write_private(self.known_hosts, f"[{self.host}]:{self.address[1]} {public}\n".encode())

    async def connect(self) -> asyncssh.SSHClientConnection:
        """A separate SSH client connection, as a user's own ``ssh`` would open."""
        return await asyncssh.connect(
            self.host,
            self.address[1],
            username=SSH_USER,
            client_keys=[self.client_key],
            known_hosts=str(self.known_hosts),
            agent_path=None,
            config=None,
            connect_timeout=SETUP_TIMEOUT,
        )

    async def stop(self) -> None:
        if self._acceptor is not None:
            self._acceptor.close()
        conns = list(self.connections)
        for conn in conns:
            conn.close()
        for conn in conns:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(conn.wait_closed(), 2)
        if self._acceptor is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._acceptor.wait_closed(), 2)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


# -- the clients ------------------------------------------------------------------------------
@dataclass
class PathResult:
    """What one client saw; the table and the exit code are made from these."""

    name: str
    first: str = "not tried"
    after: str = "not tried"
    answered_after_idle: bool = False


class _Client:
    """One application connection (the starter's connection to its shadow, say)."""

    def __init__(self, result: PathResult) -> None:
        self.result = result
        self.reader: Optional[asyncio.StreamReader] = None
        self.writer: Optional[asyncio.StreamWriter] = None

    async def exchange(self, line: str) -> float:
        """Send one line, wait for its echo; round trip in milliseconds."""
        assert self.reader is not None and self.writer is not None
        started = time.perf_counter()  # uvloop's clock ticks in whole milliseconds
        self.writer.write(line.encode() + b"\n")
        await self.writer.drain()
        answer = await asyncio.wait_for(self.reader.readline(), ANSWER_TIMEOUT)
        if not answer:
            raise ConnectionError("closed without an answer")
        if answer != ECHO_PREFIX + line.encode() + b"\n":
            raise ConnectionError(f"unexpected answer {answer[:40]!r}")
        return (time.perf_counter() - started) * 1000

    def close(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()
            self.writer = None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return f"no answer within {ANSWER_TIMEOUT:g} s"
    if isinstance(exc, ConnectionResetError):
        return "error: connection reset"
    text = str(exc) or type(exc).__name__
    return "error: " + " ".join(text.split())[:80]


async def _first(client: _Client, connect: Callable[[], Awaitable[object]]) -> None:
    result = client.result
    try:
        sock = await asyncio.wait_for(connect(), SETUP_TIMEOUT)
        client.reader, client.writer = await asyncio.open_connection(sock=sock)
        ms = await client.exchange(f"hello from {result.name}")
        result.first = f"answered in {ms:.1f} ms"
    except Exception as exc:
        result.first = _describe(exc)
        client.close()


async def _after(client: _Client) -> None:
    result = client.result
    if client.writer is None:
        return
    try:
        ms = await client.exchange(f"still there? {result.name}")
        result.after = f"answered in {ms:.1f} ms"
        result.answered_after_idle = True
    except Exception as exc:
        result.after = _describe(exc)


# -- output -----------------------------------------------------------------------------------
class _Screen:
    """Progress that reads well both in a terminal (one updating line) and in a log."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        isatty = getattr(out, "isatty", None)
        self.tty = bool(isatty and isatty())
        self._width = 0

    def line(self, text: str = "") -> None:
        self.done()
        self.out.write(text + "\n")
        self.out.flush()

    def progress(self, text: str) -> None:
        if not self.tty:
            self.line(text)
            return
        self.out.write("\r" + text.ljust(self._width))
        self._width = len(text)
        self.out.flush()

    def done(self) -> None:
        if self._width:
            self.out.write("\n")
            self._width = 0


def _heartbeats(metrics: Metrics) -> tuple[int, float]:
    """Answered PINGs and their mean round trip in ms, from the daemon's own metrics."""
    count = metrics.registry.get_sample_value("relay_heartbeat_rtt_seconds_count") or 0.0
    total = metrics.registry.get_sample_value("relay_heartbeat_rtt_seconds_sum") or 0.0
    return int(count), (total / count * 1000 if count else 0.0)


def _heartbeat_lines(
    worker_count: int, worker_rtt: float, exit_count: int, exit_rtt: float, heartbeat: float
) -> list[str]:
    """What the heartbeats did. The worker leads: it pings a carrier that has sent nothing
    for one interval, and the exit answers; the exit pings only when those PINGs stop
    coming (its own interval is longer), so on a healthy carrier it sends none."""
    if worker_count:
        first = (
            f"heartbeats: the worker pinged after each {heartbeat:g} s without traffic and the "
            f"exit answered {worker_count} times (mean round trip {worker_rtt:.1f} ms);"
        )
    else:
        first = (
            f"heartbeats: the worker pinged after each {heartbeat:g} s without traffic and the "
            "exit answered none;"
        )
    if exit_count:
        second = (
            "the exit pinged too when the worker's PINGs stopped coming, answered "
            f"{exit_count} times (mean round trip {exit_rtt:.1f} ms)"
        )
    else:
        second = "the exit pings only when the worker's PINGs stop coming: it sent none"
    return [first, "            " + second]


def _table(rows: Sequence[tuple[str, str, str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


# -- the demo ---------------------------------------------------------------------------------
@dataclass
class _Tally:
    """Which of the middlebox's connections belong to which path (the box cannot tell)."""

    plain: list[_Flow]
    relay: list[_Flow]


async def _carriers_up(worker: RelayWorker, exit_addr: tuple[str, int], wanted: int) -> None:
    """Wait until the worker holds ``wanted`` carriers to the exit (it opens them at start)."""
    client = worker.exits[exit_addr]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETUP_TIMEOUT
    while len(client.carriers) < wanted:
        if loop.time() > deadline:
            raise RuntimeError(
                f"the worker has {len(client.carriers)} of {wanted} carriers after "
                f"{SETUP_TIMEOUT:g} s: {client.why or 'no reason given'}"
            )
        await asyncio.sleep(0.02)


async def run_demo(
    idle: float = 10.0,
    blackhole_after: float = 3.0,
    heartbeat: float = 1.0,
    out: TextIO = sys.stdout,
    streams: int = 3,
    carriers: int = 2,
) -> int:
    """Run the side-by-side demo; 0 if every relay stream answered after the idle period."""
    if idle < 0 or blackhole_after <= 0 or heartbeat <= 0 or streams < 1 or carriers < 1:
        raise ValueError(
            "idle >= 0, blackhole_after > 0, heartbeat > 0, streams >= 1 and carriers >= 1"
        )
    screen = _Screen(out)
    loop = asyncio.get_running_loop()
    began = loop.time()
    plain = PathResult(PLAIN)
    relays = [PathResult(f"{RELAY} stream {n}") for n in range(1, streams + 1)]
    async with contextlib.AsyncExitStack() as stack:
        # Each part's stop is registered before it starts, so a failure half-way through
        # still tears down whatever did start, in reverse order.
        workdir = Path(tempfile.mkdtemp(prefix="relay-demo-"))
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)

        echo = EchoServer()
        stack.push_async_callback(echo.stop)
        await echo.start()

        # The secrets go to private files in workdir, as the daemons read them on a site.
        secret = secrets.token_hex(16)
        keys = workdir / "exit.keys"
        _write_private(keys, f"{KEY_ID} {secret}\n".encode())
        relay_exit = RelayExit(
            ExitSettings(
                listen=HostPort(HOST, 0),
                keys=keys,
                allow=(parse_rule(f"{HOST}:{echo.address[1]}"),),
                allow_plain=True,
                heartbeat=heartbeat,
                **DEMO_LIMITS,
            )
        )
        stack.push_async_callback(relay_exit.stop)
        await relay_exit.start()

        box = Middlebox(relay_exit.address, blackhole_after)
        stack.push_async_callback(box.stop)
        await box.start()

        login = LoginNode(box.address, workdir)
        stack.push_async_callback(login.stop)
        await login.start()

        socks_user, socks_password = "glidein", secrets.token_hex(8)
        socks_auth, secret_file = workdir / "socks.auth", workdir / "worker.secret"
        _write_private(socks_auth, f"{socks_user}:{socks_password}\n".encode())
        _write_private(secret_file, secret.encode())
        worker = RelayWorker(
            WorkerSettings(
                socks=HostPort(HOST, 0),
                socks_auth=socks_auth,
                login=(LoginTarget(SSH_USER, *login.address),),
                # Built in, like the login node: the demo needs nothing outside Python.
                ssh_client="asyncssh",
                ssh_key=login.client_key_path,
                known_hosts=login.known_hosts,
                exit=(HostPort(*box.address),),
                key_id=KEY_ID,
                secret_file=secret_file,
                heartbeat=heartbeat,
                connect_timeout=SETUP_TIMEOUT,
                carriers=carriers,
            )
        )
        stack.push_async_callback(worker.stop)
        await worker.start()
        # The carriers are the worker's, opened at start: every connection the middlebox
        # sees before the plain client connects is one of them.
        await _carriers_up(worker, box.address, carriers)

        _intro(screen, echo, relay_exit, box, login, worker, idle, heartbeat, streams, carriers)

        async def open_plain() -> object:
            """ssh -L to the firewall's far side, then SOCKS5 with the key as password."""
            ssh = await login.connect()
            stack.push_async_callback(_close_ssh, ssh)
            forward = await ssh.forward_local_port(HOST, 0, *box.address)
            url = f"socks5://{KEY_ID}:{secret}@{HOST}:{forward.get_port()}"
            return await Proxy.from_url(url).connect(*echo.address)

        async def open_relay() -> object:
            host, port = worker.address
            url = f"socks5://{socks_user}:{socks_password}@{host}:{port}"
            return await Proxy.from_url(url).connect(*echo.address)

        plain_client = _Client(plain)
        relay_clients = [_Client(result) for result in relays]
        for client in (plain_client, *relay_clients):
            stack.callback(client.close)
        before = len(box.flows)
        await _first(plain_client, open_plain)
        tally = _Tally(plain=box.flows[before:], relay=box.flows[:before])
        screen.line(f"  {PLAIN}: first line {plain.first}")
        for client in relay_clients:
            await _first(client, open_relay)
            screen.line(f"  {client.result.name}: first line {client.result.first}")
        screen.line()
        await _idle(screen, idle, box, relay_exit, worker)
        screen.line(
            "sending one more line on each connection "
            f"(waiting up to {ANSWER_TIMEOUT:g} s for the answers) ..."
        )
        await asyncio.gather(*(_after(client) for client in (plain_client, *relay_clients)))
        # Connections the worker opened after the plain client's are its carriers too.
        tally.relay += box.flows[before + len(tally.plain) :]
        _report(
            screen,
            plain,
            relays,
            box,
            tally,
            relay_exit,
            worker,
            idle,
            blackhole_after,
            heartbeat,
            carriers,
        )
    await asyncio.sleep(0)  # let the transports just closed release their sockets
    screen.line(f"demo finished in {loop.time() - began:.1f} s")
    return 0 if all(result.answered_after_idle for result in relays) else 1


async def _close_ssh(conn: asyncssh.SSHClientConnection) -> None:
    conn.close()  # also closes its port forwards
    await conn.wait_closed()


def _intro(
    screen: _Screen,
    echo: EchoServer,
    relay_exit: RelayExit,
    box: Middlebox,
    login: LoginNode,
    worker: RelayWorker,
    idle: float,
    heartbeat: float,
    streams: int,
    carriers: int,
) -> None:
    def at(address: tuple[str, int]) -> str:
        return f"{address[0]}:{address[1]}"

    screen.line("hpc-relay demo: both paths cross the same login node and the same firewall")
    screen.line(f"  destination (echo)         {at(echo.address)}")
    screen.line(
        f"  relay-exit                 {at(relay_exit.address)}  plain SOCKS5 allowed, "
        f"heartbeat {heartbeat:g} s"
    )
    screen.line(
        f"  middlebox (firewall)       {at(box.address)} -> exit, drops connections "
        f"idle > {box.blackhole_after:g} s without FIN/RST"
    )
    screen.line(
        f"  login node (embedded sshd) {at(login.address)}  key auth, forwards only to the "
        "middlebox"
    )
    screen.line(
        f"  relay-worker SOCKS5        {at(worker.address)}  {_plural(carriers, 'carrier')} to "
        f"the exit, heartbeat {heartbeat:g} s on each"
    )
    screen.line()
    screen.line(
        "opening a plain SOCKS5 connection (through the middlebox on its own) and "
        f"{_plural(streams, 'stream')}"
    )
    screen.line(
        f"through the relay (all on its {_plural(carriers, 'carrier')}); then everything stays "
        f"silent for {idle:g} s:"
    )


async def _idle(
    screen: _Screen, idle: float, box: Middlebox, relay_exit: RelayExit, worker: RelayWorker
) -> None:
    """Wait out the quiet period, saying once a second what the firewall has done so far."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    ticks = [float(t) for t in range(1, math.ceil(idle))] + ([idle] if idle > 0 else [])
    for t in ticks:
        await asyncio.sleep(max(0.0, start + t - loop.time()))
        beats = _heartbeats(worker.metrics)[0] + _heartbeats(relay_exit.metrics)[0]
        screen.progress(
            f"idle {t:g}/{idle:g} s  middlebox has black-holed {box.blackholed} of "
            f"{box.connections} connection(s); relay heartbeats answered: {beats}"
        )
    screen.done()


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _fate(flows: Sequence[_Flow]) -> str:
    dead = sum(1 for flow in flows if flow.blackholed)
    if not dead:
        return "none black-holed"
    if dead == len(flows):
        return {1: "black-holed", 2: "both black-holed"}.get(dead, f"all {dead} black-holed")
    return f"{dead} black-holed"


def _report(
    screen: _Screen,
    plain: PathResult,
    relays: Sequence[PathResult],
    box: Middlebox,
    tally: _Tally,
    relay_exit: RelayExit,
    worker: RelayWorker,
    idle: float,
    blackhole_after: float,
    heartbeat: float,
    carriers: int,
) -> None:
    screen.line()
    rows = [("path", "first exchange", f"after {idle:g} s idle")]
    rows += [(r.name, r.first, r.after) for r in (plain, *relays)]
    for text in _table(rows):
        screen.line("  " + text)
    screen.line()
    w_count, w_rtt = _heartbeats(worker.metrics)
    x_count, x_rtt = _heartbeats(relay_exit.metrics)
    rtt = f" (mean RTT {w_rtt:.1f} ms)" if w_count else ""
    screen.line(
        f"heartbeats: the worker leaves no carrier silent for more than {heartbeat:g} s (PING); "
        f"the exit answered {w_count}{rtt};"
    )
    own = f", mean RTT {x_rtt:.1f} ms" if x_count else ""
    screen.line(
        "            the exit pings only when the worker's pings stop: "
        f"{x_count} of its own answered{own}"
    )
    screen.line(
        f"middlebox: {_plural(box.connections, 'connection')} seen, {box.blackholed} "
        f"black-holed (timeout {blackhole_after:g} s)"
    )
    screen.line(
        f"  plain SOCKS5: 1 stream, {_plural(len(tally.plain), 'connection')} of its own, "
        f"{_fate(tally.plain)}"
    )
    screen.line(
        f"  {RELAY}: {_plural(len(relays), 'stream')} rode {_plural(carriers, 'carrier')} "
        f"({_plural(len(tally.relay), 'connection')} through the middlebox, "
        f"{_fate(tally.relay)})"
    )
    if all(r.answered_after_idle for r in relays):
        verdict = (
            f"verdict: OK - every {RELAY} stream answered after {idle:g} s of silence behind "
            f"a firewall that drops connections idle for {blackhole_after:g} s"
        )
        if plain.answered_after_idle:
            screen.line(verdict)
            why = (
                f"the idle period ({idle:g} s) is not longer than the middlebox timeout "
                f"({blackhole_after:g} s)"
                if idle <= blackhole_after
                else "unexpectedly"
            )
            screen.line(
                f"note: the plain SOCKS5 path survived too ({why}), so this run does not "
                "show the failure it is meant to show"
            )
        else:
            screen.line(verdict + ";")
            screen.line(
                "         the plain SOCKS5 connection went silently dead, as the shadow "
                "connections of the prototype did (expected; it does not affect the result)"
            )
    else:
        lost = sum(1 for r in relays if not r.answered_after_idle)
        screen.line(
            f"verdict: FAILED - {lost} of {_plural(len(relays), RELAY + ' stream')} did not "
            "answer after the idle period"
        )
        if heartbeat >= blackhole_after:
            screen.line(
                f"hint: the heartbeat ({heartbeat:g} s) must be shorter than the middlebox "
                f"timeout ({blackhole_after:g} s)"
            )


# -- command line -----------------------------------------------------------------------------
def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def _not_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or more seconds: {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= 64:
        raise argparse.ArgumentTypeError(f"must be 1 to 64: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay demo",
        description=(
            "Run the whole chain on 127.0.0.1 (embedded SSH login node, idle-killing "
            "firewall, relay-exit, relay-worker, echo destination) and show a plain SOCKS5 "
            "connection dying while the relay's streams, multiplexed on a few carriers, "
            "survive. Exit status 0 if every relay stream answered after the idle period."
        ),
    )
    parser.add_argument(
        "--idle",
        type=_not_negative,
        default=10.0,
        metavar="SECONDS",
        help="how long both connections stay silent (default: 10)",
    )
    parser.add_argument(
        "--blackhole-after",
        type=_positive,
        default=3.0,
        metavar="SECONDS",
        help="the firewall drops connections idle for longer than this (default: 3)",
    )
    parser.add_argument(
        "--heartbeat",
        type=_positive,
        default=1.0,
        metavar="SECONDS",
        help="relay heartbeat interval, worker and exit (default: 1)",
    )
    parser.add_argument(
        "--streams",
        type=_count,
        default=3,
        metavar="N",
        help="streams opened through the relay (default: 3)",
    )
    parser.add_argument(
        "--carriers",
        type=_count,
        default=2,
        metavar="N",
        help="carriers the worker keeps to the exit, all streams multiplexed on them "
        "(default: 2, as relay-worker's --carriers)",
    )
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="daemon log level, to stderr (default: warning)",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``relay demo``: parse the flags, run the demo, return its exit status."""
    args = build_parser().parse_args(argv)
    setup_logging("text", args.log_level)
    started = time.monotonic()
    try:
        return asyncio.run(
            run_demo(
                idle=args.idle,
                blackhole_after=args.blackhole_after,
                heartbeat=args.heartbeat,
                streams=args.streams,
                carriers=args.carriers,
            )
        )
    except KeyboardInterrupt:
        print(f"\ninterrupted after {time.monotonic() - started:.1f} s", file=sys.stderr)
        return 130
    except Exception as exc:
        log.debug("demo failed", exc_info=True)
        print(f"relay demo: could not run the demo: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
