"""The worker's OpenSSH client transport (--ssh-client openssh) against a real sshd: carriers
as Unix-socket forwards of one ``ssh -N``, its death a carrier loss that resume covers, and
ssh's own errors turned into causes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from python_socks import ProxyError
from python_socks.async_.asyncio import Proxy

from relay.exit.daemon import RelayExit
from relay.metrics import Metrics
from relay.net.openssh import OpenSshConnection, OpenSshError, classify, command
from relay.net.sshhop import Login, SshHop, SshUnavailable
from relay.worker.daemon import RelayWorker
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
from tests.support.sshd import Sshd


def test_command_asks_for_no_shell_no_prompt_and_one_forward_per_target(tmp_path: Path) -> None:
    argv = command(
        "login.example",
        2222,
        "alice",
        ["/run/x/0:203.0.113.2:80", "/run/x/1:[2001:db8::1]:443"],
        client_key=tmp_path / "id",
        known_hosts=tmp_path / "kh",
        keepalive=15.0,
        connect_timeout=10.5,
        config=tmp_path / "cfg",
    )
    assert argv[:3] == ["ssh", "-F", str(tmp_path / "cfg")]
    assert argv[-1] == "login.example"
    assert "-N" in argv and "BatchMode=yes" in argv and "ExitOnForwardFailure=yes" in argv
    assert "ServerAliveInterval=15" in argv and "ConnectTimeout=11" in argv
    forwards = [argv[i + 1] for i, a in enumerate(argv) if a == "-L"]
    assert forwards == ["/run/x/0:203.0.113.2:80", "/run/x/1:[2001:db8::1]:443"]
    assert argv[argv.index("-p") + 1] == "2222" and argv[argv.index("-l") + 1] == "alice"
    assert argv[argv.index("-i") + 1] == str(tmp_path / "id")


@pytest.mark.parametrize(
    ("lines", "kind"),
    [
        (["Host key verification failed."], "host-key"),
        (["alice@10.0.0.1: Permission denied (publickey)."], "auth"),
        (["ssh: connect to host 10.0.0.1 port 22: Connection refused"], "refused"),
        (["ssh: connect to host 10.0.0.1 port 22: Connection timed out"], "timeout"),
        (["ssh: Could not resolve hostname nowhere: Name or service not known"], "resolve"),
        (['Load key "/x": invalid format', "alice@h: Permission denied (publickey)."], "key"),
        (["kex_exchange_identification: Connection closed by remote host"], "closed"),
        (["something new"], "other"),
        ([], "other"),
    ],
)
def test_ssh_errors_are_classified(lines: list[str], kind: str) -> None:
    got, message = classify(lines)
    assert got == kind
    assert message


async def _echo_through(worker: RelayWorker, port: int, data: bytes) -> bytes:
    proxy = Proxy.from_url(f"socks5://{USER}:{PASSWORD}@127.0.0.1:{worker.address[1]}")
    sock = await proxy.connect("127.0.0.1", port, timeout=20)
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.readexactly(len(data)), 20)
    finally:
        writer.close()


async def test_carriers_share_one_ssh_process_and_survive_its_death(sshd: Sshd) -> None:
    """Both carriers ride one login; killing ssh moves the live stream to a new login, and
    every byte written before, during and after arrives once, in order."""
    servers = Servers()
    port = await servers.start(echo_handler)
    relay_exit = RelayExit(exit_settings())
    await relay_exit.start()
    worker = RelayWorker(
        worker_settings(sshd, relay_exit.address, ssh_client="openssh", carriers=2)
    )
    await worker.start()
    login = str(Login(sshd.user, sshd.host, sshd.port))
    try:
        assert await _echo_through(worker, port, b"ping") == b"ping"
        client = worker.exits[relay_exit.address]
        assert await wait_for(lambda: len(client.carriers) == 2)
        assert metric(worker.metrics, "relay_ssh_connects_total", login=login, result="ok") == 1
        assert worker.ssh is not None
        conn = await worker.ssh.connection()
        assert isinstance(conn, OpenSshConnection)

        proxy = Proxy.from_url(f"socks5://{USER}:{PASSWORD}@127.0.0.1:{worker.address[1]}")
        reader, writer = await asyncio.open_connection(
            sock=await proxy.connect("127.0.0.1", port, timeout=20)
        )
        sent = bytearray()
        for i in range(50):
            chunk = os.urandom(1000 + i)
            sent += chunk
            writer.write(chunk)
            if i == 20:
                os.kill(conn.proc.pid, signal.SIGKILL)
            await asyncio.sleep(0.01)
        got = await asyncio.wait_for(reader.readexactly(len(sent)), 30)
        assert got == bytes(sent)
        writer.close()
        assert metric(worker.metrics, "relay_ssh_connects_total", login=login, result="ok") == 2
        assert not conn.workdir.exists()  # the dead process's sockets are gone
    finally:
        await worker.stop()
        await relay_exit.stop()
        await servers.close()
    assert worker.ssh is not None and not worker.ssh.connected


async def test_exit_unreachable_from_the_login_node_says_so(sshd: Sshd) -> None:
    servers = Servers()
    port = await servers.start(echo_handler)
    worker = RelayWorker(
        worker_settings(sshd, ("127.0.0.1", 1), ssh_client="openssh", no_optimistic=True)
    )
    await worker.start()
    try:
        with pytest.raises(ProxyError):
            await _echo_through(worker, port, b"x")
        client = worker.exits[("127.0.0.1", 1)]
        assert await wait_for(lambda: "cannot reach the exit" in (client.why or ""))
        assert "Connection refused" in (client.why or "")
    finally:
        await worker.stop()
        await servers.close()
    assert metric(worker.metrics, "relay_carriers_total", result="exit-unreachable") >= 1


@pytest.mark.parametrize("fault", ["wrong-key", "unknown-host", "sshd-down"])
async def test_login_failures_name_their_cause(sshd: Sshd, tmp_path: Path, fault: str) -> None:
    key, known = sshd.client_key, sshd.known_hosts
    if fault == "wrong-key":
        key = tmp_path / "other"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                       check=True)  # fmt: skip
    elif fault == "unknown-host":
        known = tmp_path / "empty_known_hosts"
        known.write_text("")
    else:
        sshd.stop()
    login = Login(sshd.user, sshd.host, sshd.port)
    hop = SshHop([login], key, known, Metrics("worker"), client="openssh",
                 targets=[("127.0.0.1", 1)], ssh_config=Path("/dev/null"))  # fmt: skip
    with pytest.raises(SshUnavailable) as info:
        await hop.connection()
    await hop.close()
    expected = {
        "wrong-key": "permission denied",
        "unknown-host": "host key not verifiable",
        "sshd-down": "Connection refused",
    }[fault]
    assert expected in str(info.value)


async def test_no_ssh_program_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(OpenSshError) as info:
        await OpenSshConnection.start(
            "127.0.0.1", 22, None, [("127.0.0.1", 1)], program=str(tmp_path / "no-ssh")
        )
    assert info.value.kind == "missing"
    assert "cannot run" in str(info.value)


_ORPHAN = """
import asyncio, sys
from pathlib import Path
from relay.net.openssh import OpenSshConnection

async def main():
    conn = await OpenSshConnection.start(
        {host!r}, {port}, {user!r}, [("127.0.0.1", 1)], client_key=Path({key!r}),
        known_hosts=Path({known!r}), config=Path("/dev/null"))
    print(conn.proc.pid, flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def test_a_killed_worker_leaves_no_ssh_behind(sshd: Sshd) -> None:
    """Slurm may SIGKILL the worker; its ssh must not stay logged in on the login node."""
    code = _ORPHAN.format(host=sshd.host, port=sshd.port, user=sshd.user,
                          key=str(sshd.client_key), known=str(sshd.known_hosts))  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=str(Path(__file__).resolve().parents[2]))  # fmt: skip
    try:
        assert proc.stdout is not None
        ssh_pid = int(proc.stdout.readline())
        os.kill(ssh_pid, 0)  # running
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(ssh_pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            os.kill(ssh_pid, signal.SIGKILL)
            pytest.fail("ssh outlived the killed worker")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_the_connection_lives_until_closed(sshd: Sshd, monkeypatch) -> None:
    """Waiting for the end of ssh (as the hop's watcher does) never ends it; close() does,
    with SIGKILL after the grace period if SIGTERM is not enough."""
    import relay.net.openssh

    monkeypatch.setattr(relay.net.openssh, "_TERM_GRACE", 0.2)
    hop = SshHop([Login(sshd.user, sshd.host, sshd.port)], sshd.client_key, sshd.known_hosts,
                 Metrics("worker"), client="openssh", targets=[("127.0.0.1", 1)],
                 ssh_config=Path("/dev/null"))  # fmt: skip
    conn = await hop.connection()
    assert isinstance(conn, OpenSshConnection)
    await asyncio.sleep(1.0)
    assert conn.alive and hop.connected
    os.kill(conn.proc.pid, signal.SIGSTOP)  # deaf to SIGTERM until killed
    conn.close()
    await asyncio.wait_for(conn.wait_closed(), 10)
    assert conn.proc.returncode == -signal.SIGKILL
    assert await wait_for(lambda: not hop.connected)
    await hop.close()


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_carrier_closed_before_its_first_byte_fails_its_handshake(loop_kind: str) -> None:
    """ssh may close a forward's connection (channel refused) before the HELLO is written;
    uvloop raises on a write to a closed transport, which once killed the carrier keeper."""
    import socket

    import uvloop

    from relay.errors import DialFailed
    from relay.net.carrier import TcpCarrier, carrier_opener
    from relay.worker.dialler import Dialler

    async def closed_carrier() -> TcpCarrier:
        ours, theirs = socket.socketpair()
        theirs.close()  # the far end is gone at once
        loop = asyncio.get_running_loop()
        _, carrier = await loop.create_unix_connection(TcpCarrier, sock=ours)
        await asyncio.sleep(0.05)  # connection_lost has run
        return carrier

    async def scenario() -> None:
        carrier = await closed_carrier()
        carrier.start(carrier_opener(b"k" * 32, "worker-1", 25.0))
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(carrier.established, 5)
        # The keeper's way: the dialler's HELLO fails, counted, and says why.
        metrics = Metrics("worker")
        dialler = Dialler(worker_settings(None, ("127.0.0.1", 9)), metrics, None)
        with pytest.raises(DialFailed, match="tunnel handshake: carrier closed") as failed:
            await dialler.hello(await closed_carrier(), timeout=5)
        assert isinstance(failed.value.__cause__, ConnectionError)
        assert metric(metrics, "relay_carriers_total", result="failed") == 1

    loop = uvloop.new_event_loop() if loop_kind == "uvloop" else asyncio.new_event_loop()
    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()


def _established(local_port: int) -> bool:
    """True while a TCP connection from 127.0.0.1:local_port is established (any process)."""
    want = f"0100007F:{local_port:04X}"
    with open("/proc/net/tcp") as table:
        return any(
            f[1] == want and f[3] == "01" for f in (row.split() for row in table) if len(f) > 3
        )


async def test_the_worker_holds_ssh_s_connection_only_while_ssh_lives(sshd: Sshd) -> None:
    """The worker keeps a duplicate of ssh's connection to the login node (to acknowledge
    sshd's small packets at once); when ssh dies, the duplicate does not keep the connection
    open."""
    hop = SshHop([Login(sshd.user, sshd.host, sshd.port)], sshd.client_key, sshd.known_hosts,
                 Metrics("worker"), client="openssh", targets=[("127.0.0.1", 1)],
                 ssh_config=Path("/dev/null"))  # fmt: skip
    conn = await hop.connection()
    assert isinstance(conn, OpenSshConnection)
    sock = conn.login_socket
    assert sock is not None
    assert sock.getpeername()[:2] == (sshd.host, sshd.port)
    local_port = sock.getsockname()[1]
    assert _established(local_port)
    conn.acknowledge()  # a socket option, nothing read or written
    os.kill(conn.proc.pid, signal.SIGKILL)
    await asyncio.wait_for(conn.wait_closed(), 10)
    assert conn.login_socket is None
    assert await wait_for(lambda: not _established(local_port))
    await hop.close()


async def test_behind_a_proxy_command_there_is_no_duplicate_and_carriers_work(
    sshd: Sshd, tmp_path: Path
) -> None:
    """With ProxyCommand (or ProxyJump) ssh has no TCP socket of its own: the worker does
    without the duplicate, and streams pass as before."""
    config = tmp_path / "ssh_config"
    config.write_text("Host *\n    ProxyCommand socat - TCP:%h:%p\n")
    servers = Servers()
    port = await servers.start(echo_handler)
    relay_exit = RelayExit(exit_settings())
    await relay_exit.start()
    worker = RelayWorker(
        worker_settings(sshd, relay_exit.address, ssh_client="openssh", ssh_config=config)
    )
    await worker.start()
    try:
        assert await _echo_through(worker, port, b"through socat") == b"through socat"
        assert worker.ssh is not None
        conn = await worker.ssh.connection()
        assert isinstance(conn, OpenSshConnection)
        assert conn.login_socket is None
    finally:
        await worker.stop()
        await relay_exit.stop()
        await servers.close()
