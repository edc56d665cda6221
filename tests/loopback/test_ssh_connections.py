"""``--ssh-connections 2`` against a real sshd, with both SSH clients: two logins, each carrier
of the exit on its own SSH connection (one sshd session each), bulk both ways intact; one
connection killed mid-transfer, its streams resumed on the other, every byte once, the
connection back; and every slot's logins counted against the one login-rate cap."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from python_socks.async_.asyncio import Proxy

from relay.exit.daemon import RelayExit
from relay.net.openssh import OpenSshConnection
from relay.net.sshhop import Login, SshHop
from relay.worker.daemon import RelayWorker
from relay.worker.exitclient import ExitClient
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
from tests.support.proc import descendants
from tests.support.sshd import Sshd

CLIENTS = ["openssh", "asyncssh"]


# -- what sshd and the kernel show ----------------------------------------------------------
def _children(pid: int) -> list[int]:
    """Direct children of ``pid``: for sshd's listener, one per SSH connection."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            found.append(int(entry))
    return found


def _tcp() -> dict[int, tuple[int, int]]:
    """Established IPv4 TCP sockets by inode: (local port, remote port)."""
    table = {}
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = row.split()
        if f[3] == "01":
            table[int(f[9])] = (int(f[1].split(":")[1], 16), int(f[2].split(":")[1], 16))
    return table


def _sockets(pids: list[int]) -> set[int]:
    inodes = set()
    for pid in pids:
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for name in names:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{name}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def sessions(sshd: Sshd) -> dict[int, list[int]]:
    """sshd's SSH connections: each session's process and its descendants."""
    return {pid: [pid, *descendants(pid)] for pid in _children(sshd.pid)}


def links(sshd: Sshd, port: int, remote: bool = True) -> dict[int, int]:
    """How many TCP connections each SSH session holds with ``port`` as its remote end (the
    exit: a carrier's channel), or as its local end (sshd's: the login itself)."""
    table = _tcp()
    count = {}
    for session, pids in sessions(sshd).items():
        ports = [table[i] for i in _sockets(pids) if i in table]
        count[session] = sum(1 for local, far in ports if (far if remote else local) == port)
    return count


def session_of(sshd: Sshd, client_port: int) -> int:
    """The sshd session whose login came from ``client_port`` on this host."""
    table = _tcp()
    for session, pids in sessions(sshd).items():
        if any(table.get(i) == (sshd.port, client_port) for i in _sockets(pids)):
            return session
    raise AssertionError(f"no sshd session for the login from port {client_port}")


def ssh_pids(hop: SshHop) -> list[int]:
    """The worker's ``ssh`` processes (openssh), one per slot that is up."""
    return [s.conn.proc.pid for s in hop.slots if isinstance(s.conn, OpenSshConnection)]


# -- the chain ------------------------------------------------------------------------------
class Chain:
    def __init__(self, worker: RelayWorker, relay_exit: RelayExit, echo: int) -> None:
        self.worker = worker
        self.exit = relay_exit
        self.echo = echo

    @property
    def hop(self) -> SshHop:
        assert self.worker.ssh is not None
        return self.worker.ssh

    @property
    def client(self) -> ExitClient:
        return self.worker.exits[self.exit.address]

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        proxy = Proxy.from_url(f"socks5://{USER}:{PASSWORD}@127.0.0.1:{self.worker.address[1]}")
        sock = await proxy.connect("127.0.0.1", self.echo, timeout=20)
        return await asyncio.open_connection(sock=sock)

    async def echo_streams(
        self,
        count: int,
        size: int,
        chunk: int = 64 * 1024,
        midway: Optional[Callable[[], Any]] = None,
    ) -> None:
        """``count`` streams at once, each writing ``size`` random bytes to the echo server
        and reading them back to the end: every byte must come back exactly once, in order.
        ``midway`` runs when the first stream has written half of its bytes."""
        opened = [await self.open() for _ in range(count)]

        async def one(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            data = os.urandom(size)

            async def write() -> None:
                for start in range(0, size, chunk):
                    writer.write(data[start : start + chunk])
                    await writer.drain()
                    if midway is not None and n == 0 and start <= size // 2 < start + chunk:
                        midway()
                    if midway is not None:
                        await asyncio.sleep(0.005)
                writer.write_eof()

            sending = asyncio.ensure_future(write())
            got = await asyncio.wait_for(reader.read(), 60)
            await sending
            writer.close()
            assert len(got) == size and got == data, f"stream {n}: {len(got)} of {size} bytes"

        await asyncio.gather(*(one(n, r, w) for n, (r, w) in enumerate(opened)))


@pytest.fixture
async def duo(sshd: Sshd, request: pytest.FixtureRequest) -> AsyncIterator[Chain]:
    """Exit and worker in this process, the worker with two carriers on two SSH connections
    and the options the test gives as its (indirect) parameter."""
    options: dict[str, Any] = {"carriers": 2, "ssh_connections": 2, **request.param}
    if options.get("ssh_client") == "openssh":
        options["ssh_config"] = Path("/dev/null")
    servers = Servers()
    echo = await servers.start(echo_handler)
    relay_exit = RelayExit(exit_settings())
    await relay_exit.start()
    worker = RelayWorker(worker_settings(sshd, relay_exit.address, **options))
    await worker.start()
    try:
        yield Chain(worker, relay_exit, echo)
    finally:
        await worker.stop()
        await relay_exit.stop()
        await servers.close()


def both_up(chain: Chain, sshd: Sshd) -> Callable[[], bool]:
    """Both carriers up, one on each of two SSH connections (each with one channel)."""
    exit_port = chain.exit.address[1]
    return lambda: (
        len(chain.client.carriers) == 2
        and chain.hop.slot_connected(0)
        and chain.hop.slot_connected(1)
        and sorted(links(sshd, exit_port).values()) == [1, 1]
    )


# -- tests ----------------------------------------------------------------------------------
@pytest.mark.parametrize("duo", [{"ssh_client": c} for c in CLIENTS], ids=CLIENTS, indirect=True)
async def test_each_carrier_rides_its_own_ssh_connection(duo: Chain, sshd: Sshd) -> None:
    login = str(Login(sshd.user, sshd.host, sshd.port))
    assert await wait_for(both_up(duo, sshd), 20), links(sshd, duo.exit.address[1])
    assert len(sessions(sshd)) == 2
    assert sorted(duo.client.places.values()) == [0, 1]
    assert metric(duo.worker.metrics, "relay_ssh_connects_total", login=login, result="ok") == 2
    assert metric(duo.worker.metrics, "relay_ssh_connections_active") == 2
    if duo.worker.settings.ssh_client == "openssh":
        assert len(set(ssh_pids(duo.hop))) == 2
        conns = [s.conn for s in duo.hop.slots]
        assert all(isinstance(c, OpenSshConnection) for c in conns)
        paths = [set(c.sockets.values()) for c in conns if isinstance(c, OpenSshConnection)]
        assert not paths[0] & paths[1]  # each ssh has its own forward sockets

    await duo.echo_streams(4, 4 << 20)

    assert len(sessions(sshd)) == 2
    assert sorted(links(sshd, duo.exit.address[1]).values()) == [1, 1]
    assert metric(duo.worker.metrics, "relay_ssh_connects_total", login=login, result="ok") == 2
    assert metric(duo.worker.metrics, "relay_reconnects_total") == 0


@pytest.mark.parametrize("duo", [{"ssh_client": c} for c in CLIENTS], ids=CLIENTS, indirect=True)
async def test_a_killed_connection_moves_its_streams_and_comes_back(duo: Chain, sshd: Sshd) -> None:
    """openssh: SIGKILL the second slot's ssh; asyncssh: SIGKILL the sshd session of the
    second slot's login. Streams on its carrier resume on the other; the slot logs in again."""
    login = str(Login(sshd.user, sshd.host, sshd.port))
    assert await wait_for(both_up(duo, sshd), 20)
    victim, survivor = duo.hop.slots[1].conn, duo.hop.slots[0].conn
    assert victim is not None and survivor is not None
    killed: list[int] = []

    def kill() -> None:
        if isinstance(victim, OpenSshConnection):
            killed.append(victim.proc.pid)
        else:
            session = session_of(sshd, victim.get_extra_info("sockname")[1])
            killed.extend([session, *descendants(session)])
        for pid in killed:
            os.kill(pid, signal.SIGKILL)

    await duo.echo_streams(4, 2 << 20, midway=kill)

    assert killed
    metrics = duo.worker.metrics
    assert metric(metrics, "relay_resumes_total", result="ok") >= 1
    assert await wait_for(both_up(duo, sshd), 20), links(sshd, duo.exit.address[1])
    assert duo.hop.slots[1].conn is not victim
    assert duo.hop.slots[0].conn is survivor  # the other connection was left alone
    assert metric(metrics, "relay_reconnects_total") == 2  # one SSH connection, one carrier
    assert len(sessions(sshd)) == 2
    assert metric(metrics, "relay_ssh_connects_total", login=login, result="ok") == 3
    assert sorted(duo.client.places.values()) == [0, 1]
    if duo.worker.settings.ssh_client == "openssh":
        assert killed[0] not in ssh_pids(duo.hop) and len(set(ssh_pids(duo.hop))) == 2

    await duo.echo_streams(2, 1 << 20)  # both connections carry again


@pytest.mark.parametrize(
    "duo",
    [{"ssh_client": "openssh", "ssh_connect_rate": 4.0}],
    ids=["openssh"],
    indirect=True,
)
async def test_the_logins_of_both_connections_count_against_one_cap(duo: Chain, sshd: Sshd) -> None:
    """4 logins a minute, 2 connections: 2 logins at start, 2 replacements, then the cap
    refuses the next one; the other connection carries on meanwhile."""
    login = str(Login(sshd.user, sshd.host, sshd.port))
    metrics = duo.worker.metrics

    def ok() -> float:
        return metric(metrics, "relay_ssh_connects_total", login=login, result="ok")

    def limited() -> float:
        return metric(metrics, "relay_ssh_connects_total", login=login, result="rate-limited")

    def replaced(victim: OpenSshConnection) -> Callable[[], bool]:
        return lambda: duo.hop.slots[1].conn not in (None, victim)

    assert await wait_for(both_up(duo, sshd), 20)
    assert ok() == 2
    for expected in (3, 4):
        victim = duo.hop.slots[1].conn
        assert isinstance(victim, OpenSshConnection)
        os.kill(victim.proc.pid, signal.SIGKILL)
        assert await wait_for(replaced(victim), 20)
        assert ok() == expected
    assert await wait_for(both_up(duo, sshd), 20)

    victim = duo.hop.slots[1].conn
    assert isinstance(victim, OpenSshConnection)
    os.kill(victim.proc.pid, signal.SIGKILL)
    assert await wait_for(lambda: limited() >= 1, 20)
    assert ok() == 4 and not duo.hop.slot_connected(1)
    await duo.echo_streams(2, 256 << 10)  # on the first connection's carrier

    survivor = duo.hop.slots[0].conn
    assert isinstance(survivor, OpenSshConnection)
    os.kill(survivor.proc.pid, signal.SIGKILL)  # both slots want a login: the cap holds

    def asked() -> bool:
        duo.client.demand()  # as a client waiting for a stream does, once a second
        return limited() >= 2 and not duo.hop.connected

    assert await wait_for(asked, 20)
    assert ok() == 4
    assert metric(metrics, "relay_ssh_connects_total", login=login, result="failed") == 0
