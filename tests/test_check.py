"""``relay check`` against the loopback chain: real OpenSSH sshd as the login node, relay-exit
in this process, ``relay check`` as the command an operator runs. Every hop that can break is
broken once, and the check must name the hop and the cause and exit 1."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import types
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import relay.exit
from relay.check import FAIL, OK, SKIP, WARN, check_chain
from relay.exit import ExitMux, RelayExit
from relay.sshhop import Login
from relay.worker import RelayWorker
from tests.helpers import (
    KEY_ID,
    SECRET,
    Servers,
    echo_handler,
    exit_settings,
    metric,
    worker_settings,
)
from tests.lab.relays import write_config
from tests.lab.sshd import Sshd

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
    assert "publickey" in ssh_line and "SHA256:" in ssh_line
    hello_line = next(line for line in lines if line.split()[1] == "hello")
    assert "clock skew" in hello_line and "heartbeat 1 s" in hello_line
    assert lines[-1].startswith("ok: 5 hops")


async def test_json_output_parses_and_carries_the_facts(env: Env) -> None:
    code, doc = await env.check_json("--config", str(env.config()), "--probe", env.probe)
    assert code == 0 and doc["ok"] is True and doc["failed"] == []
    assert [h["hop"] for h in doc["hops"]] == ["ssh", "tcp", "hello", "connect", "heartbeat"]
    assert all(h["status"] == OK and h["ms"] is not None for h in doc["hops"])
    ssh = hop(doc, "ssh")
    assert ssh["facts"]["auth"] == "publickey"
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
    monkeypatch.setattr(relay.exit, "time", fake)


async def test_clock_skew_near_the_limit_warns(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    exit_clock(monkeypatch, 75)
    hops = await check_chain(
        worker_settings(env.sshd, ("127.0.0.1", env.exit_port)), [("127.0.0.1", env.echo_port)]
    )
    hello = next(h for h in hops if h.name == "hello")
    assert hello.status == WARN, hello
    assert 70 < hello.facts["clock_skew_s"] < 80
    assert all(h.status == OK for h in hops if h.name != "hello")


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
    dead = Login(env.sshd.user, "127.0.0.1", 1)
    settings = worker_settings(env.sshd, ("127.0.0.1", env.exit_port))
    settings.logins.insert(0, dead)
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
