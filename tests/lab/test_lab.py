"""Proof that the test lab works: real sshd, real namespaces, and a firewall that kills idle TCP.

If these fail, every relay test built on the lab would be testing the wrong thing, so they check
the lab's own promises, including the negative ones (what must NOT get through).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

import tests.support.netns as netns_mod
from tests.support import fixtures as lab_fixtures
from tests.support.netns import PREFIX, Lab, LabError, cleanup_stale_namespaces
from tests.support.sshd import Sshd

# The lab fixtures, bound here so this file works with or without a conftest that star-imports
# them (same objects either way; pytest_plugins would warn once a conftest imports the module).
sshd = lab_fixtures.sshd
lab = lab_fixtures.lab
lab_login_sshd = lab_fixtures.lab_login_sshd
root_netns = lab_fixtures.root_netns


def test_sshd_login_with_strict_host_key_checking(sshd: Sshd) -> None:
    res = subprocess.run(
        [
            "ssh",
            "-F",
            "/dev/null",
            "-i",
            str(sshd.client_key),
            "-o",
            f"UserKnownHostsFile={sshd.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-p",
            str(sshd.port),
            f"{sshd.user}@127.0.0.1",
            "true",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 0, f"{res.stderr}\nsshd log:\n{sshd.log_tail()}"
    assert sshd.user == "root"
    assert (sshd.client_key.stat().st_mode & 0o777) == 0o600
    assert sshd.host_key_pub.startswith("ssh-ed25519 ")


def test_sshd_stop_frees_port_and_restart_comes_back(sshd: Sshd) -> None:
    old_pid = sshd.pid
    sshd.restart()
    assert sshd.pid != old_pid
    res = subprocess.run(sshd.ssh_argv("echo", "back"), capture_output=True, text=True, timeout=30)
    assert res.stdout.strip() == "back", res.stderr
    pid = sshd.pid
    sshd.stop()
    sshd.stop()  # idempotent
    assert not sshd.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((sshd.host, sshd.port))  # free again


def test_topology(lab: Lab) -> None:
    lab.start_echo_server(lab.login, lab.login_ip, 8000)
    lab.start_echo_server(lab.outside, "0.0.0.0", 80)
    lab.start_echo_server(lab.outside, "0.0.0.0", 22)

    assert lab.tcp_connect(lab.worker, lab.login_ip, 8000)["connected"]
    # The compute node has no route out at all.
    res = lab.tcp_connect(lab.worker, lab.outside_ip, 80, timeout=1)
    assert not res["connected"]
    assert res["elapsed"] < 1.5
    # The login node gets out on 80 only; other ports are silently dropped by the firewall.
    assert lab.tcp_connect(lab.login, lab.outside_ip, 80)["connected"]
    res = lab.tcp_connect(lab.login, lab.outside_ip, 22, timeout=1)
    assert res == {"connected": False, "error": "timeout", "elapsed": res["elapsed"]}
    # Nothing may be opened from the outside towards the site.
    lab.start_echo_server(lab.login, lab.login_out_ip, 80)
    assert not lab.tcp_connect(lab.outside, lab.login_out_ip, 80, timeout=1)["connected"]
    # Only dropped *new* connections so far: none of them counts as invalid.
    assert lab.invalid_drops() == 0


def test_firewall_kills_idle_connections_but_not_heartbeated_ones(lab: Lab) -> None:
    lab.start_echo_server(lab.outside, "0.0.0.0", 80)
    drops_before = lab.invalid_drops()
    idle = str(3 * lab.idle_timeout)
    silent = lab.spawn_client(lab.login, lab.outside_ip, 80, "--idle", idle, "--timeout", "3")
    chatty = lab.spawn_client(
        lab.login, lab.outside_ip, 80, "--idle", idle, "--heartbeat", "1", "--timeout", "3"
    )
    a = lab.client_result(silent)
    b = lab.client_result(chatty)

    assert a["first"] is True, a
    assert a["after_idle"] is False, a
    assert a["error"] == "timeout", a  # silent black hole: no RST, no FIN

    assert b["first"] is True, b
    assert b["heartbeats_sent"] >= 3 * lab.idle_timeout - 2, b
    assert b["heartbeats_ok"] == b["heartbeats_sent"], b
    assert b["after_idle"] is True, b

    assert lab.invalid_drops() > drops_before


def _first_exchange(proc: subprocess.Popen[str]) -> None:
    """Wait for a --wait-stdin client's first echo."""
    assert proc.stdout is not None
    event = json.loads(proc.stdout.readline())
    assert event == {"event": "first", "first": True}


def _resume(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()


def test_forget_connections_black_holes_a_live_connection(lab: Lab) -> None:
    lab.start_echo_server(lab.outside, "0.0.0.0", 80)
    assert lab.forget_connections() == 0  # nothing tracked yet: no error
    client = lab.spawn_client(lab.login, lab.outside_ip, 80, "--wait-stdin", "--timeout", "2")
    _first_exchange(client)
    drops_before = lab.invalid_drops()
    assert lab.forget_connections(80) >= 1
    _resume(client)
    res = lab.client_result(client)
    assert res["after_idle"] is False, res
    assert res["error"] == "timeout", res
    assert lab.invalid_drops() > drops_before


def test_kill_sockets_resets_a_connection(lab: Lab) -> None:
    lab.start_echo_server(lab.outside, "0.0.0.0", 80)
    client = lab.spawn_client(lab.login, lab.outside_ip, 80, "--wait-stdin", "--timeout", "2")
    _first_exchange(client)
    assert lab.kill_sockets(lab.login, f"dst {lab.outside_ip} dport = :80") >= 1
    _resume(client)
    res = lab.client_result(client)
    assert res["after_idle"] is False, res
    assert res["error"] not in (None, "timeout"), res  # a reset is loud, unlike the black hole


def test_sshd_on_login_node_reachable_from_worker(lab: Lab, lab_login_sshd: Sshd) -> None:
    assert lab_login_sshd.host == "192.0.2.1"
    assert lab_login_sshd.port == 22
    res = lab.run(lab.worker, lab_login_sshd.ssh_argv("true"), check=False)
    assert res.returncode == 0, f"{res.stderr}\nsshd log:\n{lab_login_sshd.log_tail()}"
    # The path the relay takes: worker -> ssh -> login -> direct-tcpip -> firewall -> outside.
    lab.start_echo_server(lab.outside, "0.0.0.0", 80)
    res = lab.run(
        lab.worker,
        lab_login_sshd.ssh_argv(options=["-W", f"{lab.outside_ip}:80"]),
        input="through the tunnel\n",
        check=False,
    )
    assert res.stdout == "through the tunnel\n", res.stderr


def test_stale_namespaces_are_cleaned_up(root_netns: None) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{PREFIX}{dead.pid}-abcdef-worker"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        assert stale in cleanup_stale_namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True, check=False)
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert stale not in out


def test_failed_setup_tears_down_and_names_the_command(
    root_netns: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def ours() -> set[str]:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return {line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)}

    before = ours()
    monkeypatch.setattr(netns_mod, "_ruleset", lambda timeout: "table inet hrlab { bogus }\n")
    with pytest.raises(LabError) as info:
        Lab.create(tmp_path / "lab")
    assert "nft -f" in str(info.value)
    assert "syntax error" in str(info.value)
    assert ours() == before
