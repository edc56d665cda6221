"""An unmodified stand-in glidein behind glidein-wrapper, in the firewall lab.

The wrapper and the stand-in run in the worker namespace, which has no route to the outside
namespace: a destination there is reachable only through the chain (worker -> OpenSSH on the
login node -> port 80 through the idle-killing firewall -> relay-exit). The stand-in is a plain
Python socket program plus curl, neither told about any proxy."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.netns import Lab
from tests.support.relays import scrape, start_exit
from tests.support.sshd import Sshd
from tests.support.wrapper import read_report, standin, wrapper_argv, write_worker_config

ECHO_PORT = 7001  # behind the exit, in the outside namespace
WEB_PORT = 8080  # likewise
DIRECT_PORT = 7002  # on the login node: reachable from the worker without the relay
FORWARD_PORT = 17001
DRONE = "drone-0123abcd"
NAME = "collector.relay-lab.test"  # known only to the outside namespace's resolver


@pytest.fixture
def outside_hosts(lab: Lab) -> Iterator[None]:
    """/etc/hosts for processes started in the outside namespace only (`ip netns exec` mounts
    /etc/netns/NS/hosts over /etc/hosts), so only the exit can resolve NAME."""
    parent = Path("/etc/netns")
    made_parent = not parent.exists()
    directory = parent / lab.outside
    directory.mkdir(parents=True)
    try:
        (directory / "hosts").write_text(f"127.0.0.1 localhost\n{lab.outside_ip} {NAME}\n")
        yield
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        if made_parent:
            with contextlib.suppress(OSError):
                parent.rmdir()  # only if empty: a parallel run may be using it


def test_standin_glidein_reaches_the_outside_only_through_the_relay(
    lab: Lab, lab_login_sshd: Sshd, tmp_path: Path, outside_hosts: None
) -> None:
    outside = lab.outside_ip
    lab.start_echo_server(lab.outside, outside, ECHO_PORT)
    lab.start_echo_server(lab.login, lab.login_ip, DIRECT_PORT)
    site = tmp_path / "site"
    site.mkdir()
    payload = os.urandom(200 * 1024)
    (site / "file").write_bytes(payload)
    web = lab.spawn(
        lab.outside,
        [sys.executable, "-m", "http.server", str(WEB_PORT), "--bind", outside,
         "--directory", str(site)],
    )  # fmt: skip
    lab.wait_listening(lab.outside, WEB_PORT, proc=web)
    # Without the relay the worker cannot reach the outside at all.
    assert lab.tcp_connect(lab.worker, outside, ECHO_PORT)["connected"] is False
    exit_daemon = start_exit(lab, tmp_path / "exit")
    config = write_worker_config(
        tmp_path / "worker", lab_login_sshd, [f"{outside}:80"],
        forward=[f"127.0.0.1:{FORWARD_PORT}={outside}:{ECHO_PORT}"],
    )  # fmt: skip
    report = tmp_path / "report.json"
    url = f"http://{outside}:{WEB_PORT}/file"
    idle = 2 * lab.idle_timeout + 1  # longer than the firewall keeps an idle connection
    argv = wrapper_argv(
        config, "--probe", f"{outside}:{ECHO_PORT}", "--direct", "192.0.2.0/24",
        "--drone-uuid", DRONE, "--container-env", "--ready-timeout", "30",
        command=standin(
            report, "--echo", f"{NAME}:{ECHO_PORT}", "--idle", str(idle),
            "--direct", f"{lab.login_ip}:{DIRECT_PORT}", "--forward", f"127.0.0.1:{FORWARD_PORT}",
            "--curl", url, "--curl-interposer", url, "--curl-proxy", url, "--curl-bad-proxy", url,
        ),
    )  # fmt: skip
    log = tmp_path / "wrapper.log"
    proc = lab.spawn(lab.worker, argv, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    assert proc.wait(timeout=90) == 0, log.read_text()
    result = read_report(report)

    # plain sockets, through the interposer, to a name only the exit can resolve (remote
    # DNS): works, and survives idling through the firewall
    assert result["echo"] == {"first": True, "after_idle": True, "error": None}, result
    # the --direct destination was reached without the relay
    assert result["direct"] == {"first": True, "after_idle": None, "error": None}, result
    # the static forward (a loopback port, so the interposer leaves it alone) is carried too
    assert result["forward"]["first"] is True, result
    digest = hashlib.sha256(payload).hexdigest()
    for key in ("curl", "curl_interposer", "curl_proxy"):
        assert result[key]["rc"] == 0 and result[key]["sha256"] == digest, (key, result[key])
    assert result["curl_proxy"]["connect_code"] == "200"
    assert result["curl_bad_proxy"]["connect_code"] == "407", result["curl_bad_proxy"]

    # what COMMAND was given
    env = result["env"]
    assert env["LD_PRELOAD"].endswith(("libproxychains.so.4", "libproxychains4.so"))
    assert env["ALL_PROXY"].startswith("socks5h://glidein:")
    assert env["https_proxy"].startswith("http://glidein:")
    assert env["http_proxy"] is None
    assert "192.0.2.0/24" in env["NO_PROXY"].split(",")
    assert result["proxychains_conf"]["mode"] == "0o600"
    conf = result["proxychains_conf"]["text"].splitlines()
    assert "strict_chain" in conf and "proxy_dns" in conf
    assert "localnet 127.0.0.0/255.0.0.0" in conf and "localnet 192.0.2.0/255.255.255.0" in conf
    # HTCondor's view: _CONDOR_ variables are read after every config file
    assert result["condor_env"] == {
        "_CONDOR_TardisDroneUuid": f'"{DRONE}"',
        "_CONDOR_STARTD_EXPRS": "TardisDroneUuid",
        "_CONDOR_UPDATE_COLLECTOR_WITH_TCP": "True",
        "_CONDOR_UPDATE_VIEW_COLLECTOR_WITH_TCP": "True",
        "_CONDOR_WANT_UDP_COMMAND_SOCKET": "False",
    }
    assert env["TardisDroneUuid"] == DRONE
    snippet = result["condor_config"]["text"].splitlines()
    assert f'TardisDroneUuid = "{DRONE}"' in snippet
    assert "STARTD_ATTRS = $(STARTD_ATTRS) TardisDroneUuid" in snippet
    assert "WANT_UDP_COMMAND_SOCKET = False" in snippet
    assert result["condor_config"]["mode"] == "0o600"
    containers = set(result["container_env"])
    assert {"SINGULARITYENV_LD_PRELOAD", "APPTAINERENV_LD_PRELOAD"} <= containers
    assert "APPTAINERENV__CONDOR_TardisDroneUuid" in containers

    # the exit saw the relayed streams, and none to the direct destination
    exit_log = exit_daemon.log_text()
    closed = [line for line in exit_log.splitlines() if "stream closed" in line]
    assert any(f"dest={NAME}:{ECHO_PORT}" in line and "result=ok" in line for line in closed)
    assert sum(f"dest={outside}:{WEB_PORT}" in line for line in closed) >= 3, exit_log
    assert not any(lab.login_ip in line for line in closed)
    metrics = scrape(lab, lab.outside, f"http://{outside}:9100/metrics")
    assert metrics['relay_streams_total{result="ok"}'] >= 5
    assert metrics['relay_bytes_total{direction="down"}'] >= 3 * len(payload)
    wrapper_log = log.read_text()
    assert "chain ready" in wrapper_log and "COMMAND exited 0" in wrapper_log
