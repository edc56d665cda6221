"""``relay check`` against the loopback chain: real OpenSSH sshd as the login node, relay-exit
in this process, ``relay check`` as the command an operator runs. Every hop that can break is
broken once, and the check must name the hop and the cause and exit 1."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import types
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import relay.exit.connection
from relay.config.values import HostPort, LoginTarget
from relay.exit.daemon import RelayExit
from relay.exit.sessions import ExitMux
from relay.net.tlslink import TlsClient, client_context, server_context
from relay.tools.check import FAIL, OK, SKIP, WARN, Hop, check_chain
from relay.worker.daemon import RelayWorker
from relay.worker.settings import WorkerSettings
from tests.support.helpers import (
    KEY_ID,
    SECRET,
    Servers,
    echo_handler,
    exit_settings,
    metric,
    worker_settings,
)
from tests.support.relays import write_config
from tests.support.sshd import Sshd
from tests.support.tlscerts import make_pki

BIN = Path(sys.executable).parent


def private(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def keygen(path: Path) -> Path:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "other", "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return path


@dataclass
class Env:
    sshd: Sshd
    exit: RelayExit
    servers: Servers
    echo_port: int
    denied_port: int
    workdir: Path
    exit_port: int

    def config(self, **overrides: Any) -> Path:
        """A worker.toml for this chain, as an operator writes it."""
        values: dict[str, Any] = {
            "no_socks_auth": True,
            "login": [f"{self.sshd.user}@{self.sshd.host}:{self.sshd.port}"],
            "ssh_client": "openssh",
            "ssh_config": "/dev/null",  # not this machine's ~/.ssh/config
            "ssh_key": str(self.sshd.client_key),
            "known_hosts": str(self.sshd.known_hosts),
            "exit": [f"127.0.0.1:{self.exit_port}"],
            "key_id": KEY_ID,
            "secret_file": str(private(self.workdir / "worker.secret", SECRET.decode() + "\n")),
            "heartbeat": 1.0,
            "connect_timeout": 5.0,
        }
        values.update(overrides)
        return write_config(self.workdir / "worker.toml", "worker", values)

    @property
    def probe(self) -> str:
        return f"127.0.0.1:{self.echo_port}"

    async def check(self, *args: str) -> tuple[int, str, str]:
        """Run ``relay check`` as a command while this process serves the exit."""
        proc = await asyncio.create_subprocess_exec(
            str(BIN / "relay"),
            "check",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    async def check_json(self, *args: str) -> tuple[int, dict[str, Any]]:
        code, out, err = await self.check(*args, "--json")
        assert code in (0, 1), err
        return code, json.loads(out)


@pytest.fixture
async def env(sshd: Sshd, tmp_path: Path) -> AsyncIterator[Env]:
    servers = Servers()
    echo_port = await servers.start(echo_handler)
    denied_port = await servers.start(echo_handler)
    relay_exit = RelayExit(exit_settings(f"127.0.0.1/32:{echo_port}"))
    await relay_exit.start()
    try:
        yield Env(
            sshd, relay_exit, servers, echo_port, denied_port, tmp_path, relay_exit.address[1]
        )
    finally:
        await relay_exit.stop()
        await servers.close()


def carrier_joins(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The session id of every carrier the exit accepts from now on."""
    joins: list[bytes] = []
    join = ExitMux.join

    def spy(self: ExitMux, *args: Any) -> int:
        joins.append(self.session_id)
        return join(self, *args)

    monkeypatch.setattr(ExitMux, "join", spy)
    return joins


def hop(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(h for h in doc["hops"] if h["hop"] == name)


async def test_healthy_chain_passes_every_hop(env: Env) -> None:
    config = env.config()
    code, out, err = await env.check("--config", str(config), "--probe", env.probe)
    assert code == 0, out + err
    lines = out.splitlines()
    for name in ("ssh", "tcp", "hello", "connect", "heartbeat"):
        line = next(line for line in lines if line.split()[1:2] == [name])
        assert line.startswith("ok "), line
        assert " ms " in line or line.rstrip().endswith("ms"), line
    ssh_line = next(line for line in lines if line.split()[1] == "ssh")
    assert "OpenSSH client" in ssh_line and "SHA256:" in ssh_line
    hello_line = next(line for line in lines if line.split()[1] == "hello")
    assert "clock skew" in hello_line and "heartbeat 1 s" in hello_line
    assert lines[-1].startswith("ok: 5 hops")


async def test_json_output_parses_and_carries_the_facts(env: Env) -> None:
    code, doc = await env.check_json("--config", str(env.config()), "--probe", env.probe)
    assert code == 0 and doc["ok"] is True and doc["failed"] == []
    assert [h["hop"] for h in doc["hops"]] == ["ssh", "tcp", "hello", "connect", "heartbeat"]
    assert all(h["status"] == OK and h["ms"] is not None for h in doc["hops"])
    ssh = hop(doc, "ssh")
    assert ssh["facts"]["client"] == "openssh"
    assert ssh["facts"]["client_key"].startswith("ssh-ed25519 SHA256:")
    host_key = env.sshd.host_key_pub.split()[0]
    assert ssh["facts"]["host_key"].startswith(host_key + " SHA256:")
    hello = hop(doc, "hello")["facts"]
    assert hello["key_id"] == KEY_ID and hello["heartbeat_s"] == 1.0
    assert abs(hello["clock_skew_s"]) < 2
    assert hop(doc, "heartbeat")["facts"]["rtt_s"] > 0


async def exit_idle(env: Env) -> None:
    """Wait until the exit has no stream and no session left (or 5 s)."""
    deadline = time.monotonic() + 5
    while (env.exit.pumps or env.exit.sessions) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def test_probe_streams_end_cleanly_at_the_exit(env: Env) -> None:
    """Probes close with FIN both ways: the exit counts them ok; the session ends with the
    carrier instead of being parked for a resume."""
    code, _, err = await env.check("--config", str(env.config()), "--probe", env.probe)
    assert code == 0, err
    metrics = env.exit.metrics
    await exit_idle(env)
    assert not env.exit.pumps and not env.exit.sessions
    assert metric(metrics, "relay_streams_total", result="ok") == 1
    assert metric(metrics, "relay_parked_sessions") == 0
    assert metric(metrics, "relay_carriers_active") == 0
    assert (
        metrics.registry.get_sample_value("relay_policy_denials_total", {"reason": "no_rule"})
        is None
    )


async def test_every_probe_is_an_open_on_one_carrier(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Protocol v2: one HELLO, one carrier; each probe is a stream on it."""
    joins = carrier_joins(monkeypatch)
    code, doc = await env.check_json(
        "--config", str(env.config()), "--probe", env.probe, "--probe", env.probe
    )
    assert code == 0, doc
    assert [h["hop"] for h in doc["hops"]] == [
        "ssh", "tcp", "hello", "connect", "connect", "heartbeat",
    ]  # fmt: skip
    metrics = env.exit.metrics
    await exit_idle(env)
    assert len(joins) == 1
    assert metric(metrics, "relay_streams_total", result="ok") == 2
    assert not env.exit.sessions


async def test_without_probe_the_session_is_checked_against_the_policy(env: Env) -> None:
    """No probe: an OPEN of 0.0.0.0:9, which the policy refuses; the heartbeat needs no
    stream (a PING on the carrier)."""
    code, doc = await env.check_json("--config", str(env.config()))
    assert code == 0, doc
    assert [h["status"] for h in doc["hops"]] == [OK, OK, OK, SKIP, OK]
    assert "0.0.0.0:9" in hop(doc, "connect")["detail"]
    assert "not allowed by ruleset" in hop(doc, "connect")["detail"]
    assert hop(doc, "heartbeat")["facts"]["rtt_s"] > 0
    denials = env.exit.metrics.registry.get_sample_value(
        "relay_policy_denials_total", {"reason": "unspecified"}
    )
    assert denials == 1
    await exit_idle(env)
    assert not env.exit.sessions  # the refused stream was forgotten at both ends


async def test_flags_alone_work_like_relay_worker(env: Env) -> None:
    """No file: the worker's flags; `relay-worker check` is the same command."""
    secret = private(env.workdir / "flag.secret", SECRET.decode())
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "relay-worker"), "check",
        "--login", f"{env.sshd.user}@{env.sshd.host}:{env.sshd.port}",
        "--ssh-key", str(env.sshd.client_key), "--known-hosts", str(env.sshd.known_hosts),
        "--exit", f"127.0.0.1:{env.exit_port}", "--key-id", KEY_ID,
        "--secret-file", str(secret), "--probe", env.probe,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out.decode() + err.decode()


@pytest.mark.parametrize(
    "args",
    [
        ["--probe", "not-an-address"],
        ["--probe"],
        ["--heartbaet", "5"],
        [],  # no exit, no key id
    ],
)
async def test_usage_errors_exit_2(env: Env, args: list[str]) -> None:
    code, out, err = await env.check(*args)
    assert code == 2, out + err
    assert err.startswith("relay check: error:") and len(err.strip().splitlines()) == 1


async def test_help_lists_check_and_worker_options(env: Env) -> None:
    code, out, _ = await env.check("--help")
    assert code == 0
    assert "--probe" in out and "--json" in out and "--ssh-key" in out


# -- every broken hop: name it, say why, exit 1 -----------------------------------------------


async def test_sshd_down(env: Env) -> None:
    env.sshd.stop()
    code, out, _ = await env.check("--config", str(env.config()), "--probe", env.probe)
    assert code == 1
    line = next(line for line in out.splitlines() if line.startswith("FAIL"))
    assert line.split()[1] == "ssh" and "connection refused" in line
    assert "fix:" in out
    code, doc = await env.check_json("--config", str(env.config()), "--probe", env.probe)
    assert code == 1 and doc["ok"] is False
    assert hop(doc, "ssh")["status"] == FAIL and hop(doc, "tcp")["status"] == SKIP


async def test_wrong_ssh_key(env: Env) -> None:
    other = keygen(env.workdir / "other_key")
    code, doc = await env.check_json(
        "--config", str(env.config(ssh_key=str(other))), "--probe", env.probe
    )
    assert code == 1
    ssh = hop(doc, "ssh")
    assert ssh["status"] == FAIL and ssh["cause"].startswith("wrong key")
    assert "authorized_keys" in ssh["fix"]


async def test_host_key_mismatch(env: Env) -> None:
    impostor = keygen(env.workdir / "impostor")
    known = env.workdir / "known_hosts"
    pub = (env.workdir / "impostor.pub").read_text().split()
    known.write_text(f"[{env.sshd.host}]:{env.sshd.port} {pub[0]} {pub[1]}\n")
    assert impostor.exists()
    code, out, _ = await env.check(
        "--config", str(env.config(known_hosts=str(known))), "--probe", env.probe
    )
    assert code == 1
    line = next(line for line in out.splitlines() if line.startswith("FAIL"))
    assert line.split()[1] == "ssh" and "host key mismatch" in line
    code, doc = await env.check_json("--config", str(env.config(known_hosts=str(known))))
    facts = hop(doc, "ssh")["facts"]
    assert facts["presented_host_key"] != facts["expected_host_keys"][0]


async def test_login_node_missing_from_known_hosts(env: Env) -> None:
    known = private(env.workdir / "empty_known_hosts", "")
    code, doc = await env.check_json("--config", str(env.config(known_hosts=str(known))))
    assert code == 1
    ssh = hop(doc, "ssh")
    assert ssh["cause"].startswith("unknown host") and "ssh-keyscan" in ssh["fix"]


async def test_exit_down(env: Env) -> None:
    await env.exit.stop()
    code, out, _ = await env.check("--config", str(env.config()), "--probe", env.probe)
    assert code == 1
    line = next(line for line in out.splitlines() if line.startswith("FAIL"))
    assert line.split()[1] == "tcp" and "exit unreachable from the login node" in line
    assert out.splitlines()[0].startswith("ok    ssh")


async def test_wrong_secret(env: Env) -> None:
    wrong = private(env.workdir / "wrong.secret", "another-secret-0123456789abcdef\n")
    code, out, _ = await env.check(
        "--config", str(env.config(secret_file=str(wrong))), "--probe", env.probe
    )
    assert code == 1
    line = next(line for line in out.splitlines() if line.startswith("FAIL"))
    assert line.split()[1] == "hello" and "secret mismatch" in line
    assert env.exit.metrics.registry.get_sample_value(
        "relay_auth_failures_total", {"reason": "bad-mac"}
    )


async def test_denied_probe(env: Env) -> None:
    denied = f"127.0.0.1:{env.denied_port}"
    code, doc = await env.check_json(
        "--config", str(env.config()), "--probe", env.probe, "--probe", denied
    )
    assert code == 1
    assert doc["failed"] == [f"connect {denied}"]
    bad = next(h for h in doc["hops"] if h["hop"] == "connect" and h["target"] == denied)
    assert bad["cause"].startswith("destination denied by policy") and "--allow" in bad["fix"]
    # the allowed probe and the heartbeat on it still pass
    assert hop(doc, "connect")["status"] == OK and hop(doc, "heartbeat")["status"] == OK


async def test_login_node_forbids_forwarding_to_the_exit(env: Env) -> None:
    """The deploy README's authorized_keys line: forwarding only to the exit, from this node."""
    pub = Path(str(env.sshd.client_key) + ".pub").read_text().strip()
    authorized = env.sshd.workdir / "authorized_keys"
    line = 'from="127.0.0.1",restrict,port-forwarding,permitopen="127.0.0.1:{}" ' + pub + "\n"
    authorized.write_text(line.format(env.exit_port))
    code, doc = await env.check_json("--config", str(env.config()), "--probe", env.probe)
    assert code == 0, doc
    authorized.write_text(line.format(env.exit_port + 1))
    code, doc = await env.check_json("--config", str(env.config()), "--probe", env.probe)
    assert code == 1
    tcp = hop(doc, "tcp")
    assert tcp["status"] == FAIL and "forbids forwarding" in tcp["cause"]
    assert "permitopen" in tcp["fix"]


# -- clocks, in process (the exit's clock is moved, not this machine's) ----------------------


def exit_clock(monkeypatch: pytest.MonkeyPatch, offset: float) -> None:
    fake = types.SimpleNamespace(time=lambda: time.time() + offset, monotonic=time.monotonic)
    monkeypatch.setattr(relay.exit.connection, "time", fake)


async def test_clock_skew_near_the_limit_warns(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    exit_clock(monkeypatch, 75)
    settings = worker_settings(env.sshd, ("127.0.0.1", env.exit_port), ssh_client="asyncssh")
    hops = await check_chain(settings, [("127.0.0.1", env.echo_port)])
    hello = next(h for h in hops if h.name == "hello")
    assert hello.status == WARN, hello
    assert 70 < hello.facts["clock_skew_s"] < 80
    assert all(h.status == OK for h in hops if h.name != "hello")  # the whole asyncssh chain
    assert hops[0].facts["auth"] == "publickey" and "matches" in hops[0].detail


async def test_clock_skew_beyond_the_limit_fails(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    exit_clock(monkeypatch, -300)
    hops = await check_chain(
        worker_settings(env.sshd, ("127.0.0.1", env.exit_port)), [("127.0.0.1", env.echo_port)]
    )
    hello = next(h for h in hops if h.name == "hello")
    assert hello.status == FAIL and hello.cause.startswith("clock skew"), hello
    assert "NTP" in hello.fix


async def test_every_login_node_is_checked(env: Env) -> None:
    """A dead first login node fails its hop; the second one still carries the rest."""
    dead = LoginTarget(env.sshd.user, "127.0.0.1", 1)
    settings = worker_settings(env.sshd, ("127.0.0.1", env.exit_port))
    settings.login = (dead, *settings.login)
    hops = await check_chain(settings, [("127.0.0.1", env.echo_port)])
    assert [(h.name, h.status) for h in hops] == [
        ("ssh", FAIL), ("tcp", SKIP),
        ("ssh", OK), ("tcp", OK), ("hello", OK), ("connect", OK), ("heartbeat", OK),
    ]  # fmt: skip


async def test_exit_at_its_carrier_limit_refuses_the_hello() -> None:
    """A worker already holds the one carrier the exit allows the key: the check's HELLO is
    refused as busy, and the check names the limit."""
    relay_exit = RelayExit(exit_settings(max_carriers_per_key=1))
    await relay_exit.start()
    worker = RelayWorker(worker_settings(None, relay_exit.address, carriers=1))
    await worker.start()
    try:
        await asyncio.wait_for(worker.exits[relay_exit.address].ready.wait(), 10)
        hops = await check_chain(worker_settings(None, relay_exit.address))
    finally:
        await worker.stop()
        await relay_exit.stop()
    assert [(h.name, h.status) for h in hops] == [
        ("tcp", OK), ("hello", FAIL), ("connect", SKIP), ("heartbeat", SKIP),
    ]  # fmt: skip
    hello = hops[1]
    assert "busy" in hello.cause and "max_carriers_per_key" in hello.fix


# -- --ssh-client: ssh(1) (the CLI tests above) and asyncssh name the same causes -----------------


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def in_process(
    env: Env, client: str, exit_address: tuple[str, int], **overrides: Any
) -> WorkerSettings:
    return worker_settings(
        env.sshd, exit_address, ssh_client=client, ssh_config=Path("/dev/null"), **overrides
    )


@pytest.mark.parametrize(
    ("fault", "failed", "cause"),
    [
        ("wrong-key", "ssh", "wrong key"),
        ("unknown-host", "ssh", "unknown host"),
        ("host-key-mismatch", "ssh", "host key mismatch"),
        ("sshd-down", "ssh", "connection refused"),
        ("exit-unreachable", "tcp", "exit unreachable from the login node"),
        ("forbidden", "tcp", "forbids forwarding"),
    ],
)
async def test_both_ssh_clients_name_the_same_cause_and_fix(
    env: Env, fault: str, failed: str, cause: str
) -> None:
    """The same break gives the same hop, cause and fix whichever client logs in (the
    channel's refusal reason is worded by each client)."""
    exit_address = ("127.0.0.1", env.exit_port)
    overrides: dict[str, Any] = {}
    if fault == "wrong-key":
        overrides["ssh_key"] = keygen(env.workdir / "other_key")
    elif fault == "unknown-host":
        overrides["known_hosts"] = private(env.workdir / "empty_known_hosts", "")
    elif fault == "host-key-mismatch":
        pub = (keygen(env.workdir / "impostor").parent / "impostor.pub").read_text().split()
        overrides["known_hosts"] = private(
            env.workdir / "known_hosts", f"[{env.sshd.host}]:{env.sshd.port} {pub[0]} {pub[1]}\n"
        )
    elif fault == "sshd-down":
        env.sshd.stop()
    elif fault == "exit-unreachable":
        exit_address = ("127.0.0.1", closed_port())
    else:
        pub = Path(str(env.sshd.client_key) + ".pub").read_text().strip()
        (env.sshd.workdir / "authorized_keys").write_text(
            f'restrict,port-forwarding,permitopen="127.0.0.1:{env.exit_port + 1}" {pub}\n'
        )
    found: dict[str, Hop] = {}
    for client in ("openssh", "asyncssh"):
        settings = in_process(env, client, exit_address, **overrides)
        hops = await check_chain(settings, [("127.0.0.1", env.echo_port)])
        failures = [h for h in hops if h.status == FAIL]
        assert [h.name for h in failures] == [failed], (client, hops)
        assert cause in failures[0].cause, (client, hops)
        if failed == "ssh":
            assert failures[0].facts["client"] == client
            assert [h.status for h in hops[1:]] == [SKIP]
        else:
            assert hops[0].status == OK and hops[0].facts["client"] == client
        found[client] = failures[0]
    assert found["openssh"].fix == found["asyncssh"].fix
    if failed == "ssh":
        assert found["openssh"].cause == found["asyncssh"].cause


async def test_exit_unreachable_names_sshs_reason(env: Env) -> None:
    port = closed_port()
    hops = await check_chain(in_process(env, "openssh", ("127.0.0.1", port)))
    tcp = next(h for h in hops if h.name == "tcp")
    assert tcp.status == FAIL
    assert tcp.cause == (
        f"exit unreachable from the login node: {env.sshd.host} could not connect to"
        f" 127.0.0.1:{port} (connect failed: Connection refused)"
    )
    assert [h.status for h in hops if h.name in ("hello", "heartbeat")] == [SKIP, SKIP]


async def test_no_ssh_program(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    settings = worker_settings(None, ("127.0.0.1", 1), ssh_client="openssh")
    settings.login = (LoginTarget(None, "127.0.0.1", 1),)
    hops = await check_chain(settings)
    assert [(h.name, h.status) for h in hops] == [("ssh", FAIL), ("tcp", SKIP)]
    assert hops[0].cause.startswith("no ssh on PATH")
    assert hops[0].fix == "install openssh-client or use --ssh-client asyncssh"


@pytest.mark.parametrize("reachable", [True, False])
async def test_upstream_through_the_ssh_forward(env: Env, reachable: bool) -> None:
    """--upstream: ssh's loopback forward accepts before the login node connects; the check
    sees whether anything answers at the far end (the echo server answers anything)."""
    upstream = HostPort("127.0.0.1", env.echo_port if reachable else closed_port())
    hops = await check_chain(in_process(env, "openssh", upstream, upstream=upstream))
    assert [(h.name, h.status) for h in hops] == [("ssh", OK), ("tcp", OK if reachable else FAIL)]
    if not reachable:
        assert "Connection refused" in hops[1].cause


async def test_tls_exit_through_the_ssh_forward(env: Env) -> None:
    """TLS inside the channel: verified through ssh's forward, and a refused channel is an
    unreachable exit, not a TLS failure."""
    pki = make_pki(env.workdir / "pki")
    tls_exit = RelayExit(exit_settings(tls=server_context(pki.server.cert, pki.server.key)))
    await tls_exit.start()
    tls = TlsClient(client_context(pki.ca.cert), None)
    try:
        hops = await check_chain(in_process(env, "openssh", tls_exit.address, exit_tls=tls))
        assert [h.status for h in hops] == [OK, OK, OK, SKIP, OK], hops
        assert "TLS certificate verified" in hops[1].detail
        hops = await check_chain(
            in_process(env, "openssh", ("127.0.0.1", closed_port()), exit_tls=tls)
        )
        tcp = next(h for h in hops if h.name == "tcp")
        assert tcp.status == FAIL and "exit unreachable from the login node" in tcp.cause
    finally:
        await tls_exit.stop()
