"""Protocol v2 in the namespace lab (real sshd on the login node, the nftables firewall):
hundreds of streams of one worker ride its few carriers, so the login node and the
firewall see a handful of connections, and every stream still works after idling longer
than the firewall forgets connections."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from tests.support.netns import Lab, nsclient_argv
from tests.support.relays import scrape, socks_url, start_exit, start_worker
from tests.support.sshd import Sshd

STREAMS = 300
CARRIERS = 2


def test_hundreds_of_streams_ride_two_carriers_through_the_firewall(
    lab: Lab, lab_login_sshd: Sshd, tmp_path: Path
) -> None:
    lab.start_echo_server(lab.outside, lab.outside_ip, 443)
    start_exit(lab, tmp_path / "exit")
    start_worker(
        lab, tmp_path / "worker", lab_login_sshd, carriers=CARRIERS, metrics="127.0.0.1:9101"
    )
    client = lab.spawn(
        lab.worker,
        nsclient_argv("many", lab.outside_ip, "443", "--streams", str(STREAMS),
                      "--socks", socks_url()),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert client.stdout is not None and client.stdin is not None
    opened = json.loads(client.stdout.readline())
    assert opened["open"] == STREAMS, opened
    # What the site sees: the login node's connections to the exit, the firewall's table.
    to_exit = lab.run(
        lab.login, ["ss", "-Htn", "state", "established", "dst", "203.0.113.2"]
    ).stdout.splitlines()
    assert len(to_exit) == CARRIERS, to_exit
    assert len(lab.conntrack_entries(80)) <= CARRIERS + 2
    time.sleep(3 * lab.idle_timeout)  # idle for longer than the firewall keeps connections
    client.stdin.write("go\n")
    client.stdin.flush()
    result = json.loads(client.stdout.readline())
    client.wait(timeout=30)
    assert result == {"ok": STREAMS, "errors": []}
    worker = scrape(lab, lab.worker, "http://127.0.0.1:9101/metrics")
    assert worker["relay_carriers_active"] == CARRIERS
    assert worker.get("relay_reconnects_total", 0.0) == 0
