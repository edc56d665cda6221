"""Resume through the real chain: OpenSSH sshd in the login namespace, the nftables firewall,
carriers killed with `ss -K` (a reset) and `conntrack -D` (a black hole)."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

from tests.support.bulk import payload
from tests.support.netns import Lab
from tests.support.relays import scrape, socks_url, start_exit, start_worker
from tests.support.sshd import Sshd

BULK = str(Path(__file__).resolve().parents[1] / "support" / "bulk.py")
SIZE = 200 * 1024 * 1024
PORT = 7100
CARRIERS = "dst 203.0.113.2 dport = :80"


def _resumed(lab: Lab) -> float:
    """Streams the worker moved to another carrier: the next cut waits until the last one
    was repaired (at least one move per cut)."""
    samples = scrape(lab, lab.worker, "http://127.0.0.1:9101/metrics")
    return samples.get('relay_resumes_total{result="ok"}', 0.0)


def test_200mib_each_way_survives_resets_and_black_holes(
    lab: Lab, lab_login_sshd: Sshd, tmp_path: Path
) -> None:
    server = lab.spawn(
        lab.outside,
        [sys.executable, BULK, "server", lab.outside_ip, str(PORT), "--size", str(SIZE),
         "--seed", "2"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    lab.wait_listening(lab.outside, PORT, proc=server)
    start_exit(lab, tmp_path / "exit")
    start_worker(lab, tmp_path / "worker", lab_login_sshd, metrics="127.0.0.1:9101",
                 reconnect_max=1.0)  # fmt: skip
    client = lab.spawn(
        lab.worker,
        [sys.executable, BULK, "client", lab.outside_ip, str(PORT), "--size", str(SIZE),
         "--seed", "1", "--socks", socks_url(), "--progress", str(4 * 1024 * 1024),
         "--rcvbuf", str(1 << 17)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert client.stdout is not None and server.stdout is not None
    kinds = ["reset", "reset", "reset", "blackhole", "blackhole"]
    random.shuffle(kinds)
    marks = sorted(random.sample(range(SIZE // 10, SIZE * 6 // 10), len(kinds)))
    performed = []
    result = None
    for line in client.stdout:
        event = json.loads(line)
        if event.get("event") != "progress":
            result = event
            break
        if marks and event["received"] >= marks[0] and _resumed(lab) >= len(performed):
            marks.pop(0)
            kind = kinds[len(performed)]
            if kind == "reset":
                killed = lab.kill_sockets(lab.login, CARRIERS)
            else:
                killed = lab.forget_connections(80)
            if killed:
                performed.append(kind)
    client.wait(timeout=60)
    assert result is not None
    assert result["error"] is None, result
    assert result["received"] == SIZE
    assert result["sha256"] == hashlib.sha256(payload(SIZE, 2)).hexdigest()
    server_line = json.loads(server.stdout.readline())
    while server_line.get("event") == "listening":
        server_line = json.loads(server.stdout.readline())
    assert server_line["received"] == SIZE
    assert server_line["sha256"] == hashlib.sha256(payload(SIZE, 1)).hexdigest()
    assert performed.count("reset") >= 3 and performed.count("blackhole") >= 2, performed
    worker = scrape(lab, lab.worker, "http://127.0.0.1:9101/metrics")
    exit_ = scrape(lab, lab.outside, f"http://{lab.outside_ip}:9100/metrics")
    assert worker['relay_resumes_total{result="ok"}'] >= 5
    assert exit_['relay_resumes_total{result="ok"}'] >= 1
    assert worker['relay_streams_total{result="ok"}'] == 1


def test_idle_stream_survives_a_black_hole_while_idle(
    lab: Lab, lab_login_sshd: Sshd, tmp_path: Path
) -> None:
    """The starter -> shadow pattern: idle for long, carrier lost meanwhile, then a message."""
    lab.start_echo_server(lab.outside, lab.outside_ip, 443)
    start_exit(lab, tmp_path / "exit")
    start_worker(lab, tmp_path / "worker", lab_login_sshd, reconnect_max=1.0)
    client = lab.spawn_client(
        lab.worker, lab.outside_ip, 443, "--socks", socks_url(), "--connect-timeout", "15",
        "--wait-stdin", "--timeout", "20",
    )  # fmt: skip
    assert client.stdout is not None and client.stdin is not None
    assert json.loads(client.stdout.readline()) == {"event": "first", "first": True}
    assert lab.forget_connections(80) >= 1
    lab.kill_sockets(lab.login, CARRIERS)  # and the replacement, if one was made already
    import time

    time.sleep(3 * lab.idle_timeout)
    client.stdin.write("go\n")
    client.stdin.flush()
    result = lab.client_result(client)
    assert result["after_idle"] is True, result
