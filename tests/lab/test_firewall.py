"""The FZJ symptom in a real stateful firewall: nftables in a network namespace forgets idle
connections after a few seconds and then silently drops their packets."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.netns import Lab
from tests.support.relays import scrape, socks_url, start_exit, start_worker
from tests.support.sshd import Sshd

ECHO_PORT = 443  # the firewall lets new connections through to 80 and 443 only


def test_idle_relay_stream_survives_where_plain_tcp_dies(
    lab: Lab, lab_login_sshd: Sshd, tmp_path: Path
) -> None:
    lab.start_echo_server(lab.outside, lab.outside_ip, ECHO_PORT)
    start_exit(lab, tmp_path / "exit")
    start_worker(lab, tmp_path / "worker", lab_login_sshd, metrics="127.0.0.1:9101")
    idle = str(3 * lab.idle_timeout)
    drops_before = lab.invalid_drops()
    plain = lab.spawn_client(lab.login, lab.outside_ip, ECHO_PORT, "--idle", idle)
    relayed = lab.spawn_client(
        lab.worker, lab.outside_ip, ECHO_PORT, "--idle", idle, "--socks", socks_url(),
        "--connect-timeout", "15",
    )  # fmt: skip
    plain_result = lab.client_result(plain)
    relay_result = lab.client_result(relayed)
    # The firewall really forgets idle connections: the plain one got no answer.
    assert plain_result["first"] is True
    assert plain_result["after_idle"] is False and plain_result["error"] == "timeout"
    assert lab.invalid_drops() > drops_before
    # The relayed one crossed the same firewall (login -> exit on port 80) and still works.
    assert relay_result["first"] is True, relay_result
    assert relay_result["after_idle"] is True, relay_result
    # heartbeat 1 s: the worker pinged through the firewall all along the 12 s idle period
    # (about 12 PINGs; a loaded machine may merge a few, but never so many that a gap
    # reached the firewall's 4 s timeout, or the stream would be dead)
    worker_metrics = scrape(lab, lab.worker, "http://127.0.0.1:9101/metrics")
    assert worker_metrics["relay_heartbeat_rtt_seconds_count"] >= 6


def test_destination_that_vanishes_silently_resets_the_client(
    lab: Lab, lab_login_sshd: Sshd, tmp_path: Path
) -> None:
    """The exit's TCP keepalive notices a destination that stops answering (no FIN, no RST)
    and the client's connection is reset, not left hanging."""
    port = 7001
    lab.start_echo_server(lab.outside, lab.outside_ip, port)
    start_exit(lab, tmp_path / "exit", tcp_keepalive=2)
    start_worker(lab, tmp_path / "worker", lab_login_sshd)
    client = lab.spawn_client(
        lab.worker, lab.outside_ip, port, "--socks", socks_url(), "--connect-timeout", "15",
        "--wait-stdin", "--until-closed", "--timeout", "40",
    )  # fmt: skip
    assert client.stdout is not None and client.stdin is not None
    first = json.loads(client.stdout.readline())
    assert first == {"event": "first", "first": True}
    # The destination vanishes: everything to and from its port is dropped from now on.
    drops = f"tcp sport {port} drop; tcp dport {port} drop;"
    ruleset = (
        f"table inet vanish {{\n chain out {{ type filter hook output priority 0; {drops} }}\n}}\n"
    )
    lab.run(lab.outside, ["nft", "-f", "-"], input=ruleset)
    client.stdin.write("go\n")
    client.stdin.flush()
    result = lab.client_result(client, timeout=60)
    assert result["closed"] == "reset", result
    # keepalive idle 2 s + 4 probes 1 s apart (TCP_USER_TIMEOUT the same) plus the trip back
    assert result["closed_after"] < 20, result
    exit_metrics = scrape(lab, lab.outside, f"http://{lab.outside_ip}:9100/metrics")
    assert exit_metrics['relay_streams_total{result="peer-reset"}'] >= 1


def test_daemons_log_one_line_per_stream(lab: Lab, lab_login_sshd: Sshd, tmp_path: Path) -> None:
    lab.start_echo_server(lab.outside, lab.outside_ip, ECHO_PORT)
    ex = start_exit(lab, tmp_path / "exit", log_format="json")
    start_worker(lab, tmp_path / "worker", lab_login_sshd)
    result = lab.client_result(
        lab.spawn_client(
            lab.worker, lab.outside_ip, ECHO_PORT, "--socks", socks_url(), "--connect-timeout", "15"
        )
    )
    assert result["after_idle"] is True
    ex.proc.terminate()
    ex.proc.wait(timeout=15)
    lines = [json.loads(line) for line in ex.log_text().splitlines() if line.startswith("{")]
    closed = [line for line in lines if line["msg"] == "stream closed"]
    assert len(closed) == 1, lines
    entry = closed[0]
    assert entry["dest"] == f"{lab.outside_ip}:{ECHO_PORT}"
    assert entry["up"] == len(b"first\nafter idle\n") == entry["down"]
    assert entry["key"] == "worker-1" and entry["result"] == "ok"
    assert ex.proc.returncode == 0
