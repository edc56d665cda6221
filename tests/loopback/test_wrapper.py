"""glidein-wrapper as a batch job runs it, on loopback: OpenSSH sshd as the login node and
relay-exit in this process; the stand-in glidein is a separate, proxy-unaware program.

The firewall lab version (destination reachable only through the chain, idle-killing
firewall) is in test_wrapper_lab.py; here: readiness failures, signals and exit statuses."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from glidein_wrapper.ready import InProcessCheck, NotReady, wait_ready
from relay.config.values import HostPort
from relay.exit.daemon import RelayExit
from relay.exit.sessions import ExitMux
from relay.worker.daemon import RelayWorker
from tests.support.helpers import Servers, echo_handler, exit_settings, metric, worker_settings
from tests.support.relays import KEY_ID, SECRET, fetch
from tests.support.sshd import Sshd, _keygen
from tests.support.wrapper import read_report, standin, wrapper_argv, write_worker_config


@pytest.fixture
async def relay_exit() -> AsyncIterator[RelayExit]:
    ex = RelayExit(exit_settings(secrets={KEY_ID: SECRET.encode()}))
    await ex.start()
    try:
        yield ex
    finally:
        await ex.stop()


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    servers = Servers()
    try:
        yield await servers.start(echo_handler)
    finally:
        await servers.close()


async def closed_port() -> int:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    server.close()
    await server.wait_closed()
    return port


class Run:
    """A wrapper process with its output in a log file (a pipe could fill up and stall it)."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.proc = proc
        self.log = log

    @classmethod
    async def start(cls, argv: list[str], log: Path, **env: str) -> Run:
        handle = log.open("wb")
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=handle, stderr=handle, env={**os.environ, **env}
        )
        handle.close()
        return cls(proc, log)

    async def wait(self, timeout: float = 60) -> int:
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise AssertionError(f"wrapper did not exit in {timeout} s:\n{self.text()}") from None

    def text(self) -> str:
        return self.log.read_text(errors="replace")


async def wait_path(path: Path, run: Run, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if run.proc.returncode is not None:
            raise AssertionError(f"wrapper exited {run.proc.returncode}:\n{run.text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path.name} did not appear:\n{run.text()}")
        await asyncio.sleep(0.05)


def carrier_joins(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The session id of every carrier the exit accepts from now on."""
    joins: list[bytes] = []
    join = ExitMux.join

    def spy(self: ExitMux, *args: Any) -> int:
        joins.append(self.session_id)
        return join(self, *args)

    monkeypatch.setattr(ExitMux, "join", spy)
    return joins


def config_for(tmp_path: Path, sshd: Sshd, ex: RelayExit, **extra: Any) -> Path:
    host, port = ex.address
    return write_worker_config(tmp_path / "worker", sshd, [f"{host}:{port}"], **extra)


async def test_sigterm_reaches_the_command_which_exits_0_after_cleanup(
    sshd: Sshd,
    relay_exit: RelayExit,
    echo_port: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    joins = carrier_joins(monkeypatch)
    report = tmp_path / "report.json"
    metrics_port = await closed_port()
    argv = wrapper_argv(
        config_for(tmp_path, sshd, relay_exit, metrics=f"127.0.0.1:{metrics_port}"),
        "--probe", f"127.0.0.1:{echo_port}", "--status-interval", "0.5", "--drain-timeout", "5",
        command=standin(report, "--echo", f"127.0.0.1:{echo_port}", "--wait-signal"),
    )  # fmt: skip
    run = await Run.start(argv, tmp_path / "wrapper.log")
    await wait_path(report.with_name(report.name + ".ready"), run)
    await asyncio.sleep(1.2)  # long enough for a status line or two
    # the worker's metrics endpoint is up while COMMAND runs
    scraped = await asyncio.to_thread(fetch, f"http://127.0.0.1:{metrics_port}/metrics")
    assert 'relay_info{role="worker"' in scraped
    run.proc.send_signal(signal.SIGTERM)
    assert await run.wait() == 0, run.text()
    result = read_report(report)
    assert result["signal"] == signal.SIGTERM and result["cleaned_up"] is True
    assert result["echo"]["first"] is True, result
    log = run.text()
    assert "forwarding SIGTERM to COMMAND" in log
    assert "COMMAND exited 0" in log
    status = [line for line in log.splitlines() if "glidein_wrapper: status" in line]
    assert status, log
    assert "streams_total=" in status[-1] and "bytes_up=" in status[-1]
    assert "reconnects=0" in status[-1] and "ssh=up" in status[-1]
    # the readiness probe went through the exit (the stand-in's loopback echo did not: the
    # interposer leaves loopback alone; test_wrapper_lab.py has destinations behind the exit)
    assert metric(relay_exit.metrics, "relay_streams_total", result="shutdown") == 1
    # ... as a stream on the worker's own session: no carrier of its own (the exit accepted
    # the worker's two carriers only, both of one session)
    assert len(joins) == 2 and len(set(joins)) == 1, joins


async def test_command_killed_by_a_signal_makes_the_wrapper_exit_128_plus_n(
    sshd: Sshd, relay_exit: RelayExit, tmp_path: Path
) -> None:
    report = tmp_path / "report.json"
    argv = wrapper_argv(
        config_for(tmp_path, sshd, relay_exit),
        command=standin(report, "--wait-signal"),
    )
    run = await Run.start(argv, tmp_path / "wrapper.log")
    await wait_path(report.with_name(report.name + ".ready"), run)
    # SIGUSR1 is forwarded too; the stand-in keeps its default action and dies of it
    run.proc.send_signal(signal.SIGUSR1)
    assert await run.wait() == 128 + signal.SIGUSR1, run.text()
    assert "killed by SIGUSR1" in run.text()
    assert not report.exists()


async def test_exit_status_of_the_command_is_passed_on(
    sshd: Sshd, relay_exit: RelayExit, tmp_path: Path
) -> None:
    argv = wrapper_argv(config_for(tmp_path, sshd, relay_exit), command=["sh", "-c", "exit 7"])
    run = await Run.start(argv, tmp_path / "wrapper.log")
    assert await run.wait() == 7, run.text()


@pytest.mark.parametrize("broken", ["exit", "ssh", "probe", "hello", "ssh-key", "ssh-key-asyncssh"])
async def test_not_ready_exits_75_naming_the_hop_and_starts_nothing(
    sshd: Sshd, relay_exit: RelayExit, echo_port: int, tmp_path: Path, broken: str
) -> None:
    closed = await closed_port()
    host, port = relay_exit.address
    exits = [f"{host}:{closed}" if broken == "exit" else f"{host}:{port}"]
    extra: dict[str, Any] = {}
    if broken == "ssh":
        extra["login"] = f"{sshd.user}@127.0.0.1:{closed}"
    if broken.startswith("ssh-key"):
        stranger = tmp_path / "stranger_ed25519"
        _keygen(stranger, "not-authorised")
        extra["ssh_key"] = str(stranger)
        if broken.endswith("asyncssh"):
            extra["ssh_client"] = "asyncssh"
    if broken == "hello":
        wrong = tmp_path / "wrong.secret"
        wrong.write_text("a-different-secret-0123456789\n")
        wrong.chmod(0o600)
        extra["secret_file"] = str(wrong)
    config = write_worker_config(tmp_path / "worker", sshd, exits, **extra)
    probe_port = closed if broken == "probe" else echo_port
    probe = [] if broken == "hello" else ["--probe", f"127.0.0.1:{probe_port}"]
    marker = tmp_path / "started"
    argv = wrapper_argv(config, *probe, "--ready-timeout", "3", command=["touch", str(marker)])
    started = time.monotonic()
    run = await Run.start(argv, tmp_path / "wrapper.log")
    assert await run.wait(30) == 75, run.text()
    assert time.monotonic() - started < 15
    hop = "exit" if broken == "hello" else "ssh" if broken.startswith("ssh") else broken
    lines = run.text().splitlines()
    errors = [line for line in lines if line.startswith("glidein-wrapper: error:")]
    assert len(errors) == 1, run.text()
    assert f"failing hop: {hop} (" in errors[0]
    if broken == "hello" or broken.startswith("ssh-key"):
        # a refused key is final: no waiting for the ready timeout
        assert "chain not ready (refused; not retried)" in errors[0], errors[0]
        why = "exit refused hello: bad-auth" if broken == "hello" else "ermission denied"
        assert why in errors[0], errors[0]
    else:
        assert "not ready after 3 s" in errors[0], errors[0]
    assert not marker.exists()


async def test_in_process_gate_opens_probes_on_the_workers_session(
    sshd: Sshd,
    relay_exit: RelayExit,
    echo_port: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The gate's probes are streams on the worker's own carrier: no carrier of their own;
    an accepted probe is reset at once, a refused one names the probe hop."""
    joins = carrier_joins(monkeypatch)
    settings = worker_settings(
        sshd, relay_exit.address, carriers=1, key_id=KEY_ID, secret=SECRET.encode()
    )
    worker = RelayWorker(settings)
    await worker.start()
    try:
        took = await wait_ready(InProcessCheck(worker, [HostPort("127.0.0.1", echo_port)]), 10)
        assert took < 10
        closed = await closed_port()
        with pytest.raises(NotReady) as refused:
            await InProcessCheck(worker, [HostPort("127.0.0.1", closed)])()
        assert refused.value.hop == "probe", refused.value
        assert "the exit answered: connection refused" in refused.value.why
        await InProcessCheck(worker, [])()  # no probe: the session is up, nothing is opened
        client = worker.exits[relay_exit.address]
        assert client.driver is not None and not client.driver.pumps
        assert client.driver.session.live_streams() == 0
    finally:
        await worker.stop()
    assert len(joins) == 1, joins
    exit_metrics = relay_exit.metrics
    assert metric(exit_metrics, "relay_streams_total", result="shutdown") == 1
    assert metric(worker.metrics, "relay_streams_total", result="shutdown") == 1


async def test_sigterm_while_waiting_for_the_chain_starts_nothing(
    sshd: Sshd, relay_exit: RelayExit, tmp_path: Path
) -> None:
    closed = await closed_port()
    config = config_for(tmp_path, sshd, relay_exit)
    marker = tmp_path / "started"
    argv = wrapper_argv(
        config, "--probe", f"127.0.0.1:{closed}", "--ready-timeout", "60",
        command=["touch", str(marker)],
    )  # fmt: skip
    run = await Run.start(argv, tmp_path / "wrapper.log")
    deadline = time.monotonic() + 20
    while "chain not ready yet" not in run.text() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    run.proc.send_signal(signal.SIGTERM)
    assert await run.wait(20) == 128 + signal.SIGTERM, run.text()
    assert not marker.exists()


async def test_attach_to_a_running_worker(
    sshd: Sshd, relay_exit: RelayExit, echo_port: int, tmp_path: Path
) -> None:
    """--attach: the relay runs elsewhere (here a relay-worker process); the wrapper only
    checks the chain through it and points COMMAND at it."""
    config = config_for(tmp_path, sshd, relay_exit)
    auth = tmp_path / "socks.auth"
    auth.write_text("glidein:attach-pass\n")
    auth.chmod(0o600)
    from tests.support.wrapper import BIN

    worker_log = (tmp_path / "worker.log").open("wb")
    worker = await asyncio.create_subprocess_exec(
        str(BIN / "relay-worker"), "--config", str(config), "--socks-auth", str(auth),
        "--socks", "127.0.0.1:0", stdout=worker_log, stderr=worker_log,
    )  # fmt: skip
    try:
        socks_port = await _listening_port(tmp_path / "worker.log")
        report = tmp_path / "report.json"
        argv = [
            str(BIN / "glidein-wrapper"), "--attach", f"127.0.0.1:{socks_port}",
            "--attach-auth", str(auth), "--probe", f"127.0.0.1:{echo_port}", "--",
            *standin(report, "--echo", f"127.0.0.1:{echo_port}"),
        ]  # fmt: skip
        run = await Run.start(argv, tmp_path / "wrapper.log")
        assert await run.wait() == 0, run.text()
        result = read_report(report)
        assert result["echo"]["first"] is True, result
        assert result["env"]["ALL_PROXY"] == f"socks5h://glidein:attach-pass@127.0.0.1:{socks_port}"
        # wrong credentials: the relay hop is named
        bad = tmp_path / "bad.auth"
        bad.write_text("glidein:nope\n")
        bad.chmod(0o600)
        argv = [
            str(BIN / "glidein-wrapper"), "--attach", f"127.0.0.1:{socks_port}",
            "--attach-auth", str(bad), "--ready-timeout", "2", "--", "true",
        ]  # fmt: skip
        run = await Run.start(argv, tmp_path / "wrapper-bad.log")
        assert await run.wait() == 75
        assert "failing hop: relay (" in run.text()
        # the worker answers at once (optimistic data); the exit's refusal still fails the gate
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            closed = sock.getsockname()[1]
        argv = [
            str(BIN / "glidein-wrapper"), "--attach", f"127.0.0.1:{socks_port}",
            "--attach-auth", str(auth), "--probe", f"127.0.0.1:{closed}",
            "--ready-timeout", "3", "--", "true",
        ]  # fmt: skip
        run = await Run.start(argv, tmp_path / "wrapper-refused.log")
        assert await run.wait() == 75
        assert "failing hop: probe (" in run.text(), run.text()
    finally:
        worker.terminate()
        await worker.wait()
        worker_log.close()


async def _listening_port(log: Path, timeout: float = 15) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if "listening" in line and "socks=127.0.0.1:" in line:
                return int(line.split("socks=127.0.0.1:")[1].split()[0])
        await asyncio.sleep(0.05)
    raise AssertionError(f"relay-worker did not start:\n{log.read_text()}")
